"""The built-in demo: a small pair of a family people use (Z-Image, SDXL, Flux.1) made on the fly, then a real
extraction."""

import shutil
import tempfile
from pathlib import Path

from ..extraction.extractor import extract
from .synthetic import make_demo_pair


def demo_folder():
    """Where the demo writes when no folder is given: one fixed folder in the temporary directory, replaced
    by each run (so runs do not pile up)."""
    return Path(tempfile.gettempdir()) / "lora_colab_demo"


def run_demo(folder=None, rank=16, progress=True, family="zimage", **options):
    """Make the demo pair of `family` ("zimage", "sdxl", "flux") in `folder` (default: demo_folder(), emptied
    first), extract a LoRA, return the report. Z-Image's pair is a diffusers-layout base folder and a ComfyUI
    single-file fine-tune; SDXL's and Flux's are two single files of the real names."""
    if folder is None:
        folder = demo_folder()
        shutil.rmtree(folder, ignore_errors=True)
    folder = Path(folder)
    base, tuned, _ = make_demo_pair(family, folder, rank=8, noise=0.0005)
    return extract(base, tuned, folder / "demo_lora.safetensors", rank=rank, progress=progress, **options)


def next_steps(report):
    """Lines telling where the demo's files are and what to try next."""
    lora = Path(report.output)
    base = lora.parent / "base"  # Z-Image's demo base is a diffusers folder, the other families' a single file
    base, kind = (base, "diffusers folder") if base.is_dir() else (lora.parent / "base.safetensors", "single file")
    return [f"demo pair: base {base} ({kind}), fine-tune {lora.parent / 'tuned.safetensors'} (single file)",
            "next:",
            f"  lora-colab inspect {lora}",
            f"  lora-colab resize {base} {lora} -o {lora.parent / 'resized'} -r \"spn_ckpt=1,thr=-1.2\" -v",
            "  lora-colab extract BASE TUNED -o my_lora.safetensors --rank 32     # your own models"]
