"""The resizer: decompose each LoRA layer once (QR core, no ΔW), score its singular directions against
the LoRA itself and the base checkpoint, keep what a recipe selects, write one file per recipe."""

import json
import math
import os
import re
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..arch import guess_lora_arch
from ..arch.common import row_segments
from .base_refs import BaseReferences
from ..dtypes import parse_dtype
from ..errors import CheckpointError, Interrupted, LoraColabError, OptionError
from ..io.hub import pinned_run
from ..io.locations import describe, file_name
from ..lora.files import LoraFile
from ..lowrank.device import resolve_device
from ..memory import fmt_bytes
from ..progress import progress_bar
from ..lowrank.recipes import CHECKPOINT_KEYS, parse_recipes
from ..lora.journal import show, worth_keeping
from .merge import merge_spectra, reweight
from .spectrum import decompose, qr_core  # noqa: F401 (qr_core: part of the resizer API)
from .journal import decomposed, keep_decomposed, keep_references, open_journal, references
from ..lowrank.selection import Selection, kohya_rank, subspace_reference  # noqa: F401 (kohya_rank: resizer API)
from ..lora.writer import SpillWriter


def attach_references(spectrum, base):
    """Base norms (and, lazily, the per-direction subspace reference) of the layer's base weight."""
    found = base.locate(spectrum.name)
    if found is None:
        return
    key, rows = found
    shape = base.view.shape(key)
    rows_n = sum(b - a for a, b in row_segments(rows, shape[0]))
    cols = math.prod(shape[1:])
    if (rows_n, cols) != (spectrum.u.shape[0], spectrum.v.shape[0]):
        raise CheckpointError(base.view.path, f"base weight is {rows_n}x{cols} but LoRA layer {spectrum.name} "
                                              f"patches {spectrum.u.shape[0]}x{spectrum.v.shape[0]}", key)
    spectrum.base = (key, rows)
    spectrum.refs["spn_ckpt"], spectrum.refs["fro_ckpt"] = base.norms(key, rows)


# --- writing -------------------------------------------------------------------------------------

def layer_tensors(spectrum, keep, recipe, dtype):
    """{name: tensor} of one resized layer keeping directions `keep` (a LongTensor)."""
    k = keep.numel()
    sigma = recipe.rescale * spectrum.s[keep]
    scale = spectrum.in_scale if spectrum.has_alpha else 1.0
    root = (sigma / scale).clamp_min(0).sqrt()
    factors = (root[:, None] * spectrum.v[:, keep].T, spectrum.u[:, keep] * root)  # down, up
    tensors = {name: factor.reshape(shape).to(dtype).contiguous()
               for (name, _, shape), factor in zip(layer_specs(spectrum, k, dtype), factors)}
    if spectrum.has_alpha:
        tensors[spectrum.name + ".alpha"] = torch.tensor(scale * k, dtype=torch.float32)
    return tensors


def layer_specs(spectrum, k, dtype):
    """[(name, dtype, shape)] of one resized layer at rank k: down, up, then alpha when it has one."""
    down_s, up_s = spectrum.suffixes
    out = spectrum.out_shape
    if len(out) == 4:
        down_shape, up_shape = (k,) + tuple(out[1:]), (out[0], k, 1, 1)
    else:
        down_shape, up_shape = (k, spectrum.v.shape[0]), (spectrum.u.shape[0], k)
    specs = [(spectrum.name + down_s, dtype, down_shape), (spectrum.name + up_s, dtype, up_shape)]
    if spectrum.has_alpha:
        specs.append((spectrum.name + ".alpha", torch.float32, ()))
    return specs


# --- reports -------------------------------------------------------------------------------------

@dataclass
class LayerChange:
    name: str
    old_rank: int
    new_rank: int
    retained: float  # Σσ²(kept) / Σσ²


@dataclass
class ResizeReport:
    """One (LoRA, recipe) result."""

    lora: str
    recipe: dict
    output: str = None
    layers: list = field(default_factory=list)
    threshold: float = None
    size_target: int = None
    size_bytes: int = 0
    score_quantiles: dict = field(default_factory=dict)
    scores: list = field(default_factory=list)  # every scored direction's log10 score (for a histogram)
    warnings: list = field(default_factory=list)
    seconds: float = 0.0
    nothing_kept: bool = False  # the recipe kept no direction of any layer: no file written

    @property
    def total_rank(self):
        return sum(layer.new_rank for layer in self.layers)

    def to_dict(self):
        return asdict(self)

    def summary(self, verbose=1):
        if self.nothing_kept:
            lines = [f"{_label(self.lora)} [{self.recipe['recipe']}]: the recipe keeps no direction of any layer; "
                     f"no file written (lower the threshold or raise the size)"]
            lines.extend(f"  warning: {w}" for w in self.warnings)
            return "\n".join(lines)
        lines = [f"{_label(self.lora)} [{self.recipe['recipe']}] -> {self.output} ({fmt_bytes(self.size_bytes)})"]
        if verbose >= 1:
            old = sum(layer.old_rank for layer in self.layers)
            lines.append(f"  total rank {old} -> {self.total_rank}; threshold "
                         f"{'-' if self.threshold is None else f'{self.threshold:.3f}'}"
                         + (f"; size target {fmt_bytes(self.size_target)}, real {fmt_bytes(self.size_bytes)}"
                            if self.size_target else ""))
            if self.score_quantiles:
                lines.append("  score quantiles " + ", ".join(f"{q}: {v:.2f}" for q, v in self.score_quantiles.items()))
        if verbose >= 2:
            lines.extend(f"  {layer.name}: {layer.old_rank} -> {layer.new_rank} (retained {layer.retained:.4f})"
                         for layer in self.layers)
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)

    def __str__(self):
        return self.summary(1)


class ResizeReports(list):
    """The ResizeReports of one resize run; `print()` shows one summary per output."""

    def __str__(self):
        return "\n".join(report.summary(1) for report in self)

    def _repr_pretty_(self, printer, cycle):
        printer.text(str(self))


# --- the API -------------------------------------------------------------------------------------

def _split_merge(text):
    """'a.safetensors:0.7,b.safetensors:0.3' -> [(path, weight)] (drive letters like C:\\ are kept)."""
    parts = []
    for item in str(text).split(","):
        path, weight = item, 1.0
        hit = re.fullmatch(r"(.+):([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)", item.strip())
        if hit:
            path, weight = hit.group(1), float(hit.group(2))
        parts.append((path.strip(), weight))
    return parts


def _output_name(lora_path, recipe):
    stem = _stem(lora_path) if "," not in str(lora_path) else "merged"
    return f"{stem}_{recipe.tag()}.safetensors"


def _label(lora_arg, full=False):
    """A LoRA argument as printed: file names (full: whole paths or URLs without their queries) with
    their merge weights."""
    name = describe if full else file_name
    return ",".join(name(path) + (f":{weight:g}" if weight != 1.0 else "") for path, weight in _split_merge(lora_arg))


def _stem(source):
    """A file's name without its suffix, for a path, a URL (no query) or a Hub `owner/repo:file`."""
    name = file_name(source)
    return name[:-len(".safetensors")] if name.endswith(".safetensors") else Path(name).stem


def _output_folder(output_folder, first_source):
    """Where outputs go: the folder given, else next to a local LoRA, else the working directory."""
    if output_folder:
        return Path(output_folder)
    path = Path(os.path.expanduser(str(first_source)))
    return path.parent if path.exists() else Path.cwd()


def _add_patch(patches, lora, key, weight):
    """Add weight × a whole-tensor patch (bias `.diff_b`, 1-D `.diff`) to `patches`: kept, never decomposed."""
    tensor = lora.ckpt.read(key)
    dtype, total = patches.get(key, (tensor.dtype, 0.0))
    patches[key] = (dtype, total + tensor.float() * weight)


def _decompose_all(lora_arg, device, base=None, token=None, tick=None, journal_of=None):
    """Spectra of a LoRA argument (one file, or a weighted merge), its pass-through tensors, metadata,
    warnings and journal (`journal_of([(LoraFile, weight)])` makes it; None: no journal)."""
    parts = _split_merge(lora_arg)
    loaded, passthrough, metadata, warnings = [], {}, {}, []
    patches = {}  # key -> (stored dtype, Σ weight · tensor) of whole-tensor patches (.diff_b, 1-D .diff)
    with ExitStack() as files:
        opened = [(files.enter_context(LoraFile(path, token)), weight) for path, weight in parts]
        journal = journal_of(opened) if journal_of is not None else None
        for part, (lora, weight) in enumerate(opened):
            metadata = metadata or dict(lora.metadata)
            for key in lora.other_keys:
                if key.endswith(".diff_b"):
                    _add_patch(patches, lora, key, weight)
                    continue
                passthrough[key] = lora.ckpt.read(key)
                warnings.append(f"{key}: not a LoRA layer this tool understands; copied unchanged")
            spectra = {}
            if tick is not None:
                tick(total=len(lora.layers))
            for layer in lora.layers.values():
                if tick is not None:
                    tick()
                if layer.kind == "diff" and len(lora.ckpt.shape(layer.tensors["diff"])) == 1:
                    _add_patch(patches, lora, layer.tensors["diff"], weight)  # a norm scale: no rank to cut
                    continue
                sp = decomposed(journal, part, layer.name)
                if sp is None:
                    sp = decompose(lora, layer, device)
                    keep_decomposed(journal, part, sp)
                if sp.dora_key:
                    passthrough[sp.dora_key] = lora.ckpt.read(sp.dora_key)
                    warnings.append(f"{layer.name}: DoRA magnitude kept; the resized layer is approximate")
                if layer.kind != "lora":
                    warnings.append(f"{layer.name}: {layer.kind} layer rebuilt and written as a plain LoRA")
                spectra[layer.name] = sp
            loaded.append((weight, spectra))
    passthrough.update({key: total.to(dtype) for key, (dtype, total) in patches.items()})
    if len(loaded) == 1:
        weight, spectra = loaded[0]
        for sp in spectra.values():
            reweight(sp, weight)
        return list(spectra.values()), passthrough, metadata, warnings, journal
    merged, note = merge_spectra(loaded, base)
    if note:
        warnings.append(note)
    return merged, passthrough, metadata, warnings, journal


def resize(checkpoint, loras, output_folder=None, recipes="spn_ckpt=1,thr=-1.2", dtype=None, device="auto",
           verbose=0, progress=True, token=None, on_layer=None, resume=True, restart=False):
    """Resize each LoRA with each recipe; returns one ResizeReport per (LoRA, recipe).

    checkpoint: the base model (any layout or source `open_checkpoint` reads: remote files are read in
    place), or None when no recipe needs it. `token` is sent to plain URLs' own hosts.
    loras: sources, or "a.safetensors:0.7,b.safetensors:0.3" to merge with weights before resizing;
    outputs go to `output_folder`, else next to a local LoRA, else the working directory.
    recipes: `:`-separated recipes (see README); dtype: "16", "32", "bf16" (default: the input's).
    progress: a bar per LoRA over its layers (True, the default, as extract: tqdm's; False: none; or a
    tqdm-like factory); on_layer(): called
    after each layer is decomposed and scored (e.g. a memory monitor's update).
    resume: keep each layer's decomposition and base references in a journal beside the outputs
    (`STEM.resize.journal`), so the same call after an interruption reads nothing it had done (any recipes);
    restart=True: start over.
    """
    if isinstance(loras, (str, os.PathLike)):
        loras = [loras]
    for lora_arg in loras:
        for path, weight in _split_merge(lora_arg):
            if weight == 0:
                raise OptionError(f"{file_name(path)}:0: a merge weight of 0 adds nothing; leave that LoRA out")
    recipe_list = parse_recipes(recipes) if isinstance(recipes, str) else list(recipes)
    dtype = parse_dtype(dtype)
    if output_folder is not None and Path(output_folder).exists() and not Path(output_folder).is_dir():
        raise OptionError(f"{output_folder}: is a file; the resize output is a folder (one file per LoRA and "
                          f"recipe is written into it)")
    device = resolve_device(device)
    if checkpoint is None and any(r.needs_checkpoint for r in recipe_list):
        raise LoraColabError("a recipe uses spn_ckpt/fro_ckpt/subspace: give the base checkpoint")
    with pinned_run():
        return _resize_all(checkpoint, loras, recipe_list, output_folder, dtype, device, verbose, token,
                           progress, on_layer, resume, restart)


def _ticker(progress, on_layer, lora_arg):
    """A function called once per layer: advances a bar (when `progress`) and calls `on_layer`."""
    state = {"bar": None}

    def tick(total=None):
        if total is not None:  # (re)start for `total` layers
            if state["bar"] is not None:
                state["bar"].close()
            state["bar"] = progress_bar(total, progress, _label(lora_arg))
            return
        if state["bar"] is not None:
            state["bar"].update(1)
        if on_layer is not None:
            on_layer()

    def close():
        if state["bar"] is not None:
            state["bar"].close()
    tick.close = close
    return tick


def _resize_all(checkpoint, loras, recipe_list, output_folder, dtype, device, verbose, token, progress=False,
                on_layer=None, resume=False, restart=False):
    base = BaseReferences(checkpoint, device, token) if checkpoint is not None else None
    reports = ResizeReports()
    try:
        for lora_arg in loras:
            reports.extend(_resize_one(lora_arg, base, recipe_list, output_folder, dtype, device, verbose, token,
                                       progress, on_layer, resume, restart))
    finally:
        if base is not None:
            base.close()
    return reports


def _resize_one(lora_arg, base, recipe_list, output_folder, dtype, device, verbose, token, progress, on_layer,
                resume, restart):
    """Every recipe's report for one LoRA argument; its journal is kept on an interruption, removed after."""
    started = time.perf_counter()
    tick = _ticker(progress, on_layer, lora_arg)
    first = _split_merge(lora_arg)[0][0]
    held = []

    def journal_of(opened):
        if not resume:
            return None
        held.append(open_journal(_output_folder(output_folder, first), lora_arg, opened, base, _stem(first),
                                 restart))
        return held[0]
    reports = []
    try:
        try:
            spectra, passthrough, metadata, warnings, journal = _decompose_all(lora_arg, device, base, token, tick,
                                                                               journal_of)
            warnings = _say_resumed(journal, progress) + warnings
            if base is not None:
                _references(spectra, base, journal, recipe_list, on_layer)
        finally:
            tick.close()
        if base is not None:
            note = base_coverage(lora_arg, spectra, base, recipe_list, metadata)
            if note:
                warnings.append(note)
        out_dtype = dtype or _input_dtype(first, token)
        for recipe in recipe_list:
            report = _apply(lora_arg, spectra, passthrough, metadata, recipe, base, out_dtype, output_folder)
            report.warnings = warnings + report.warnings
            report.seconds = time.perf_counter() - started
            started = time.perf_counter()
            reports.append(report)
            if verbose:
                print(report.summary(verbose))
    except BaseException as exc:
        for journal in held:
            journal.abort() if worth_keeping(exc) else journal.discard()  # kept: the same call resumes from it
        if isinstance(exc, KeyboardInterrupt) and held and held[0].done and not held[0].shared:
            raise Interrupted(f"interrupted; {held[0].spill_path.name} keeps {len(held[0].done)} finished steps "
                              f"(decomposed layers, base references): the same command resumes from there "
                              f"(--restart starts over)") from None
        raise
    for journal in held:
        journal.discard()
    return reports


def _references(spectra, base, journal, recipes, on_layer):
    """Each spectrum's base references (norms; the subspace terms when a recipe scores them), from the
    journal where an interrupted run computed them, else from the base (and then journaled)."""
    subspace = any("subspace" in recipe.weights for recipe in recipes)
    for sp in spectra:
        if not references(journal, sp):
            attach_references(sp, base)
            if subspace and sp.base is not None:
                sp.refs["subspace"] = subspace_reference(sp, base)
            keep_references(journal, sp)
        if on_layer is not None:
            on_layer()


def base_coverage(lora_arg, spectra, base, recipes, metadata):
    """A note when some layers patch no weight of the base (their base-relative terms cannot be computed);
    an error naming both architectures when none does."""
    missing = [sp.name for sp in spectra if sp.base is None]
    terms = sorted({key for recipe in recipes for key in recipe.weights if key in CHECKPOINT_KEYS})
    if not missing or not terms:
        return None
    if len(missing) == len(spectra):
        guess = guess_lora_arch([sp.name for sp in spectra], metadata)
        raise LoraColabError(f"{_label(lora_arg)}: none of its {len(spectra)} layers patches a weight of the base "
                             f"{base.describe()}; the LoRA looks like a {guess} LoRA: give the checkpoint it was "
                             f"trained on")
    return (f"{len(missing)} of {len(spectra)} layers patch no weight of the base {base.describe()} (first: "
            f"{missing[0]}): {', '.join(terms)} could not be computed for them; they are kept unchanged")


def _apply(lora_arg, spectra, passthrough, metadata, recipe, base, out_dtype, output_folder):
    inputs = [p for p, _ in _split_merge(lora_arg)]
    first_path = inputs[0]
    folder = _output_folder(output_folder, first_path)
    out = folder / _output_name(lora_arg if "," in str(lora_arg) else first_path, recipe)
    pass_specs = [(k, t.dtype, tuple(t.shape)) for k, t in passthrough.items()]
    report = ResizeReport(_label(lora_arg, full=True), recipe.to_dict(), str(out))

    def metadata_for(keep):
        ranks = [idx.numel() for idx in keep if idx is not None and idx.numel()]
        return {**_metadata(metadata, recipe, spectra, keep, ranks), **merge_metadata(lora_arg)}

    selection = Selection(spectra, recipe, base, pass_specs, lambda i, k: layer_specs(spectra[i], k, out_dtype),
                          metadata_for)
    keep = selection.choose()
    if len(selection.all_scores):
        ordered = selection.all_scores.sort().values
        last = ordered.numel() - 1
        report.scores = [round(float(x), 4) for x in ordered]
        report.score_quantiles = {f"{int(q * 100)}%": float(ordered[round(q * last)])
                                  for q in (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)}
    report.threshold = selection.threshold
    if recipe.size is not None:
        report.size_target = int(recipe.size * 2**20)
    if not any(idx.numel() for idx in keep):
        report.output, report.nothing_kept = None, True
        report.layers = [LayerChange(sp.name, sp.old_rank or sp.s.numel(), 0, 0.0) for sp in spectra]
        return report
    if out.exists():
        report.warnings.append(f"replaced the existing {out.name} (an earlier run's output of this LoRA and recipe)")
    writer = SpillWriter(out, protect=inputs)
    try:
        for key, tensor in passthrough.items():
            writer.add(key, tensor)
        for sp, idx in zip(spectra, keep):
            total = float(sp.s.double().pow(2).sum()) or 1.0
            kept = idx.numel()
            report.layers.append(LayerChange(sp.name, sp.old_rank or sp.s.numel(), kept,
                                             float(sp.s[idx].double().pow(2).sum()) / total))
            if kept:
                for name, tensor in layer_tensors(sp, idx, recipe, out_dtype).items():
                    writer.add(name, tensor)
        writer.finish(metadata_for(keep), kohya_hashes=True)
    finally:
        writer.abort()
    report.size_bytes = out.stat().st_size
    return report


def _input_dtype(path, token=None):
    from ..io.opener import open_checkpoint
    with open_checkpoint(path, token) as ckpt:
        for key in ckpt.keys():
            if key.endswith(("lora_down.weight", "lora_A.weight", "lora.down.weight")):
                dtype = ckpt.dtype(key)
                if dtype in (torch.float16, torch.bfloat16, torch.float32):
                    return dtype
    return torch.float16


def _metadata(metadata, recipe, spectra, keep, ranks):
    meta = {k: v for k, v in metadata.items() if k not in ("sshs_model_hash", "sshs_legacy_hash")}
    alphas = {round(sp.in_scale * idx.numel(), 6) for sp, idx in zip(spectra, keep) if idx.numel()}
    same = len(set(ranks)) == 1 and len(alphas) == 1
    meta["ss_network_dim"] = str(ranks[0]) if same else "Dynamic"
    meta["ss_network_alpha"] = f"{next(iter(alphas)):g}" if same else "Dynamic"
    if "ss_network_args" in meta:
        try:
            args = json.loads(meta["ss_network_args"])
            if isinstance(args, dict) and "conv_dim" in args:
                args["conv_dim"] = args["conv_alpha"] = "Dynamic"
                meta["ss_network_args"] = json.dumps(args)
        except ValueError:
            pass
    old = max((sp.old_rank or sp.s.numel() for sp in spectra), default=0)
    line = f"resized by lora_colab from rank {old} with recipe {recipe.text}"
    meta["ss_training_comment"] = line + ("; " + meta["ss_training_comment"] if meta.get("ss_training_comment")
                                          else "")
    meta["lora_colab.resize_recipe"] = json.dumps(recipe.to_dict())
    return meta


def merge_metadata(lora_arg):
    """{"lora_colab.merge": JSON [[file name, weight], ...]} for a merge (several LoRAs or a weight other than
    1), else {}: the file says what it was made of."""
    parts = _split_merge(lora_arg)
    if len(parts) == 1 and parts[0][1] == 1.0:
        return {}
    return {"lora_colab.merge": json.dumps([[file_name(path), weight] for path, weight in parts])}


def _say_resumed(journal, progress):
    """The journal's lines (what it took back, or why it started over), shown at once and kept."""
    if journal is None:
        return []
    lines = list(journal.notes)
    layers = sum(key.startswith("d") for key in journal.taken)
    if journal.taken:
        lines.append(f"resuming: {layers} decomposed layers and {len(journal.taken) - layers} base references "
                     f"taken from {journal.spill_path.name}")
    show(lines, progress)
    return lines
