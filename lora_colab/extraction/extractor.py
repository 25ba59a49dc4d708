"""LoRA extraction: low-rank SVD of (tuned − base), one layer at a time, in bounded memory. `extract` is the door:
it checks the options (`options.ExtractOptions`) and the output path, then runs an `run.ExtractionRun`."""

from dataclasses import replace

from .components import component_output, paired_components
from .options import ExtractOptions, check_output_file, with_suffix  # noqa: F401 (check_output_file: the CLI's)
from .run import ExtractionRun


def extract(base, tuned, out, rank=None, alpha=None, clamp_quantile=0.99, conv_rank=None, conv_alpha=None,
            text_encoders=True, min_diff=0.0, format="auto", dtype=None, device="auto", niter=2, oversample=8,
            energy=None, scale=1.0, groups=(), arch=None, seed=0, progress=True, on_layer=None,
            kohya_hashes=True, title=None, on_nonfinite="stop", token=None, bias_diff=None, recipe=None,
            resume=True, restart=False):
    """Extract a LoRA from two checkpoints of one architecture; returns an ExtractReport.

    base, tuned: a path, URL or Hub source `open_checkpoint` takes (layouts may differ; remote files are read in
    place by range; `token` is sent to plain URLs' own hosts). out: the .safetensors to write. rank/alpha: linear
    rank (default 32) and alpha (alpha=None means alpha=rank); the factors are scaled so that alpha/rank · up @ down
    equals `scale` × the rank-r difference. conv_rank/conv_alpha: LoCon for k×k convolutions (off when conv_rank is
    None). clamp_quantile: scale rows of up and columns of down whose norm exceeds this quantile of their norms down
    to it (None or 1.0: off). energy: per-layer adaptive rank, the smallest rank ≤ `rank` keeping this fraction of
    ‖ΔW‖². min_diff: layers whose |ΔW| never exceeds it are skipped. groups: optional target groups ("adaln",
    "modulation"). arch: read both as this family (`flux`, `chroma`...: see docs/models.md) where their keys fit
    more than one; default: detected. on_layer(LayerReport): called after each layer. on_nonfinite: "stop" (default)
    raises on a layer with NaN/Inf, naming the file and tensor; "skip" leaves the layer out and lists it in the
    report. bias_diff: write the changed biases and 1-D weights (norm scales) as `.diff_b`/`.diff` patches; None
    (default) does where every client of the format loads them (the comfy format of most models; the report says
    when they are left out). recipe: choose each layer's rank with the resizer's grammar ("spn_ckpt=1,size=50",
    "fro_ckpt=1,thr=-2.5", "sv_fro=0.9"...), relative to the base's own weights, from each layer's top `rank`
    directions, in the same one pass. resume: keep each finished layer in a journal beside `out` (`OUT.journal`), so
    the same call after an interruption (Ctrl-C, a killed process, a lost runtime) continues where it stopped; a run
    whose inputs or options changed starts over, saying why. restart=True: start over even so.

    A pair of pipeline folders whose pipeline loads some model's LoRA only from a file of its own (Wan 2.2 A14B's
    low-noise expert, `transformer_2`), or whose text encoders the family's file does not hold (Flux.1's CLIP-L,
    SD3.5's), also gets `OUT_<component>.safetensors` for each that changed, its report in `report.components`.
    """
    options = ExtractOptions.checked(
        rank=rank, alpha=alpha, clamp_quantile=clamp_quantile, conv_rank=conv_rank, conv_alpha=conv_alpha,
        text_encoders=text_encoders, min_diff=min_diff, format=format, dtype=dtype, device=device, niter=niter,
        oversample=oversample, energy=energy, scale=scale, groups=groups, seed=seed, kohya_hashes=kohya_hashes,
        title=title, on_nonfinite=on_nonfinite, bias_diff=bias_diff, recipe=recipe, resume=resume, restart=restart)
    out, renamed = with_suffix(check_output_file(out))
    run = ExtractionRun(base, tuned, out, options, token=token, progress=progress, on_layer=on_layer, arch=arch,
                        notes=[renamed] if renamed else [])
    report = run.run()
    components, notes = paired_components(*run.folders, run.included, options.text_encoders)
    report.warnings.extend(notes)
    spelled = replace(options, format="auto", bias_diff=None)  # the names the pipeline's loader takes
    for component, (b, t) in components.items():  # each its own file (a text encoder, Wan 2.2's transformer_2)
        report.components[component] = ExtractionRun(b, t, component_output(out, component), spelled, token=token,
                                                     progress=progress, on_layer=on_layer).run()
    return report
