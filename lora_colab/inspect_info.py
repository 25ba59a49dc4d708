"""Summaries of a checkpoint for `lora-colab inspect`."""

from collections import Counter

from .checkpoint import ShardedCheckpoint
from .canonical import CanonicalCheckpoint


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


def summarize(ckpt):
    """A dict describing `ckpt`: tensors, dtypes, size, metadata, files, detected layout and LoRA targets."""
    dtypes = Counter(ckpt.st_dtype(k) for k in ckpt.keys())
    detected, targets = _target_counts(ckpt)
    return {
        "path": ckpt.path,
        "files": len(ckpt.files),
        "storage": "sharded index" if isinstance(ckpt, ShardedCheckpoint) else "single file",
        "tensors": len(ckpt),
        "dtypes": dict(dtypes.most_common()),
        "total_bytes": ckpt.total_bytes,
        "detected": detected,
        "lora_targets": targets,
        "metadata": dict(ckpt.metadata),
    }


def format_summary(summary, max_meta_chars=200):
    """Human-readable lines for a summary dict."""
    gib = summary["total_bytes"] / 2**30
    dtypes = ", ".join(f"{name} x{count}" for name, count in summary["dtypes"].items())
    lines = [
        f"path:      {summary['path']}",
        f"storage:   {summary['storage']} ({summary['files']} file{'s' if summary['files'] != 1 else ''})",
        f"detected:  {summary['detected']}",
        "targets:   " + ", ".join(f"{n} {k}" for k, n in summary["lora_targets"].items()),
        f"tensors:   {summary['tensors']}",
        f"dtypes:    {dtypes or '-'}",
        f"size:      {summary['total_bytes']:,} bytes ({gib:.2f} GiB)",
    ]
    if summary["metadata"]:
        lines.append("metadata:")
        for key, value in sorted(summary["metadata"].items()):
            value = value if len(value) <= max_meta_chars else value[:max_meta_chars] + f"... ({len(value)} chars)"
            lines.append(f"  {key}: {value}")
    return lines
