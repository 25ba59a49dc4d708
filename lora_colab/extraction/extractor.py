"""LoRA extraction: low-rank SVD of (tuned − base), one layer at a time, in bounded memory."""

import math
import os
import time
import zlib
from pathlib import Path


from ..arch import resolve_format
from ..arch.canonical import nonfinite_error, open_canonical, pair
from ..dtypes import parse_dtype
from ..errors import Interrupted, LoraColabError, OptionError, WriteFault
from ..io.hub import pinned_run
from ..io.locations import file_name
from ..lora.formats import build_metadata, piece_specs, piece_tensors, pieces
from ..lora.journal import Journal, identity_of, resumable_fault, show, worth_keeping
from ..io.safetensors import planned_size
from ..lora.writer import SpillWriter, require_space
from ..lowrank.device import resolve_device
from ..lowrank.norm_cache import remember_norms
from ..memory import bound_heap, peak_rss_bytes, purge, vram_bytes
from ..progress import advance, progress_bar
from . import bias_diff as diffs
from .differences import READAHEAD_BYTES, Differences
from .layer import decompose_layer, factor_layer, finish_layer, layer_max_abs, piece_rows, piece_seed
from .recipe import RecipeExtraction, parse_extract_recipe
from .report import ExtractReport, LayerReport, layer_from_dict

_PURGE_BYTES = 32 << 20  # after a difference this large, purge (gc, malloc_trim, CUDA cache); else once a second


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


def _check_options(rank, alpha, clamp_quantile, energy, on_nonfinite, scale, conv_rank, conv_alpha, min_diff,
                   niter, oversample):
    """Refuse option values that would crash later or write a useless file; one line naming the option."""
    def positive_int(name, value, zero=False):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero else 1):
            raise OptionError(f"{name} must be a {'non-negative' if zero else 'positive'} integer, got {value!r}")

    positive_int("rank", rank)
    if conv_rank is not None:
        positive_int("conv_rank", conv_rank)
    positive_int("niter", niter, zero=True)
    positive_int("oversample", oversample, zero=True)
    for name, value in (("alpha", alpha), ("conv_alpha", conv_alpha)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise OptionError(f"{name} must be a finite number > 0, got {value}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise OptionError(f"scale must be a finite number > 0 (1 = the full difference, 0.5 = half strength), "
                          f"got {scale}")
    if clamp_quantile is not None and not 0.5 <= clamp_quantile <= 1.0:
        raise OptionError(f"clamp_quantile must be in [0.5, 1.0] (or None), got {clamp_quantile}")
    if on_nonfinite not in ("stop", "skip"):
        raise OptionError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise OptionError(f"energy must be in (0, 1], got {energy}")
    if not (math.isfinite(min_diff) and min_diff >= 0):
        raise OptionError(f"min_diff must be >= 0, got {min_diff}")


def check_output_file(out, what="output"):
    """The path to write a file at: refused at once (before any input is read) when it is a folder or
    lies under a file."""
    out = Path(os.fspath(out)).expanduser()
    if out.is_dir():
        raise OptionError(f"{out}: is a folder; the {what} is a file, e.g. {out / 'lora.safetensors'}")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise OptionError(f"{out}: {parent} is a file, not a folder")
    return out


def _with_suffix(out):
    """(`out` ending in .safetensors, a note when the suffix was added): ComfyUI, A1111/Forge and diffusers
    list and load only .safetensors files."""
    if out.suffix.lower() == ".safetensors":
        return out, None
    named = out.with_name(out.name + ".safetensors")
    return named, f"{out.name} has no .safetensors suffix, which the clients look for: writing {named.name}"


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


def extract(base, tuned, out, rank=None, alpha=None, clamp_quantile=0.99, conv_rank=None, conv_alpha=None,
            text_encoders=True, min_diff=0.0, format="auto", dtype=None, device="auto", niter=2, oversample=8,
            energy=None, scale=1.0, groups=(), arch=None, seed=0, progress=True, on_layer=None,
            kohya_hashes=True, title=None, on_nonfinite="stop", token=None, bias_diff=None, recipe=None,
            resume=True, restart=False):
    """Extract a LoRA from two checkpoints of one architecture; returns an ExtractReport.

    base, tuned: a path, URL or Hub source `open_checkpoint` takes (layouts may differ; remote files are
    read in place by range; `token` is sent to plain URLs' own hosts). out: the .safetensors to write.
    rank/alpha: linear rank (default 32) and alpha (alpha=None means alpha=rank); the factors are scaled so that
    alpha/rank · up @ down equals `scale` × the rank-r difference. conv_rank/conv_alpha: LoCon for k×k
    convolutions (off when conv_rank is None). clamp_quantile: scale rows of up and columns of down whose
    norm exceeds this quantile of their norms down to it (None or 1.0: off). energy: per-layer adaptive rank, the smallest rank ≤ `rank` keeping this
    fraction of ‖ΔW‖². min_diff: layers whose |ΔW| never exceeds it are skipped. groups: optional target
    groups ("adaln", "modulation"). on_layer(LayerReport): called after each layer. on_nonfinite: "stop"
    (default) raises on a layer with NaN/Inf, naming the file and tensor; "skip" leaves the layer out and
    lists it in the report. bias_diff: write the changed biases and 1-D weights (norm scales) as
    `.diff_b`/`.diff` patches; None (default) does where every client of the format loads them (the comfy
    format of most models; the report says when they are left out). recipe: choose each layer's rank with
    the resizer's grammar ("spn_ckpt=1,size=50", "fro_ckpt=1,thr=-2.5", "sv_fro=0.9"...), relative to the
    base's own weights, from each layer's top `rank` directions, in the same one pass.
    resume: keep each finished layer in a journal beside `out` (`OUT.journal`), so the same call after an
    interruption (Ctrl-C, a killed process, a lost runtime) continues where it stopped; a run whose inputs
    or options changed starts over, saying why. restart=True: start over even so.
    """
    started = time.perf_counter()
    recipe_obj = None
    if recipe:
        recipe_obj, rank = parse_extract_recipe(recipe, rank, energy)
    rank = 32 if rank is None else rank
    _check_options(rank, alpha, clamp_quantile, energy, on_nonfinite, scale, conv_rank, conv_alpha, min_diff,
                   niter, oversample)
    out_dtype = parse_dtype(dtype)
    out, renamed = _with_suffix(check_output_file(out))
    device = resolve_device(device)
    bound_heap()
    with pinned_run(), open_canonical(base, token=token) as b, open_canonical(tuned, b.arch.name, token) as t:
        _check_groups(b.arch, groups)
        fmt = resolve_format(b.arch, format)
        targets = b.arch.targets(b.shapes(), groups=set(groups), conv=conv_rank is not None,
                                 text_encoders=text_encoders)
        if not targets:
            raise LoraColabError(f"{b.path}: no LoRA targets found in this {b.detected.describe()} checkpoint")
        pair(b, t, targets)
        write_diffs, diff_note = diffs.choose(b.arch, fmt, bias_diff)
        diff_targets = diffs.diff_targets(b.arch, fmt, b, t) if write_diffs else []
        local = all(s.local_path for s in b.ckpt.sources + t.ckpt.sources)
        if diff_note and local:  # say it only where some bias or norm did change (remote: one request each)
            n_changed = diffs.changed(b.arch, b, t, min_diff)
            diff_note = diff_note.replace("(if any) ", f"({n_changed} changed) ") if n_changed else ""
        out_dtype = out_dtype or parse_dtype(b.arch.default_dtype)
        report = ExtractReport(base=b.path, tuned=t.path, architecture=b.detected.describe()
                               + (f" / {t.detected.layout}" if t.detected.layout != b.detected.layout else ""),
                               format=fmt, dtype=str(out_dtype).replace("torch.", ""), device=str(device),
                               scale=scale)
        notices = _notices(b.arch, targets, rank, conv_rank) + ([renamed] if renamed else [])
        report.warnings.extend(notices)
        show(notices, progress)  # at once, not only in the report at the end
        report.warnings.extend(b.notes + t.notes + b.arch.format_notes(fmt, groups))
        if diff_note:
            report.warnings.append(diff_note)
        parts = {target.key: pieces(b.arch, fmt, target) for target in targets}

        def specs_of(piece, k):
            return piece_specs(piece, k, out_dtype)

        def metadata_of(ranks):
            linear = [ra for ra, target in ranks if target.kind != "conv"]
            conv = [ra for ra, target in ranks if target.kind == "conv"]
            extra = {"lora_colab.clamp_quantile": str(clamp_quantile), "lora_colab.scale": str(scale),
                     "lora_colab.bias_diff": str(len(report.diffs))}
            if recipe_obj is not None:
                extra["lora_colab.recipe"] = recipe_obj.text
            return build_metadata(b.arch, fmt, [r for r, _ in linear], [a for _, a in linear], title or out.stem,
                                  [r for r, _ in conv], [a for _, a in conv], extra=extra,
                                  comment=f"extracted by lora_colab from {file_name(b.path)} and {file_name(t.path)}")

        def alpha_of(target, r):
            """The alpha given, else one value for the whole file (the rank cap): diffusers drops per-module
            alphas of kohya SD/SDXL files whose ranks differ (see resizing.output.common_alpha)."""
            given = (conv_alpha if target.kind == "conv" else alpha) or None
            return float(given if given is not None else (rank or r))

        selecting = None
        if recipe_obj is not None:
            report.recipe = recipe_obj.text
            least = min((p for ps in parts.values() for p in ps), key=lambda p: planned_size(specs_of(p, 1)))
            _check_size_target(recipe_obj, metadata_of, (specs_of(least, 1), metadata_of(
                [((1, alpha_of(least.target, 1)), least.target)])))
        protect = b.ckpt.local_files + t.ckpt.local_files
        if resume:
            writer = Journal(out, _run_identity(b, t, targets, dict(
                rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha, clamp_quantile=clamp_quantile,
                energy=energy, min_diff=min_diff, format=fmt, dtype=str(out_dtype), niter=niter,
                oversample=oversample, seed=seed, scale=scale, groups=sorted(groups), text_encoders=text_encoders,
                recipe=recipe_obj.text if recipe_obj else None)),
                protect=protect, restart=restart)
        else:
            writer = SpillWriter(out, protect=protect)
        if recipe_obj is not None:
            selecting = RecipeExtraction(recipe_obj, out, lambda piece: sum(
                math.prod(shape) for _, _, shape in specs_of(piece, 1) if len(shape) >= 2),
                journal=writer if resume else None)
        written = []  # ((rank, alpha), target) of every piece written
        try:
            _check_space(out, parts, rank, conv_rank, specs_of, recipe_obj is not None,
                         writer._size if resume and not writer.shared else 0)
        except WriteFault:
            if resume and not writer.done:
                writer.discard()  # a journal that holds nothing
            else:
                writer.abort()
            raise
        remaining = _resume(writer, targets, parts, report, written, selecting) if resume else targets
        total_pieces = sum(len(p) for p in parts.values())
        if resume:
            _say_resume(writer, report, total_pieces, progress)
        remote = any(not s.local_path for s in b.ckpt.sources + t.ckpt.sources)
        differences = Differences(b, t, remaining, device, READAHEAD_BYTES if remote else 0,
                                   keep_base=bool(selecting and selecting.needs))
        bar = progress_bar(total_pieces, progress)
        if bar is not None and len(report.layers):
            bar.update(len(report.layers))
        last_purge = time.perf_counter()
        try:
            for target, delta in differences:
                finished, written_before = len(report.layers), len(written)
                layer_rank = conv_rank if target.kind == "conv" else rank
                largest = layer_max_abs(delta)
                error = None
                if not math.isfinite(largest):
                    error = nonfinite_error(b, t, target.key)
                    if on_nonfinite != "skip":
                        raise error
                for piece in parts[target.key]:
                    layer = LayerReport(piece.label, piece.shape)
                    piece_start = time.perf_counter()
                    part = piece_rows(delta, piece)
                    layer.max_abs_diff = largest if piece.whole or error else layer_max_abs(part)
                    if error is not None:
                        layer.skipped = f"NaN/Inf: {error}"
                    elif layer.max_abs_diff <= min_diff:
                        layer.skipped = f"max |difference| {layer.max_abs_diff:.3g} <= min_diff {min_diff:g}"
                    elif selecting is not None:
                        flat, u, s, v, total_sq = decompose_layer(part, layer_rank, niter, oversample,
                                                                  piece_seed(seed, piece))
                        base_rows = differences.base_weight
                        if base_rows is not None:
                            base_rows = base_rows.rows(*piece.rows)
                        selecting.collect(piece, layer, u, s, v, total_sq, base_rows)
                        layer.rank, layer.diff_norm = s.numel(), math.sqrt(total_sq)
                        del flat, u, s, v
                    else:
                        up, down = factor_layer(part, layer_rank, clamp_quantile, niter, oversample, energy,
                                                piece_seed(seed, piece), layer)
                        a = alpha_of(target, layer.rank)
                        _write_piece(writer, piece, up, down, a, scale, out_dtype)
                        written.append(((layer.rank, a), target))
                        del up, down
                    if differences.noise_sq is not None and layer.diff_norm:
                        share = (piece.rows[1] - piece.rows[0]) / target.shape[0]
                        layer.quant_noise = math.sqrt(differences.noise_sq * share) / layer.diff_norm
                    del part
                    layer.seconds = time.perf_counter() - piece_start
                    report.layers.append(layer)
                    advance(bar, layer)
                    if on_layer is not None:
                        on_layer(layer)
                big = delta.numel() * delta.element_size() >= _PURGE_BYTES
                del delta
                if big or time.perf_counter() - last_purge >= 1.0:
                    report.purge_seconds += purge(full=False).seconds
                    last_purge = time.perf_counter()
                if resume:
                    writer.commit(target.key, _record(report.layers[finished:], written[written_before:], selecting))
            report.read_wait_seconds = differences.wait_seconds
            report.warnings.extend(_noise_notes(report, b, t, targets))
            _write_diffs(b, t, diff_targets, writer, out_dtype, scale, min_diff, report)
            if selecting is not None and selecting.layers:
                written = _write_selected(selecting, writer, specs_of, metadata_of, alpha_of, report,
                                          clamp_quantile, scale, out_dtype, kohya_hashes)
            if written or (report.diffs and not report.nothing_selected):
                writer.finish(metadata_of(written), kohya_hashes=kohya_hashes)
                report.output, report.output_bytes = str(out), out.stat().st_size
            elif resume:
                writer.discard()
        except KeyboardInterrupt:
            if resume and not writer.shared and writer.done:
                raise Interrupted(f"interrupted; {out.name}.journal keeps {len(writer.done)} finished layers of "
                                  f"{len(targets)}: the same command resumes from there (--restart starts over)") \
                    from None
            raise
        except WriteFault as exc:
            if resume and not writer.shared and writer.done:
                raise resumable_fault(exc, writer, f"{len(writer.done)} finished layers of {len(targets)}") from None
            if resume and not writer.shared:
                writer.discard()  # it holds no finished layer
            raise
        except BaseException as exc:
            if resume and not worth_keeping(exc):
                writer.discard()  # bad input: a rerun would meet it again
            raise
        finally:
            differences.close()
            writer.abort()
            if selecting is not None:
                selecting.close()
            if bar is not None:
                bar.close()
        report.bytes_read = b.ckpt.bytes_read + t.ckpt.bytes_read
        report.network_bytes = b.ckpt.network_bytes + t.ckpt.network_bytes
        if selecting is not None:  # after the count: the cache's key re-reads the headers
            remember_norms(b.ckpt.sources, selecting.base_norms())
    report.peak_rss = peak_rss_bytes()
    report.peak_vram = vram_bytes()[1]
    report.wall_seconds = time.perf_counter() - started
    return report


def _check_space(out, parts, rank, conv_rank, specs_of, recipe, held):
    """Refuse before reading a layer a run whose journal and output cannot fit on the output's disk: the
    journal holds every factor at its cap (and, with a recipe, each piece's float32 directions), the output
    the same factors again while it is assembled from the journal; `held`: what the journal holds already."""
    specs, scratch = [], 0
    for target_parts in parts.values():
        for piece in target_parts:
            cap = conv_rank if piece.target.kind == "conv" else rank
            k = min(cap, piece.shape[0], math.prod(piece.shape[1:]))
            specs += specs_of(piece, k)
            if recipe:
                scratch += (piece.shape[0] + math.prod(piece.shape[1:]) + 1) * k * 4
    output = planned_size(specs)
    journal = output + scratch
    require_space(out, max(0, journal - held) + output,
                  [("journal", journal - min(held, journal)), ("output while it is assembled", output)])


def _write_piece(writer, piece, up, down, alpha, scale, dtype):
    """Add one piece's tensors, scaled so that alpha/rank · up @ down = scale × its kept difference."""
    c = math.sqrt(up.shape[1] / alpha * scale)
    for name, tensor in piece_tensors(piece, down * c, up * c, alpha, dtype).items():
        writer.add(name, tensor)


def _check_size_target(recipe, metadata_of, smallest):
    """Refuse, before any reading, a size= target that not even a LoRA of no layers meets, or that no LoRA
    holding one direction of the smallest module (`smallest`: (specs, metadata) of it) meets."""
    if recipe.size is None:
        return
    limit = recipe.size * 2**20
    if planned_size([], metadata_of([]), kohya_hashes=True) > limit:
        raise OptionError(f"recipe {recipe.text!r}: size={recipe.size:g} MiB is smaller than the file's header "
                          f"and metadata alone")
    least = planned_size(*smallest, kohya_hashes=True)
    if least > limit:
        raise OptionError(f"recipe {recipe.text!r}: size={recipe.size:g} MiB is smaller than the smallest LoRA of "
                          f"this model ({least / 1024:.1f} KiB: one direction of its smallest module)")


def _write_selected(selecting, writer, specs_of, metadata_of, alpha_of, report, clamp_quantile, scale, dtype,
                    kohya_hashes):
    """Choose the recipe's directions across the collected pieces and write them; returns what was written."""
    fixed = [(name, dtype, (size,)) for name, size, _ in report.diffs]
    layers = selecting.layers

    def metadata_for(keep):
        return metadata_of([((idx.numel(), alpha_of(layer.target, idx.numel())), layer.target)
                            for layer, idx in zip(layers, keep) if idx.numel()])

    keep = selecting.select(fixed, lambda i, k: specs_of(layers[i].piece, k), metadata_for, kohya_hashes)
    selection = selecting.selection
    report.threshold = selection.threshold
    report.directions = (sum(idx.numel() for idx in keep), sum(layer.s.numel() for layer in layers))
    if not report.directions[0]:
        report.nothing_selected = True
        for layer in layers:  # the report shows what was kept: nothing, not the directions decomposed
            layer.report.rank, layer.report.skipped = 0, "the recipe kept none of its directions"
        return []
    written = []
    for i, (layer, idx) in enumerate(zip(layers, keep)):
        if not idx.numel():
            layer.report.rank = 0
            layer.report.skipped = "the recipe kept none of its directions"
            continue
        u, s, v = selecting.directions(i, idx)
        up, down = finish_layer(u, s, v, layer.total_sq, clamp_quantile, layer.report)
        a = alpha_of(layer.target, idx.numel())
        _write_piece(writer, layer.piece, up, down, a, scale, dtype)
        written.append(((idx.numel(), a), layer.target))
    return written


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
