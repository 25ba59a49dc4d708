"""The resizer: decompose each LoRA layer once (QR core, no ΔW), score its singular directions against
the LoRA itself and the base checkpoint, keep what a recipe selects, write one file per recipe."""

import json
import math
import os
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..arch import guess_lora_arch
from ..arch.common import row_segments
from .base_refs import BaseReferences
from ..dtypes import parse_dtype
from ..errors import CheckpointError, Interrupted, LoraColabError, OptionError, WriteFault
from ..io.hub import pinned_run
from ..lora.files import LoraFile
from ..lowrank.device import resolve_device
from ..memory import fmt_bytes
from ..progress import progress_bar
from ..lowrank.recipes import CHECKPOINT_KEYS, parse_recipes
from .inputs import LoraInput, file_stem
from ..lora.journal import resumable_fault, show, worth_keeping
from .merge import merge_spectra, reweight
from .spectrum import MAX_REBUILT_RANK, decompose, qr_core  # noqa: F401 (qr_core: part of the resizer API)
from .journal import decomposed, keep_decomposed, keep_references, open_journal, references
from ..lowrank.selection import Selection, kohya_rank, subspace_reference  # noqa: F401 (kohya_rank: resizer API)
from ..lora import spellings
from ..lora.writer import require_space
from .output import (adapter_metadata, common_alpha, layer_specs, layer_tensors, peft_config, respell,
                     write_file, write_peft_folder)


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
    if len(shape) > 2 and len(spectrum.out_shape) == 2:  # a convolution LoHa kept flat: its kernel's shape
        spectrum.out_shape = (rows_n,) + tuple(shape[1:])
    spectrum.refs["spn_ckpt"], spectrum.refs["fro_ckpt"] = base.norms(key, rows)


# --- reports -------------------------------------------------------------------------------------

@dataclass
class LayerChange:
    name: str
    old_rank: int
    new_rank: int
    retained: float  # Σσ²(kept) / Σσ²


@dataclass
class ResizeReport:
    """One (LoRA, recipe) result; `lora`: its inputs' whole paths with their weights, `name`: their file names."""

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
    name: str = ""

    @property
    def total_rank(self):
        return sum(layer.new_rank for layer in self.layers)

    def to_dict(self):
        return asdict(self)

    def summary(self, verbose=1):
        if self.nothing_kept:
            lines = [f"{self.name or self.lora} [{self.recipe['recipe']}]: the recipe keeps no direction of any layer; "
                     f"no file written (lower the threshold or raise the size)"]
            lines.extend(f"  warning: {w}" for w in self.warnings)
            return "\n".join(lines)
        lines = [f"{self.name or self.lora} [{self.recipe['recipe']}] -> {self.output} ({fmt_bytes(self.size_bytes)})"]
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

def _output_name(lora, recipe, spelling, to=None):
    """`STEM_RECIPE[_SPELLING].safetensors` (the spelling's name where `to` changed it), or a folder of that
    name for a PEFT folder."""
    name = "_".join(part for part in (lora.stem, recipe.tag(), to.name if to is not None else "") if part)
    return name if spelling.folder else name + ".safetensors"


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


@dataclass
class Decomposed:
    """One LoRA argument read and decomposed: its spectra, the tensors written as they are (whole-tensor
    patches, unknown tensors), the first file's metadata, spelling and PEFT adapter configs, the notes."""

    spectra: list
    passthrough: dict
    metadata: dict
    spelling: object
    adapters: dict
    warnings: list
    journal: object = None


def _decompose_all(lora, device, base=None, token=None, tick=None, journal_of=None):
    """The Decomposed of a LoraInput (one file, or a weighted merge); `journal_of([(LoraFile, weight)])`
    makes its journal (None: no journal)."""
    loaded, passthrough, warnings = [], {}, []
    patches = {}  # key -> (stored dtype, Σ weight · tensor) of whole-tensor patches (.diff_b, 1-D .diff)
    with ExitStack() as files:
        opened = [(files.enter_context(LoraFile(s.path, token)), s.weight) for s in lora.sources]
        journal = journal_of(opened) if journal_of is not None else None
        first = opened[0][0]
        for part, (file, weight) in enumerate(opened):
            loaded.append((weight, _decompose_file(file, part, weight, device, journal, tick, patches,
                                                   passthrough, warnings)))
    passthrough.update({key: total.to(dtype) for key, (dtype, total) in patches.items()})
    if len(loaded) == 1:
        weight, spectra = loaded[0]
        for sp in spectra.values():
            reweight(sp, weight)
        merged = list(spectra.values())
    else:
        merged, note = merge_spectra(loaded, base)
        if note:
            warnings.append(note)
    return Decomposed(merged, passthrough, dict(first.metadata), first.spelling, dict(first.adapters), warnings,
                      journal)


def _decompose_file(lora, part, weight, device, journal, tick, patches, passthrough, warnings):
    """{layer name: Spectrum} of one LoRA file (from the journal where an interrupted run made them);
    its whole-tensor patches go to `patches`, tensors it does not understand to `passthrough`."""
    for key in lora.other_keys:
        if key.endswith(".diff_b"):
            _add_patch(patches, lora, key, weight)
            continue
        passthrough[key] = lora.ckpt.read(key)
        warnings.append(f"{key}: not a LoRA layer this tool understands; copied unchanged")
    spectra = {}
    if tick is not None:
        tick(total=len(lora.layers))
    dora = 0
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
        dora += sp.magnitude is not None
        if layer.kind != "lora":
            warnings.append(f"{layer.name}: {layer.kind} layer rebuilt and written as a plain LoRA")
        spectra[layer.name] = sp
    if dora:
        warnings.append(f"{dora} DoRA layers: each keeps its magnitude; the change of direction is resized")
    return spectra


@dataclass(frozen=True)
class ResizeOptions:
    """What a resize run was asked, checked once: where outputs go, their dtype (None: the input's) and
    spelling (None: the input's), the device, the reporting and resuming choices."""

    output_folder: object = None
    dtype: object = None
    to: object = None            # an output Spelling, or None
    device: object = "cpu"
    verbose: int = 0
    token: str = None
    progress: object = False
    on_layer: object = None
    resume: bool = False
    restart: bool = False


def resize(checkpoint, loras, output_folder=None, recipes="spn_ckpt=1,thr=-1.2", dtype=None, device="auto",
           verbose=0, progress=True, token=None, on_layer=None, resume=True, restart=False, to=None):
    """Resize each LoRA with each recipe; returns one ResizeReport per (LoRA, recipe).

    checkpoint: the base model (any layout or source `open_checkpoint` reads: remote files are read in
    place), or None when no recipe needs it. `token` is sent to plain URLs' own hosts.
    loras: files or PEFT `save_pretrained` folders, or "a.safetensors:0.7,b.safetensors:0.3" to merge with
    weights before resizing; each is read with its trainer's own scale (`X.alpha`, PEFT's adapter config in
    diffusers' metadata or adapter_config.json, rslora and rank/alpha patterns included);
    outputs go to `output_folder`, else next to a local LoRA, else the working directory.
    recipes: `:`-separated recipes (see README); dtype: "16", "32", "bf16" (default: the input's).
    to: the output's spelling, one of lora.spellings.OUTPUTS ("kohya", "comfy", "diffusers", "peft": a
    save_pretrained folder); None (default): the input's own, with its metadata rewritten to describe it.
    progress: a bar per LoRA over its layers (True, the default, as extract: tqdm's; False: none; or a
    tqdm-like factory); on_layer(): called
    after each layer is decomposed and scored (e.g. a memory monitor's update).
    resume: keep each layer's decomposition and base references in a journal beside the outputs
    (`STEM.resize.journal`), so the same call after an interruption reads nothing it had done (any recipes);
    restart=True: start over.
    """
    if isinstance(loras, (str, os.PathLike, LoraInput)):
        loras = [loras]
    loras = [LoraInput.parse(lora) for lora in loras]
    recipe_list = parse_recipes(recipes) if isinstance(recipes, str) else list(recipes)
    if output_folder is not None and Path(output_folder).exists() and not Path(output_folder).is_dir():
        raise OptionError(f"{output_folder}: is a file; the resize output is a folder (one file per LoRA and "
                          f"recipe is written into it)")
    options = ResizeOptions(output_folder, parse_dtype(dtype), None if to in (None, "input") else spellings.get(to),
                            resolve_device(device), verbose, token, progress, on_layer, resume, restart)
    if checkpoint is None and any(r.needs_checkpoint for r in recipe_list):
        raise LoraColabError("a recipe uses spn_ckpt/fro_ckpt/subspace: give the base checkpoint")
    made = _folders_to_make(output_folder, loras)
    try:
        with pinned_run():
            return _resize_all(checkpoint, loras, recipe_list, options)
    finally:
        for folder in made:  # a run that wrote nothing leaves no empty folder behind
            _remove_if_empty(folder)


def _folders_to_make(output_folder, loras):
    """The output folders this run will create, each with the folders above it that do not exist yet, deepest
    first: removed again if nothing lands in them."""
    made = []
    for lora in loras:
        folder = _output_folder(output_folder, lora.first)
        while not folder.exists() and folder not in made:
            made.append(folder)
            folder = folder.parent
    return sorted(made, key=lambda f: -len(f.parts))


def _remove_if_empty(folder):
    try:
        folder.rmdir()
    except OSError:  # not empty (or already gone)
        pass


def _ticker(progress, on_layer, lora):
    """A function called once per layer: advances a bar (when `progress`) and calls `on_layer`."""
    state = {"bar": None}

    def tick(total=None):
        if total is not None:  # (re)start for `total` layers
            if state["bar"] is not None:
                state["bar"].close()
            state["bar"] = progress_bar(total, progress, lora.label())
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


def _resize_all(checkpoint, loras, recipe_list, options):
    base = BaseReferences(checkpoint, options.device, options.token) if checkpoint is not None else None
    reports = ResizeReports()
    try:
        for lora in loras:
            reports.extend(_resize_one(lora, base, recipe_list, options))
    finally:
        if base is not None:
            base.close()
    return reports


def _resize_one(lora, base, recipe_list, options):
    """Every recipe's report for one LoraInput; its journal is kept on an interruption, removed after."""
    started = time.perf_counter()
    tick = _ticker(options.progress, options.on_layer, lora)
    first = lora.first
    held, said = [], []  # the journal, once open; what it said at once

    def journal_of(opened):
        folder = _output_folder(options.output_folder, first)
        if options.resume:
            held.append(open_journal(folder, lora, opened, base, options.restart))
            said.extend(_say_resumed(held[0], options.progress))  # at once: resuming, or another run holds it
        kept = held[0]._size if held and not held[0].shared else 0
        _check_space(opened, recipe_list, folder / file_stem(first), kept)
        return held[0] if held else None
    reports = []
    try:
        try:
            job = _decompose_all(lora, options.device, base, options.token, tick, journal_of)
            job.warnings = said + job.warnings
            _spell_output(job, options.to, base)  # before the references: re-spelled layers are new ones
            if base is not None:
                _references(job.spectra, base, job.journal, recipe_list, options.on_layer)
        finally:
            tick.close()
        if base is not None:
            note = base_coverage(lora, job.spectra, base, recipe_list, job.metadata)
            if note:
                job.warnings.append(note)
        out_dtype = options.dtype or _input_dtype(first, options.token)
        for recipe in recipe_list:
            report = _apply(lora, job, recipe, base, out_dtype, options)
            report.warnings = job.warnings + report.warnings
            report.seconds = time.perf_counter() - started
            started = time.perf_counter()
            reports.append(report)
            if options.verbose:
                print(report.summary(options.verbose))
    except BaseException as exc:
        for journal in held:  # kept where it holds finished steps: the same call resumes from it
            journal.abort() if worth_keeping(exc) and journal.done else journal.discard()
        if isinstance(exc, WriteFault) and held and held[0].done and not held[0].shared:
            raise resumable_fault(exc, held[0], f"{len(held[0].done)} finished steps") from None
        if isinstance(exc, KeyboardInterrupt) and held and held[0].done and not held[0].shared:
            raise Interrupted(f"interrupted; {held[0].spill_path.name} keeps {len(held[0].done)} finished steps "
                              f"(decomposed layers, base references): the same command resumes from there "
                              f"(--restart starts over)") from None
        raise
    for journal in held:
        journal.discard()
    return reports


def _spell_output(job, to, base):
    """Name the job's layers in the output spelling `to` (None: the input's); whole-tensor patches and
    tensors the target's clients refuse are left out with a note."""
    job.spectra, note = respell(job.spectra, job.spelling, to, base)
    if note:
        job.warnings.append(note)
    if to is None or to == job.spelling:
        return
    if not to.whole and job.passthrough:
        job.warnings.append(f"{len(job.passthrough)} tensors that are no LoRA factors ({', '.join(list(job.passthrough)[:2])}"
                            f"{', ...' if len(job.passthrough) > 2 else ''}) left out: {to.title} refuses them")
        job.passthrough = {}
    job.spelling = to


def _check_space(opened, recipes, where, held):
    """Refuse before decomposing a layer a resize whose journal (each layer's float32 directions) and outputs
    (one per recipe, at most the input's size or the recipe's `size=`; the largest twice while it is
    assembled) cannot fit on the output's disk; `held`: what the journal holds already."""
    journal, inputs = 0, 0
    for lora, _ in opened:
        inputs += lora.ckpt.total_bytes
        for layer in lora.layers.values():
            rows, cols, rank = _layer_dims(lora, layer)
            journal += (rows + cols + 1) * rank * 4
    outputs = [min(inputs, int(recipe.size * 2**20)) if recipe.size else inputs for recipe in recipes]
    require_space(where, max(0, journal - held) + sum(outputs) + max(outputs),
                  [("journal", max(0, journal - held)), ("outputs", sum(outputs)),
                   ("the largest again while it is assembled", max(outputs))])


def _layer_dims(lora, layer):
    """(rows, columns, rank) of a layer's decomposition, from the shapes in the file's header."""
    shape = lora.ckpt.shape
    t = layer.tensors
    if layer.kind in ("lora", "tucker"):
        down, up = shape(t["down"]), shape(t["up"])
        return up[0], math.prod(down[1:]), down[0]
    if layer.kind == "loha":
        rows, cols = shape(t["hada_w1_a"])[0], math.prod(shape(t["hada_w1_b"])[1:])
    elif layer.kind == "diff":
        full = shape(t["diff"])
        rows, cols = full[0], math.prod(full[1:])
    else:  # LoKr: the Kronecker product's rows and columns
        parts = [shape(t[k]) for k in ("lokr_w1", "lokr_w2") if k in t]
        return (0, 0, 0) if len(parts) < 2 else (parts[0][0] * parts[1][0], parts[0][1] * math.prod(parts[1][1:]),
                                                 min(MAX_REBUILT_RANK, parts[0][0] * parts[1][0]))
    return rows, cols, min(MAX_REBUILT_RANK, rows, cols)


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


def base_coverage(lora, spectra, base, recipes, metadata):
    """A note when some layers patch no weight of the base (their base-relative terms cannot be computed);
    an error naming both architectures when none does."""
    missing = [sp.name for sp in spectra if sp.base is None]
    terms = sorted({key for recipe in recipes for key in recipe.weights if key in CHECKPOINT_KEYS})
    if not missing or not terms:
        return None
    if len(missing) == len(spectra):
        guess = guess_lora_arch([sp.name for sp in spectra], metadata)
        raise LoraColabError(f"{lora.label()}: none of its {len(spectra)} layers patches a weight of the base "
                             f"{base.describe()}; the LoRA looks like a {guess} LoRA: give the checkpoint it was "
                             f"trained on")
    return (f"{len(missing)} of {len(spectra)} layers patch no weight of the base {base.describe()} (first: "
            f"{missing[0]}): {', '.join(terms)} could not be computed for them; they are kept unchanged")


def _apply(lora, job, recipe, base, out_dtype, options):
    spectra = job.spectra
    inputs = [s.path for s in lora.sources]
    folder = _output_folder(options.output_folder, lora.first)
    out = folder / _output_name(lora, recipe, job.spelling, options.to)
    pass_specs = [(k, t.dtype, tuple(t.shape)) for k, t in job.passthrough.items()]
    report = ResizeReport(lora.label(full=True), recipe.to_dict(), str(out), name=lora.label())

    def metadata_for(keep):
        ranks = [idx.numel() for idx in keep if idx is not None and idx.numel()]
        meta = adapter_metadata(job.metadata, spectra, keep, job.spelling, job.adapters)
        return {**_metadata(meta, recipe, spectra, keep, ranks), **lora.merge_metadata()}

    selection = Selection(spectra, recipe, base, pass_specs, lambda i, k: layer_specs(spectra[i], k, out_dtype),
                          metadata_for)
    keep = selection.choose()
    _report_selection(report, selection, recipe)
    if not any(idx.numel() for idx in keep):
        report.output, report.nothing_kept = None, True
        report.layers = [LayerChange(sp.name, sp.old_rank or sp.s.numel(), 0, 0.0) for sp in spectra]
        return report
    if out.exists():
        report.warnings.append(f"replaced the existing {out.name} (an earlier run's output of this LoRA and recipe)")
    report.layers = [LayerChange(sp.name, sp.old_rank or sp.s.numel(), idx.numel(),
                                 float(sp.s[idx].double().pow(2).sum()) / (float(sp.s.double().pow(2).sum()) or 1.0))
                     for sp, idx in zip(spectra, keep)]
    tensors = _tensors(job, keep, recipe, out_dtype, common_alpha(spectra, keep))
    if job.spelling.folder:
        report.size_bytes = write_peft_folder(out, tensors, metadata_for(keep), peft_config(spectra, keep, job.adapters),
                                              protect=inputs)
    else:
        report.size_bytes = write_file(out, tensors, metadata_for(keep), inputs)
    return report


def _tensors(job, keep, recipe, out_dtype, alpha):
    """The output's tensors, one at a time: the pass-through ones, then each kept layer's (`alpha`: the one
    value of its `X.alpha` tensors)."""
    yield from job.passthrough.items()
    for sp, idx in zip(job.spectra, keep):
        if idx.numel():
            yield from layer_tensors(sp, idx, recipe.rescale, out_dtype, alpha).items()


def _report_selection(report, selection, recipe):
    """The selection's threshold, score quantiles and size target, in the report."""
    if len(selection.all_scores):
        ordered = selection.all_scores.sort().values
        last = ordered.numel() - 1
        report.scores = [round(float(x), 4) for x in ordered]
        report.score_quantiles = {f"{int(q * 100)}%": float(ordered[round(q * last)])
                                  for q in (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)}
    report.threshold = selection.threshold
    if recipe.size is not None:
        report.size_target = int(recipe.size * 2**20)


def _input_dtype(path, token=None):
    """The dtype of the input's factors (any LoRA tensor but alpha), float16 when none is a float type."""
    from ..arch.lora_keys import is_lora_key
    from ..io.opener import open_checkpoint
    with open_checkpoint(path, token) as ckpt:
        for key in ckpt.keys():
            if is_lora_key(key) and not key.endswith(".alpha") and len(ckpt.shape(key)) >= 2:
                dtype = ckpt.dtype(key)
                if dtype in (torch.float16, torch.bfloat16, torch.float32):
                    return dtype
    return torch.float16


def _metadata(metadata, recipe, spectra, keep, ranks):
    meta = {k: v for k, v in metadata.items() if k not in ("sshs_model_hash", "sshs_legacy_hash")}
    alpha = common_alpha(spectra, keep)
    meta["ss_network_dim"] = str(ranks[0]) if len(set(ranks)) == 1 else "Dynamic"
    meta["ss_network_alpha"] = f"{alpha:g}" if alpha is not None else "Dynamic"
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
