"""Byte-identity check for refactors: extract and resize a set of pairs and LoRAs with many options and print
the sha256 of every output file (and of every file in a PEFT folder). Run it before and after a change that
should not change behaviour and compare the two lists:

    python bench/same_bytes.py --dir /tmp/same_a > before.txt     # on the old commit
    python bench/same_bytes.py --dir /tmp/same_b > after.txt      # on the new one
    diff before.txt after.txt                                    # nothing: the outputs are byte-identical

The pairs are the demo's three families (Z-Image across layouts, SDXL, Flux.1) and, with --bench-dir, the
width-true Z-Image subset pair bench/extract.py builds (about 2.5 GB a file; built once and reused).
"""

import argparse
import hashlib
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

EXTRACTS = [  # (name, family, options)
    ("default", "zimage", {}),
    ("energy", "zimage", dict(rank=8, energy=0.9)),
    ("recipe_size", "zimage", dict(rank=16, recipe="spn_ckpt=1,size=0.3")),
    ("recipe_thr", "flux", dict(rank=16, recipe="fro_ckpt=1,thr=-2")),
    ("noclamp_fp16", "flux", dict(rank=4, clamp_quantile=None, dtype="fp16", scale=0.5, alpha=2.0)),
    ("sdxl_conv", "sdxl", dict(rank=8, conv_rank=4, conv_alpha=2.0)),
    ("sdxl_kohya_unet", "sdxl", dict(rank=4, format="kohya", text_encoders=False, min_diff=1e-6)),
    ("sdxl_diffusers", "sdxl", dict(rank=4, format="diffusers")),
    ("flux_comfy_nodiff", "flux", dict(rank=4, format="comfy", bias_diff=False)),
]

RESIZES = [  # (name, LoRA(s) from EXTRACTS (name[:weight], ...), with the base?, options)
    ("sv_fro", "default", False, dict(recipes="sv_fro=0.9:rank=4")),
    ("spn_thr", "default", True, dict(recipes="spn_ckpt=1,thr=-1.2:subspace=1,spn_ckpt=0.5,thr=-0.8")),
    ("size", "sdxl_conv", True, dict(recipes="spn_ckpt=1,size=0.2", dtype="32")),
    ("merge", "recipe_thr:0.5,noclamp_fp16:1.5", True, dict(recipes="fro_ckpt=1,thr=-2")),
    ("to_kohya", "sdxl_diffusers", True, dict(recipes="rank=2", to="kohya")),
    ("to_diffusers", "sdxl_kohya_unet", True, dict(recipes="rank=3", to="diffusers")),
    ("to_peft", "flux_comfy_nodiff", True, dict(recipes="rank=2", to="peft")),
]


def digest(path):
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def run(folder, bench_dir=None):
    os.environ["SOURCE_DATE_EPOCH"] = "1796601600"  # the files' modelspec.date: the same in every run
    from lora_colab import extract, resize
    from lora_colab.notebook.synthetic import make_demo_pair

    folder = Path(folder)
    pairs = {fam: make_demo_pair(fam, folder / "pairs" / fam)[:2] for fam in ("zimage", "sdxl", "flux")}
    outputs, sums = {}, {}
    for name, family, options in EXTRACTS:
        out = folder / "extract" / f"{name}.safetensors"
        extract(*pairs[family], out, progress=False, device="cpu", **options)
        outputs[name] = (out, family)
        sums.update(digest(out))
    for name, loras, with_base, options in RESIZES:
        items = [item.split(":") for item in loras.split(",")]
        family = outputs[items[0][0]][1]
        arg = ",".join(str(outputs[n][0]) + (f":{w[0]}" if w else "") for n, *w in items)
        base = pairs[family][0] if with_base else None
        for report in resize(base, [arg], folder / "resize" / name, progress=False, device="cpu", **options):
            sums.update(digest(report.output))
    if bench_dir:
        from extract import SUBSET, build
        out = folder / "extract" / "bench_subset.safetensors"
        extract(*build(bench_dir, SUBSET), out, progress=False, device="cpu")
        sums.update(digest(out))
    return sums


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="a fresh folder for the pairs and outputs")
    parser.add_argument("--bench-dir", default=None, help="also extract bench/extract.py's subset pair (built here)")
    args = parser.parse_args()
    for name, sha in sorted(run(args.dir, args.bench_dir).items()):
        print(f"{sha}  {name}")


if __name__ == "__main__":
    main()
