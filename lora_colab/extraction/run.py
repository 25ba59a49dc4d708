"""One extraction run, told in the algorithm's stages: plan the targets → open and check the pair → per layer:
read the difference, factor (or collect for a recipe), write → finish (report, journal, output)."""

import math
import time
import zlib

from ..arch import resolve_format
from ..arch.canonical import nonfinite_error, open_canonical, pair
from ..dtypes import parse_dtype
from ..errors import Interrupted, LoraColabError, OptionError, WriteFault
from ..io.hub import pinned_run
from ..io.locations import file_name
from ..io.safetensors import planned_size
from ..lora.formats import build_metadata, piece_specs, piece_tensors, pieces
from ..lora.journal import Journal, identity_of, resumable_fault, show, worth_keeping
from ..lora.writer import SpillWriter, require_space
from ..lowrank.device import resolve_device
from ..lowrank.norm_cache import remember_norms
from ..memory import bound_heap, peak_rss_bytes, purge, vram_bytes
from ..progress import advance, progress_bar
from . import bias_diff as diffs
from .differences import READAHEAD_BYTES, Differences
from .layer import decompose_layer, factor_layer, finish_layer, layer_max_abs, piece_rows, piece_seed
from .recipe import RecipeExtraction
from .report import ExtractReport, LayerReport, layer_from_dict

_PURGE_BYTES = 32 << 20  # after a difference this large, purge (gc, malloc_trim, CUDA cache); else once a second


class ExtractionRun:
    """Extract a LoRA of (tuned − base) with checked `options` (ExtractOptions) into `out` (a checked
    .safetensors path); `notes`: lines said at once and kept in the report. `run()` returns the ExtractReport."""

    def __init__(self, base, tuned, out, options, token=None, progress=True, on_layer=None, arch=None, notes=()):
        self.sources, self.out, self.options = (base, tuned), out, options
        self.token, self.progress, self.on_layer, self.arch, self.notes = token, progress, on_layer, arch, list(notes)
        self.written = []  # ((rank, alpha), target) of every piece written
        self.folders = (None, None)  # the pipeline folders' DiffusersFolder (None: a file), once opened
        self.included = ()

    def run(self):
        started = time.perf_counter()
        self.device = resolve_device(self.options.device)
        bound_heap()
        base, tuned = self.sources
        with pinned_run(), open_canonical(base, self.arch, self.token) as b, \
                open_canonical(tuned, b.arch.name, self.token) as t:
            self.b, self.t = b, t
            self.folders = tuple(getattr(view.ckpt, "diffusers", None) for view in (b, t))  # pipeline folders' info
            self.included = tuple(getattr(b.arch, "others", ()))  # a pipeline's components in this file too
            self.plan()
            self.start_report()
            remaining = self.open_output()
            self.each_layer(remaining)
            self.report.bytes_read = b.ckpt.bytes_read + t.ckpt.bytes_read
            self.report.network_bytes = b.ckpt.network_bytes + t.ckpt.network_bytes
            if self.selecting is not None:  # after the count: the cache's key re-reads the headers
                remember_norms(b.ckpt.sources, self.selecting.base_norms())
        self.report.peak_rss = peak_rss_bytes()
        self.report.peak_vram = vram_bytes()[1]
        self.report.wall_seconds = time.perf_counter() - started
        return self.report

    # --- plan the targets, open and check the pair ------------------------------------------------

    def plan(self):
        """The pair's targets in the output format, each as the pieces it is written as, and the biases and
        norms to patch whole."""
        b, t, o = self.b, self.t, self.options
        _check_groups(b.arch, o.groups)
        self.fmt = resolve_format(b.arch, o.format)
        self.targets = b.arch.targets(b.shapes(), groups=set(o.groups), conv=o.conv_rank is not None,
                                      text_encoders=o.text_encoders)
        if not self.targets:
            raise LoraColabError(f"{b.path}: no LoRA targets found in this {b.detected.describe()} checkpoint")
        pair(b, t, self.targets)
        write_diffs, self.diff_note = diffs.choose(b.arch, self.fmt, o.bias_diff)
        self.diff_targets = diffs.diff_targets(b.arch, self.fmt, b, t) if write_diffs else []
        if self.diff_note and self.local:  # say it only where some bias or norm did change (remote: one request each)
            n_changed = diffs.changed(b.arch, b, t, o.min_diff)
            self.diff_note = self.diff_note.replace("(if any) ", f"({n_changed} changed) ") if n_changed else ""
        self.dtype = o.dtype or parse_dtype(b.arch.default_dtype)
        self.parts = {target.key: pieces(b.arch, self.fmt, target) for target in self.targets}

    @property
    def local(self):
        return all(s.local_path for s in self.b.ckpt.sources + self.t.ckpt.sources)

    def start_report(self):
        """The report, with the notices said at once (options that cannot do what they say here)."""
        b, t, o = self.b, self.t, self.options
        layouts = f" / {t.detected.layout}" if t.detected.layout != b.detected.layout else ""
        self.report = report = ExtractReport(
            base=b.path, tuned=t.path, architecture=b.detected.describe() + layouts, format=self.fmt,
            dtype=str(self.dtype).replace("torch.", ""), device=str(self.device), scale=o.scale)
        notices = _notices(b.arch, self.targets, o.rank, o.conv_rank) + self.notes
        report.warnings.extend(notices)
        show(notices, self.progress)  # at once, not only in the report at the end
        report.warnings.extend(b.notes + t.notes + b.arch.format_notes(self.fmt, o.groups))
        if self.diff_note:
            report.warnings.append(self.diff_note)
        if o.recipe is not None:
            report.recipe = o.recipe.text
            self.check_size_target()

    def open_output(self):
        """The writer (a journal when resuming), the recipe's collector, the space check and the layers a
        journal took back; returns the targets still to compute."""
        b, t, o = self.b, self.t, self.options
        protect = b.ckpt.local_files + t.ckpt.local_files
        if o.resume:
            identity = _run_identity(b, t, self.targets, o.identity(self.fmt, self.dtype))
            self.writer = Journal(self.out, identity, protect=protect, restart=o.restart)
        else:
            self.writer = SpillWriter(self.out, protect=protect)
        self.selecting = None
        if o.recipe is not None:
            self.selecting = RecipeExtraction(o.recipe, self.out, lambda piece: sum(
                math.prod(shape) for _, _, shape in self.specs(piece, 1) if len(shape) >= 2),
                journal=self.writer if o.resume else None)
        try:
            _check_space(self.out, self.parts, self.options, self.specs, o.recipe is not None,
                         self.writer._size if o.resume and not self.writer.shared else 0)
        except WriteFault:
            if o.resume and not self.writer.done:
                self.writer.discard()  # a journal that holds nothing
            else:
                self.writer.abort()
            raise
        if not o.resume:
            return self.targets
        remaining = _resume(self.writer, self.targets, self.parts, self.report, self.written, self.selecting)
        _say_resume(self.writer, self.report, self.total_pieces, self.progress)
        return remaining

    @property
    def total_pieces(self):
        return sum(len(p) for p in self.parts.values())

    # --- per layer: read the difference, factor or collect, write ----------------------------------

    def each_layer(self, remaining):
        """Read each remaining target's difference, factor and write its pieces, then finish; a journal that
        holds finished layers is kept on an interruption or a write fault."""
        remote = not self.local
        self.differences = Differences(self.b, self.t, remaining, self.device, READAHEAD_BYTES if remote else 0,
                                       keep_base=bool(self.selecting and self.selecting.needs))
        self.bar = progress_bar(self.total_pieces, self.progress)
        if self.bar is not None and len(self.report.layers):
            self.bar.update(len(self.report.layers))
        self.last_purge = time.perf_counter()
        try:
            for target, delta in self.differences:
                big = delta.numel() * delta.element_size() >= _PURGE_BYTES
                finished, written_before = len(self.report.layers), len(self.written)
                self.layer(target, delta)
                del delta  # before the purge: the only reference
                self.settle(target, big, finished, written_before)
            self.finish()
        except KeyboardInterrupt:
            if self.journal_keeps:
                raise Interrupted(f"interrupted; {self.out.name}.journal keeps {len(self.writer.done)} finished "
                                  f"layers of {len(self.targets)}: the same command resumes from there (--restart "
                                  f"starts over)") from None
            raise
        except WriteFault as exc:
            if self.journal_keeps:
                raise resumable_fault(exc, self.writer, f"{len(self.writer.done)} finished layers of "
                                                        f"{len(self.targets)}") from None
            if self.options.resume and not self.writer.shared:
                self.writer.discard()  # it holds no finished layer
            raise
        except BaseException as exc:
            if self.options.resume and not worth_keeping(exc):
                self.writer.discard()  # bad input: a rerun would meet it again
            raise
        finally:
            self.close()

    @property
    def journal_keeps(self):
        """Whether this run's own journal holds finished layers (the same command resumes from them)."""
        return self.options.resume and not self.writer.shared and bool(self.writer.done)

    def close(self):
        self.differences.close()
        self.writer.abort()
        if self.selecting is not None:
            self.selecting.close()
        if self.bar is not None:
            self.bar.close()

    def layer(self, target, delta):
        """One target's difference: each of its pieces factored (or collected) and written."""
        largest = layer_max_abs(delta)
        error = None
        if not math.isfinite(largest):
            error = nonfinite_error(self.b, self.t, target.key)
            if self.options.on_nonfinite != "skip":
                raise error
        for piece in self.parts[target.key]:
            layer = self.piece(piece, delta, largest, error)
            self.report.layers.append(layer)
            advance(self.bar, layer)
            if self.on_layer is not None:
                self.on_layer(layer)

    def settle(self, target, big, finished, written_before):
        """After a target: purge (after a large difference, else once a second) and journal its pieces (those
        from `finished` in the report, from `written_before` in what was written)."""
        if big or time.perf_counter() - self.last_purge >= 1.0:
            self.report.purge_seconds += purge(full=False).seconds
            self.last_purge = time.perf_counter()
        if self.options.resume:
            self.writer.commit(target.key, _record(self.report.layers[finished:], self.written[written_before:],
                                                   self.selecting))

    def piece(self, piece, delta, largest, error):
        """One piece of a target's difference: skipped (non-finite, too small), collected for the recipe, or
        factored and written; returns its LayerReport."""
        o, target = self.options, piece.target
        layer = LayerReport(piece.label, piece.shape)
        start = time.perf_counter()
        part = piece_rows(delta, piece)
        layer.max_abs_diff = largest if piece.whole or error else layer_max_abs(part)
        if error is not None:
            layer.skipped = f"NaN/Inf: {error}"
        elif layer.max_abs_diff <= o.min_diff:
            layer.skipped = f"max |difference| {layer.max_abs_diff:.3g} <= min_diff {o.min_diff:g}"
        elif self.selecting is not None:
            self.collect(piece, part, layer)
        else:
            up, down = factor_layer(part, o.cap(target), o.clamp_quantile, o.niter, o.oversample, o.energy,
                                    piece_seed(o.seed, piece), layer)
            self.write(piece, up, down, layer.rank)
        noise_sq = self.differences.noise_sq
        if noise_sq is not None and layer.diff_norm:
            share = (piece.rows[1] - piece.rows[0]) / target.shape[0]
            layer.quant_noise = math.sqrt(noise_sq * share) / layer.diff_norm
        layer.seconds = time.perf_counter() - start
        return layer

    def collect(self, piece, part, layer):
        """Decompose a piece to its cap and keep its directions for the recipe's selection after the pass."""
        o = self.options
        _, u, s, v, total_sq = decompose_layer(part, o.cap(piece.target), o.niter, o.oversample,
                                               piece_seed(o.seed, piece))
        base_rows = self.differences.base_weight
        if base_rows is not None:
            base_rows = base_rows.rows(*piece.rows)
        self.selecting.collect(piece, layer, u, s, v, total_sq, base_rows)
        layer.rank, layer.diff_norm = s.numel(), math.sqrt(total_sq)

    def write(self, piece, up, down, rank):
        """Add one piece's tensors, scaled so that alpha/rank · up @ down = scale × its kept difference."""
        alpha = self.options.alpha_for(piece.target, rank)
        c = math.sqrt(up.shape[1] / alpha * self.options.scale)
        for name, tensor in piece_tensors(piece, down * c, up * c, alpha, self.dtype).items():
            self.writer.add(name, tensor)
        self.written.append(((rank, alpha), piece.target))

    # --- finish: biases and norms, the recipe's selection, the file ---------------------------------

    def finish(self):
        report, o = self.report, self.options
        report.read_wait_seconds = self.differences.wait_seconds
        report.warnings.extend(_noise_notes(report, self.b, self.t, self.targets))
        _write_diffs(self.b, self.t, self.diff_targets, self.writer, self.dtype, o.scale, o.min_diff, report)
        if self.selecting is not None and self.selecting.layers:
            self.written = []
            self.write_selected()
        if self.written or (report.diffs and not report.nothing_selected):
            self.writer.finish(self.metadata(self.written), kohya_hashes=o.kohya_hashes)
            report.output, report.output_bytes = str(self.out), self.out.stat().st_size
        elif o.resume:
            self.writer.discard()

    def write_selected(self):
        """Choose the recipe's directions across the collected pieces and write them."""
        selecting, report = self.selecting, self.report
        fixed = [(name, self.dtype, (size,)) for name, size, _ in report.diffs]
        layers = selecting.layers

        def metadata_for(keep):
            return self.metadata([((idx.numel(), self.options.alpha_for(layer.target, idx.numel())), layer.target)
                                  for layer, idx in zip(layers, keep) if idx.numel()])

        keep = selecting.select(fixed, lambda i, k: self.specs(layers[i].piece, k), metadata_for,
                                self.options.kohya_hashes)
        report.threshold = selecting.selection.threshold
        report.directions = (sum(idx.numel() for idx in keep), sum(layer.s.numel() for layer in layers))
        if not report.directions[0]:
            report.nothing_selected = True
        for i, (layer, idx) in enumerate(zip(layers, keep)):
            if not idx.numel():  # the report shows what was kept: nothing, not the directions decomposed
                layer.report.rank, layer.report.skipped = 0, "the recipe kept none of its directions"
                continue
            u, s, v = selecting.directions(i, idx)
            up, down = finish_layer(u, s, v, layer.total_sq, self.options.clamp_quantile, layer.report)
            self.write(layer.piece, up, down, idx.numel())

    def specs(self, piece, rank):
        """(name, dtype, shape) of a piece's tensors at `rank`."""
        return piece_specs(piece, rank, self.dtype)

    def metadata(self, written):
        """The file's metadata for `written` ([((rank, alpha), target)])."""
        o, b = self.options, self.b
        linear = [ra for ra, target in written if target.kind != "conv"]
        conv = [ra for ra, target in written if target.kind == "conv"]
        extra = {"lora_colab.clamp_quantile": str(o.clamp_quantile), "lora_colab.scale": str(o.scale),
                 "lora_colab.bias_diff": str(len(self.report.diffs))}
        if o.recipe is not None:
            extra["lora_colab.recipe"] = o.recipe.text
        return build_metadata(b.arch, self.fmt, [r for r, _ in linear], [a for _, a in linear],
                              o.title or self.out.stem, [r for r, _ in conv], [a for _, a in conv], extra=extra,
                              comment=f"extracted by lora_colab from {file_name(b.path)} and {file_name(self.t.path)}")

    def check_size_target(self):
        """Refuse, before any reading, a size= target that not even a LoRA of no layers meets, or that no LoRA
        holding one direction of the smallest module meets."""
        recipe = self.options.recipe
        if recipe.size is None:
            return
        limit = recipe.size * 2**20
        if planned_size([], self.metadata([]), kohya_hashes=True) > limit:
            raise OptionError(f"recipe {recipe.text!r}: size={recipe.size:g} MiB is smaller than the file's header "
                              f"and metadata alone")
        least = min((p for ps in self.parts.values() for p in ps), key=lambda p: planned_size(self.specs(p, 1)))
        metadata = self.metadata([((1, self.options.alpha_for(least.target, 1)), least.target)])
        smallest = planned_size(self.specs(least, 1), metadata, kohya_hashes=True)
        if smallest > limit:
            raise OptionError(f"recipe {recipe.text!r}: size={recipe.size:g} MiB is smaller than the smallest LoRA "
                              f"of this model ({smallest / 1024:.1f} KiB: one direction of its smallest module)")


def _check_groups(arch, groups):
    for group in groups:
        if group not in arch.optional_groups:
            have = ", ".join(f"{g} ({what})" for g, what in arch.optional_groups.items()) or "none"
            raise OptionError(f"--include {group}: not an optional target group of {arch.title}; its groups: {have}")


def _notices(arch, targets, rank, conv_rank):
    """One-line notices for options that cannot do what they say on this model."""
    notes = []
    if arch.name == "generic":
        notes.append(f"architecture not recognised: the generic fallback took {len(targets)} weights (every 2-D "
                     f"weight outside norms and embeddings) and names them diffusion_model.<weight>, which ComfyUI's "
                     f"generic rule loads where these are its names for the model; diffusers and kohya's tools do "
                     f"not know it (a diffusers model given as its diffusers folder gets the spelling its pipeline "
                     f"loads)")
    if conv_rank is not None and not any(t.kind == "conv" for t in targets):
        notes.append(f"conv_rank {conv_rank} ignored: this {arch.title} model has no k×k convolutions to extract")
    full = max((min(t.shape[0], math.prod(t.shape[1:])) for t in targets if t.kind != "conv"), default=0)
    if full and rank > full:
        notes.append(f"rank {rank} is above every layer's full rank (at most {full}): each layer keeps its full "
                     f"rank, the file is as large as it can be")
    return notes


def _noise_notes(report, base, tuned, targets):
    """A line on the quantized inputs' rounding noise (estimated per layer), a warning when it is a large
    share of the differences: it is full rank, so it lowers the figures rather than the LoRA."""
    noisy = sorted((layer.quant_noise, layer.name) for layer in report.extracted if layer.quant_noise)
    if not noisy:
        return []
    kinds = [", ".join(sorted({d for t in targets[:64] for d in view.source_dtypes(t.key)})) for view in (tuned, base)]
    median, (worst, name) = noisy[len(noisy) // 2][0], noisy[-1]
    line = (f"quantization noise (tuned {kinds[0]}, base {kinds[1]}): rounding noise is an estimated "
            f"{median:.0%} of the difference's norm in the median layer, {worst:.0%} at worst ({name})")
    if median < 0.2:
        return [line]
    return [line + "; it is full rank, so the LoRA keeps the fine-tune's low-rank change and leaves most of it "
                   "out, but energy and error figures include it; a pair in one precision extracts cleaner"]


def _check_space(out, parts, options, specs_of, recipe, held):
    """Refuse before reading a layer a run whose journal and output cannot fit on the output's disk: the
    journal holds every factor at its cap (and, with a recipe, each piece's float32 directions), the output
    the same factors again while it is assembled from the journal; `held`: what the journal holds already."""
    specs, scratch = [], 0
    for target_parts in parts.values():
        for piece in target_parts:
            k = min(options.cap(piece.target), piece.shape[0], math.prod(piece.shape[1:]))
            specs += specs_of(piece, k)
            if recipe:
                scratch += (piece.shape[0] + math.prod(piece.shape[1:]) + 1) * k * 4
    output = planned_size(specs)
    journal = output + scratch
    require_space(out, max(0, journal - held) + output,
                  [("journal", journal - min(held, journal)), ("output while it is assembled", output)])


def _write_diffs(base, tuned, targets, writer, dtype, scale, min_diff, report):
    """Write each changed bias and 1-D weight whole (`.diff_b`/`.diff`); unchanged ones (max |Δ| <= min_diff)
    are left out. Listed in report.diffs as (name, size, max |Δ|)."""
    for target in targets:
        delta = diffs.difference(base, tuned, target, scale)
        largest = float(delta.abs().max()) if delta.numel() else 0.0
        if largest <= min_diff or largest == 0.0:
            continue
        writer.add(target.name, delta.to(dtype).contiguous())
        report.diffs.append((target.name, target.size, largest))


def _run_identity(base, tuned, targets, options):
    """What the journal's records depend on: both inputs' content and the options that change a layer."""
    keys = "\n".join(target.key for target in targets).encode()
    return {"run": "extract", "version": 1, "base": identity_of(base.ckpt.sources),
            "tuned": identity_of(tuned.ckpt.sources), "options": options,
            "targets": f"{len(targets)}:{zlib.crc32(keys):08x}"}


def _record(layers, written, selecting):
    """A finished target's journal info: its pieces' reports, the (rank, alpha) of each piece it wrote
    (`written`: this target's entries) and (with a recipe) what the selection needs of each piece collected."""
    info = {"layers": [layer.to_dict() for layer in layers], "written": [list(ra) for ra, _ in written]}
    if selecting is not None:
        info["collected"] = selecting.journal_info()
    return info


def _resume(journal, targets, parts, report, written, selecting):
    """Take back the journal's finished targets (reports, written pieces, a recipe's collected layers);
    returns the targets still to compute."""
    remaining = []
    for target in targets:
        info = journal.done.get(target.key)
        if info is None:
            remaining.append(target)
            continue
        layers = [layer_from_dict(d) for d in info["layers"]]
        report.layers.extend(layers)
        written.extend(((rank, a), target) for rank, a in info["written"])
        if selecting is not None:
            by_label = {layer.name: layer for layer in layers}
            for piece in parts[target.key]:
                if piece.label in (info.get("collected") or {}):
                    selecting.restore(piece, by_label[piece.label], info["collected"][piece.label])
    return remaining


def _say_resume(journal, report, total, progress):
    """The journal's notes (resuming, or starting over and why) in the report, and shown at once."""
    report.warnings.extend(journal.notes)
    report.resumed = len(report.layers) if journal.done else 0
    notes = list(journal.notes)
    if report.resumed:
        notes.append(f"resuming from layer {report.resumed + 1} of {total}: {report.resumed} finished layers "
                     f"taken from {journal.spill_path.name}")
    show(notes, progress)
