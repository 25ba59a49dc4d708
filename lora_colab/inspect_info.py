"""Summaries of a checkpoint for `lora-colab inspect`."""

from collections import Counter

from .checkpoint import ShardedCheckpoint
from .arch import detect


def summarize(ckpt):
    """A dict describing `ckpt`: tensors, dtypes, size, metadata, files and detected layout."""
    dtypes = Counter(ckpt.st_dtype(k) for k in ckpt.keys())
    return {
        "path": ckpt.path,
        "files": len(ckpt.files),
        "storage": "sharded index" if isinstance(ckpt, ShardedCheckpoint) else "single file",
        "tensors": len(ckpt),
        "dtypes": dict(dtypes.most_common()),
        "total_bytes": ckpt.total_bytes,
        "detected": detect(ckpt.keys()).describe(),
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
