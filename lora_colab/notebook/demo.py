"""The built-in demo: a small Z-Image-shaped pair made on the fly, then a real extraction."""

import shutil
import tempfile
from pathlib import Path

from ..extraction.extractor import extract
from .synthetic import DEMO_ZIMAGE, make_zimage_pair


def demo_folder():
    """Where the demo writes when no folder is given: one fixed folder in the temporary directory, replaced
    by each run (so runs do not pile up)."""
    return Path(tempfile.gettempdir()) / "lora_colab_demo"


def run_demo(folder=None, rank=16, progress=True, **options):
    """Make the demo pair in `folder` (default: demo_folder(), emptied first), extract a LoRA, return the
    report. The pair: a diffusers-layout base folder and a ComfyUI single-file fine-tune."""
    if folder is None:
        folder = demo_folder()
        shutil.rmtree(folder, ignore_errors=True)
    folder = Path(folder)
    base, tuned, _ = make_zimage_pair(folder, DEMO_ZIMAGE, rank=8, noise=0.0005)
    return extract(base, tuned, folder / "demo_lora.safetensors", rank=rank, progress=progress, **options)


def next_steps(report):
    """Lines telling where the demo's files are and what to try next."""
    lora = Path(report.output)
    base = lora.parent / "base"
    return [f"demo pair: base {base} (diffusers folder), fine-tune {lora.parent / 'tuned.safetensors'} "
            f"(ComfyUI single file)",
            "next:",
            f"  lora-colab inspect {lora}",
            f"  lora-colab resize {base} {lora} -o {lora.parent / 'resized'} -r \"spn_ckpt=1,thr=-1.2\" -v",
            "  lora-colab extract BASE TUNED -o my_lora.safetensors --rank 32     # your own models"]
