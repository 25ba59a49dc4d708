"""The base checkpoint's side of resizing: which base weight (rows) a LoRA layer patches, and that
weight's spectral and Frobenius norms, cached on disk by checkpoint content."""

import hashlib
import json
import os
from pathlib import Path

import torch

from ..closeable import Closeable
from ..arch.canonical import open_canonical
from ..lowrank.factor import spectral_norm
from ..lora.writer import temporary_name

_FORMATS = ("kohya", "comfy", "diffusers")
_COMPONENT_PREFIXES = ("transformer.", "unet.", "diffusion_model.", "base_model.model.")


def cache_dir():
    """Where norms are cached: $LORA_COLAB_CACHE, else $XDG_CACHE_HOME/lora_colab, else ~/.cache/lora_colab."""
    if os.environ.get("LORA_COLAB_CACHE"):
        return Path(os.environ["LORA_COLAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lora_colab"


def fingerprint(sources):
    """Content key of a checkpoint from its open ByteSources: size and header bytes of each file (not its
    path), plus what changes with the content (mtime, ETag, commit)."""
    digest = hashlib.sha256()
    for raw in sources:
        n = int.from_bytes(raw.pread(8, 0), "little") if raw.size >= 8 else 0
        digest.update(raw.size.to_bytes(8, "little"))
        # a safetensors header, or (pickles) the first MiB
        digest.update(raw.pread(min(n if n <= 100_000_000 else 1 << 20, max(raw.size - 8, 0)), 8))
    return digest.hexdigest()[:32]


def all_targets(arch, shapes):
    """Every weight a LoRA of this architecture may patch (optional groups and convolutions included)."""
    groups = set(arch.optional_groups) | {"conv"}
    return arch.targets(shapes, groups=groups, conv=True, text_encoders=True)


def lora_name_map(arch, targets):
    """Every LoRA module name a client uses for these targets -> (canonical key, rows or None), and each
    format's own names: ({name: (key, rows)}, {format: set of names})."""
    names, by_format = {}, {fmt: set() for fmt in _FORMATS}
    for target in targets:
        if target.component == "model":
            names.setdefault(target.module, (target.key, None))  # native names (ai-toolkit, OneTrainer)
        for fmt in _FORMATS:
            for module in arch.lora_modules(target, fmt):
                entry = (target.key, module.rows)
                names.setdefault(module.name, entry)
                by_format[fmt].add(module.name)
                if fmt == "diffusers" and target.component == "model":
                    bare = module.name.split(".", 1)[1]
                    names.setdefault(bare, entry)
                    names.setdefault("lora_unet_" + bare.replace(".", "_"), entry)  # musubi-style
                    by_format[fmt].add(bare)
    return names, by_format


def norms_cache_path(sources):
    """The norm cache file of the checkpoint read through `sources` (v2: spectral norms by Lanczos with a
    bounded error; v1's power iteration could be 2% low)."""
    return cache_dir() / f"norms_v2_{fingerprint(sources)}.json"


def remember_norms(sources, norms):
    """Add {canonical key: (spectral norm, Frobenius norm)} of whole base weights to the checkpoint's norm
    cache (what an extraction with a recipe computed), so a later resize against that base reads nothing."""
    if not norms:
        return
    path = norms_cache_path(sources)
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    cache.update({key: list(value) for key, value in norms.items()})
    _write_cache(path, cache)


def _write_cache(path, cache):
    """Write a norm cache atomically; False (quietly) where the cache folder is not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_name(path, "tmp")  # each run's own: concurrent runs
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, path)
        return True
    except OSError:
        return False


class BaseReferences(Closeable):
    """Norms of the base layers a LoRA's modules patch."""

    def __init__(self, checkpoint, device=None, token=None):
        self.view = open_canonical(checkpoint, token=token,
                                   role="the base model the LoRA was trained on as the checkpoint")
        self.device = device
        targets = all_targets(self.view.arch, self.view.shapes())
        self.targets = {target.key: target for target in targets}
        self.names, self._format_names = lora_name_map(self.view.arch, targets)
        self._flat_names = None
        self.cache_path = norms_cache_path(self.view.ckpt.sources)
        self._cache = self._load_cache()
        self._dirty = False
        self.norm_reads = 0

    @property
    def arch(self):
        return self.view.arch

    def locate(self, lora_name):
        """(canonical key, rows) of the base weight a LoRA module patches, or None.

        Takes every spelling the map knows (kohya, ComfyUI, PEFT, musubi-tuner), behind `transformer.`,
        `unet.`, `diffusion_model.` or `base_model.model.` (PEFT, ai-toolkit), and SimpleTuner's `lycoris_`."""
        if lora_name in self.names:
            return self.names[lora_name]
        for prefix in _COMPONENT_PREFIXES:
            if lora_name.startswith(prefix) and lora_name[len(prefix):] in self.names:
                return self.names[lora_name[len(prefix):]]
        if lora_name.startswith("lycoris_"):
            return self._flat().get(lora_name[len("lycoris_"):])
        return None

    def _flat(self):
        """Module names with `.` as `_` (SimpleTuner's lycoris_ spelling), built on first use."""
        if self._flat_names is None:
            self._flat_names = {}
            for name, entry in self.names.items():
                if not name.startswith(("lora_", "diffusion_model.", "transformer.")):
                    self._flat_names.setdefault(name.replace(".", "_"), entry)
        return self._flat_names

    def format_of(self, lora_names):
        """The output format ("kohya", "comfy", "diffusers") whose names most of `lora_names` use."""
        names = list(lora_names)
        return max(_FORMATS, key=lambda fmt: sum(name in self._format_names[fmt] for name in names))

    def describe(self):
        return f"{self.view.path} ({self.view.detected.describe()})"

    def weight(self, key, rows):
        """The base weight (rows), 2-D float32."""
        w = self.view.read(key, rows=rows, dtype=torch.float32, device=self.device)
        return w.reshape(w.shape[0], -1)

    def norms(self, key, rows):
        """(spectral norm, Frobenius norm) of the base weight (rows), from the cache when known."""
        cache_key = f"{key}|{rows[0]}:{rows[1]}" if rows else key
        if cache_key not in self._cache:
            w = self.weight(key, rows)
            self.norm_reads += 1
            fro = float(torch.linalg.vector_norm(w))
            spn = float(torch.linalg.matrix_norm(w, ord=2)) if min(w.shape) <= 128 else spectral_norm(w)
            self._cache[cache_key] = (spn, fro)
            self._dirty = True
        spn, fro = self._cache[cache_key]
        return spn, fro

    def _load_cache(self):
        try:
            return {k: tuple(v) for k, v in json.loads(self.cache_path.read_text()).items()}
        except (OSError, ValueError):
            return {}

    def save(self):
        """Write the norm cache (atomically); quietly skipped where the cache folder is not writable."""
        if self._dirty and _write_cache(self.cache_path, self._cache):
            self._dirty = False

    def close(self):
        self.save()
        self.view.close()
