"""Summaries of a checkpoint for `lora-colab inspect`."""

from collections import Counter

from ..io.checkpoint import ShardedCheckpoint
from ..arch.canonical import CanonicalCheckpoint
from ..memory import fmt_bytes
from .spellings import detect
from .spellings.adapter_config import read_metadata


def _target_counts(ckpt):
    view = CanonicalCheckpoint(ckpt)
    shapes = view.shapes()
    counts = {"default": len(view.arch.targets(shapes))}
    for group in view.arch.optional_groups:
        counts[group] = len(view.arch.targets(shapes, groups={group})) - counts["default"]
    conv = len(view.arch.targets(shapes, conv=True)) - counts["default"]
    if conv:
        counts["conv"] = conv
    return view.detected.describe(), counts


def lora_spelling(layers, metadata=None):
    """Who wrote a LoRA, as its names and metadata tell (kohya, musubi-tuner, LyCORIS, OneTrainer, ComfyUI,
    ai-toolkit, DiffSynth-Studio, diffusers, PEFT), and which clients load it as it is."""
    spelling = detect(layers, metadata or {})
    return f"{spelling.title}: loads in {', '.join(spelling.clients)}"


def _alphas(layers, ckpt, meta):
    """{alpha: count} from the `X.alpha` tensors, else what PEFT's adapter config says."""
    alphas = Counter()
    for layer in layers.values():
        if "alpha" in layer.tensors:
            alphas[f"{float(ckpt.read(layer.tensors['alpha']).float().reshape(-1)[0]):g}"] += 1
    if alphas:
        return dict(alphas.most_common())
    configs = read_metadata(meta)
    if configs:
        return {f"{(prefix + ': ') if prefix else ''}r={c.r:g}, lora_alpha={c.lora_alpha:g}"
                f"{' (rslora)' if c.use_rslora else ''}{' + patterns' if c.rank_pattern or c.alpha_pattern else ''}"
                f" (adapter metadata)": 1 for prefix, c in configs.items()}
    return {"none (scale 1)": len(layers)}


def summarize_lora(ckpt):
    """A dict describing a LoRA file: spelling, module count, kinds, ranks, alphas, the base it names."""
    from ..arch import guess_lora_arch
    from ..arch.lora_keys import scan_layers

    layers, other = scan_layers(ckpt.keys())
    ranks = Counter()
    for layer in layers.values():
        for role in ("down", "hada_w1_b", "lokr_w2_b"):
            if role in layer.tensors and ckpt.shape(layer.tensors[role]):
                ranks[ckpt.shape(layer.tensors[role])[0]] += 1
                break
    meta = ckpt.metadata
    named = {k: meta[k] for k in ("ss_base_model_version", "modelspec.architecture", "ss_sd_model_name",
                                  "ss_output_name", "modelspec.title") if meta.get(k)}
    return {
        "path": ckpt.path,
        "kind": "LoRA",
        "read": _where(ckpt),
        "files": len(ckpt.files),
        "tensors": len(ckpt),
        "dtypes": dict(Counter(ckpt.st_dtype(k) for k in ckpt.keys()).most_common()),
        "total_bytes": ckpt.total_bytes,
        "file_bytes": sum(source.size for source in ckpt.sources),
        "spelling": lora_spelling(layers, meta),
        "modules": len(layers),
        "layer_kinds": dict(Counter(layer.kind for layer in layers.values()).most_common()),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "alphas": _alphas(layers, ckpt, meta),
        "other_tensors": len(other),
        "architecture": guess_lora_arch(list(layers), meta),
        "base_model": named,
        "metadata": dict(meta),
    }


def summarize(ckpt):
    """A dict describing `ckpt`: tensors, dtypes, size, metadata, files, detected layout and LoRA targets
    (for a LoRA file: see summarize_lora)."""
    from ..arch.lora_keys import looks_like_lora

    if looks_like_lora(ckpt.keys()):
        return summarize_lora(ckpt)
    dtypes = Counter(ckpt.st_dtype(k) for k in ckpt.keys())
    detected, targets = _target_counts(ckpt)
    return {
        "path": ckpt.path,
        "kind": "checkpoint",
        "read": _where(ckpt),
        "files": len(ckpt.files),
        "storage": ("sharded index" if isinstance(ckpt, ShardedCheckpoint) else
                    f"GGUF ({getattr(ckpt, 'architecture', '') or 'no architecture named'})"
                    if ckpt.path.lower().endswith(".gguf") else "single file"),
        "tensors": len(ckpt),
        "dtypes": dict(dtypes.most_common()),
        "total_bytes": ckpt.total_bytes,
        "file_bytes": sum(source.size for source in ckpt.sources),
        "detected": detected,
        "lora_targets": targets,
        "metadata": dict(ckpt.metadata),
    }


def _where(ckpt):
    remote = sum(1 for source in ckpt.sources if not source.local_path)
    return "in place over the network (by range)" if remote else "local disk"


def describe_checkpoint(source, token=None):
    """One line: what `source` is (architecture or LoRA), its size and files, and how it is read."""
    from ..io.opener import open_checkpoint
    from ..io.hub import pinned_run

    with pinned_run(), open_checkpoint(source, token) as ckpt:
        summary = summarize(ckpt)
    size = f"{summary['total_bytes'] / 1e9:.2f} GB in {summary['files']} file{'s' if summary['files'] != 1 else ''}"
    what = (f"a LoRA for {summary['architecture']}, {summary['modules']} modules" if summary["kind"] == "LoRA"
            else summary["detected"])
    return f"{summary['path']}: {what}, {size}, read {summary['read']}"


def _counts(counts):
    return ", ".join(f"{value} x{n}" for value, n in counts.items()) or "-"


def format_summary(summary, max_meta_chars=200):
    """Human-readable lines for a summary dict."""
    dtypes = ", ".join(f"{name} x{count}" for name, count in summary["dtypes"].items())
    if summary.get("kind") == "LoRA":
        lines = [
            f"path:      {summary['path']} (read {summary['read']})",
            f"kind:      LoRA for {summary['architecture']}, {summary['modules']} modules "
            f"({_counts(summary['layer_kinds'])})",
            f"spelling:  {summary['spelling']}",
            f"ranks:     {_counts(summary['ranks'])}",
            f"alphas:    {_counts(summary['alphas'])}",
            "base:      " + (", ".join(f"{k}={v}" for k, v in summary["base_model"].items()) or "not named in metadata"),
            f"tensors:   {summary['tensors']}" + (f" ({summary['other_tensors']} not LoRA layers)"
                                                  if summary["other_tensors"] else ""),
            f"dtypes:    {dtypes or '-'}",
            _size_line(summary),
        ]
        return lines + _metadata_lines(summary, max_meta_chars)
    lines = [
        f"path:      {summary['path']} (read {summary['read']})",
        f"storage:   {summary['storage']} ({summary['files']} file{'s' if summary['files'] != 1 else ''})",
        f"detected:  {summary['detected']}",
        "targets:   " + ", ".join(f"{n} {k}" for k, n in summary["lora_targets"].items()),
        f"tensors:   {summary['tensors']}",
        f"dtypes:    {dtypes or '-'}",
        _size_line(summary),
    ]
    return lines + _metadata_lines(summary, max_meta_chars)


def _size_line(summary):
    """The files' size in a unit that fits (a 40 KiB LoRA is not '0.00 GiB'), and the tensors' share."""
    files = summary.get("file_bytes", summary["total_bytes"])
    return (f"size:      {fmt_bytes(files)} ({files:,} bytes on disk; tensors {summary['total_bytes']:,} bytes, "
            f"the rest header and metadata)")


def _metadata_lines(summary, max_meta_chars):
    lines = []
    if summary["metadata"]:
        lines.append("metadata:")
        for key, value in sorted(summary["metadata"].items()):
            value = value if len(value) <= max_meta_chars else value[:max_meta_chars] + f"... ({len(value)} chars)"
            lines.append(f"  {key}: {value}")
    return lines


def require_lora(source, token=None):
    """Open `source` as a LoRA (headers only); a model checkpoint or any other file is a one-line error."""
    from .files import LoraFile

    with LoraFile(source, token):
        pass


def require_model(source, token=None):
    """Open `source` as a model checkpoint (headers only); a LoRA or an unreadable file is a one-line error."""
    from ..arch.canonical import open_canonical

    with open_canonical(source, token=token):
        pass
