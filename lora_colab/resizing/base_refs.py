"""The base checkpoint's side of resizing: which base weight (rows) a LoRA layer patches, and that
weight's spectral and Frobenius norms (kept in lowrank.norm_cache by checkpoint content)."""

import functools
import json

import torch

from ..arch.canonical import open_canonical
from ..arch.common import row_segments
from ..closeable import Closeable
from ..lora.journal import identity_of
from ..lowrank.factor import spectral_norm
from ..lowrank.norm_cache import norms_cache_path, write_cache

_FORMATS = ("kohya", "comfy", "diffusers")
_COMPONENT_PREFIXES = ("transformer.", "unet.", "diffusion_model.", "base_model.model.")


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
                entry = (target.key, module.located_rows)
                names.setdefault(module.name, entry)
                by_format[fmt].add(module.name)
                if fmt == "diffusers" and target.component == "model":
                    bare = module.name.split(".", 1)[1]
                    names.setdefault(bare, entry)
                    names.setdefault("lora_unet_" + bare.replace(".", "_"), entry)  # musubi-style
                    by_format[fmt].add(bare)
                elif fmt == "diffusers" and ".text_model." in module.name:  # transformers 5's CLIP: no text_model.
                    names.setdefault(module.name.replace(".text_model.", ".", 1), entry)
    return names, by_format


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

    @functools.cached_property
    def identity(self):
        """The base's content identity (what a resize journal records), computed once for every LoRA."""
        return identity_of(self.view.ckpt.sources)

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
        """The base weight (its rows: None, (start, stop) or segments in a module's order), 2-D float32."""
        segments = row_segments(rows, self.view.shape(key)[0])
        parts = [self.view.read(key, rows=seg, dtype=torch.float32, device=self.device) for seg in segments]
        w = parts[0] if len(parts) == 1 else torch.cat(parts)
        return w.reshape(w.shape[0], -1)

    def norms(self, key, rows):
        """(spectral norm, Frobenius norm) of the base weight (rows), from the cache when known."""
        cache_key = (key + "|" + ",".join(f"{a}:{b}" for a, b in row_segments(rows, 0))) if rows else key
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
        if self._dirty and write_cache(self.cache_path, self._cache):
            self._dirty = False

    def close(self):
        self.save()
        self.view.close()
