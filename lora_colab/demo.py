"""The built-in demo: a small Z-Image-shaped pair made on the fly, then a real extraction."""

import tempfile
from pathlib import Path

from .extractor import extract
from .synthetic import DEMO_ZIMAGE, make_zimage_pair


def run_demo(folder=None, rank=16, progress=True, **options):
    """Make the demo pair in `folder` (a temporary folder when None), extract a LoRA, return the report."""
    folder = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="lora_colab_demo_"))
    base, tuned, _ = make_zimage_pair(folder, DEMO_ZIMAGE, rank=8, noise=0.0005)
    return extract(base, tuned, folder / "demo_lora.safetensors", rank=rank, progress=progress, **options)
