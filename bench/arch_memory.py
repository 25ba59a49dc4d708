"""Peak memory of extraction on full-width subsets (real widths, the first few blocks) of the 2025-26
architectures, each pair in its shipped dtypes and across layouts, each run in its own process with the
files evicted from the page cache first. The baseline is the same process after importing torch and
lora_colab, before reading anything.

    python bench/arch_memory.py [--dir /tmp/lc_arch] [--only flux2] [--keep]

Goal (issue 11): peak RSS (VmHWM: file pages included) <= 1 GiB for each pair.
"""

import argparse
import os
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import evict, in_subprocess, layout, mib  # noqa: E402

import torch  # noqa: E402

from lora_colab import arch  # noqa: E402
from lora_colab.notebook.synthetic import PlantedPair, write_checkpoint  # noqa: E402

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
# name -> (base layout file, tuned layout file, blocks kept per block kind)
PAIRS = {
    "qwen_image": ("qwen-image-diffusers", "qwen-image-diffusers", 2),
    "flux2": ("flux2-dev-diffusers", "flux2-dev-native", 1),
    "wan": ("wan2.2-t2v-a14b-diffusers", "wan2.2-t2v-a14b-native", 2),
    "flux3": ("flux3-diffusers", "flux3-native", 1),
    "hidream": ("hidream-i1-diffusers", "hidream-i1-native", 1),
    "minimax_h3": ("minimax-h3-diffusers", "minimax-h3-native", 1),
    "hunyuan_video15": ("hunyuanvideo1.5-diffusers", "hunyuanvideo1.5-native", 1),
    "ltx2": ("ltx2.5-diffusers", "ltx2.5-native", 1),  # LTX-2.5: gated attention, prompt adaLN
    "cosmos_predict2_5": ("cosmos-predict2.5-2b-diffusers", "cosmos-predict2.5-2b-native", 1),
    "wan_animate2": ("wan-animate2-diffusers", "wan-animate2-native", 1),
    "ace_step15": ("ace-step1.5-diffusers", "ace-step1.5-native", 1),
    "hidream_o1": ("hidream-o1-native", "hidream-o1-native", 1),  # (no diffusers layout; its 1.2 GB token table)
}
_BLOCK = re.compile(r"(?:^|\.)(?:blocks|double_blocks|single_blocks|transformer_blocks|single_transformer_blocks|"
                    r"mode_blocks|txt_mode_blocks|content_mode_blocks|double_stream_blocks|single_stream_blocks|refiner_blocks|layers)(?:\.image_cond|\.image)?\.(\d+)\.")


def subset(name, blocks):
    return [(k, tuple(s), d) for k, s, d in layout(name)
            if not (_BLOCK.search(k) and int(_BLOCK.search(k).group(1)) >= blocks)]


def canonical_layout(entries):
    """Detected arch and its CanonicalMap of a layout's entries (which stored keys form which canonical
    weight, in which row order)."""
    keys = {k: s for k, s, _ in entries}
    detected = arch.detect(set(keys))
    return detected, detected.arch.canonical_map(keys, detected.layout, detected.prefix)


def build(folder, name):
    base_name, tuned_name, blocks = PAIRS[name]
    return build_pair(folder, name, (base_name, subset(base_name, blocks)), (tuned_name, subset(tuned_name, blocks)))


def build_pair(folder, name, base, tuned):
    """Write `{name}_base/tuned.safetensors` from (layout name, entries) pairs with a planted rank-16
    change on every default target; files already there are kept."""
    paths = []
    planted = None
    for role, (layout_name, entries) in (("base", base), ("tuned", tuned)):
        detected, cmap = canonical_layout(entries)
        stored = {k: tuple(s) for k, s, _ in entries}
        owner = {source: ckey for ckey, sources in cmap.sources.items() for source in sources}
        path = folder / f"{name}_{role}.safetensors"
        paths.append(path)
        if path.exists():
            continue
        if planted is None:
            shapes = {ckey: (sum(stored[s][0] for s in sources),) + stored[sources[0]][1:]
                      for ckey, sources in cmap.sources.items() if None not in sources}
            targets = {t.key for t in detected.arch.targets(shapes)}
            planted = PlantedPair(targets.__contains__, rank=16, delta_scale=0.002)
            canonical_shapes = shapes
        make = planted.base if role == "base" else planted.tuned
        cache = {}

        def tensor(key, shape, make=make, cache=cache, owner=owner, cmap=cmap, stored=stored):
            ckey = owner.get(key)
            if ckey is None or ckey not in canonical_shapes:
                return make(key, shape)
            if ckey not in cache:
                cache.clear()
                cache[ckey] = cmap.disassemble(ckey, make(ckey, canonical_shapes[ckey]), lambda s: stored[s][0])
            return cache[ckey][key]

        start = time.perf_counter()
        dtype = DTYPES[entries[0][2]]
        with_dtypes = {k: DTYPES[d] for k, _, d in entries}
        write_checkpoint(path, [(k, s) for k, s, _ in entries], lambda k, s: tensor(k, s).to(with_dtypes[k]), dtype)
        print(f"built {path.name}: {path.stat().st_size / 1e9:.2f} GB ({layout_name}, {len(entries)} tensors, "
              f"{dtype}) in {time.perf_counter() - start:.0f} s", flush=True)
    return paths


def worker(base, tuned, out):
    from lora_colab.extraction.extractor import extract
    from lora_colab.memory import peak_rss_bytes, rss_bytes
    baseline = rss_bytes()
    report = extract(base, tuned, out, rank=32, progress=False, device="cpu")
    biggest = max(report.layers, key=lambda layer: layer.shape[0] * layer.shape[1])
    return {"baseline": baseline, "peak": peak_rss_bytes(), "seconds": report.wall_seconds,
            "layers": len(report.extracted), "architecture": report.architecture, "output": report.output_bytes,
            "biggest": f"{biggest.name} {list(biggest.shape)}", "worst": max(l.rel_error for l in report.extracted)}


def run(base, tuned, out):
    for path in (base, tuned):
        evict(path)
    return in_subprocess("arch_memory", "worker", str(base), str(tuned), str(out))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/lc_arch")
    parser.add_argument("--only", action="append", choices=sorted(PAIRS))
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    for name in args.only or sorted(PAIRS):
        base, tuned = build(folder, name)
        result = run(base, tuned, folder / f"{name}_lora.safetensors")
        ok = "ok" if result["peak"] <= 2**30 else "OVER"
        print(f"{name}: {result['architecture']}, {result['layers']} layers, inputs "
              f"{base.stat().st_size / 1e9:.2f} + {tuned.stat().st_size / 1e9:.2f} GB, biggest {result['biggest']}: "
              f"peak RSS {mib(result['peak'])} ({ok}; baseline {mib(result['baseline'])}, "
              f"{result['peak'] / 2**30:.2f} of the 1 GiB goal), {result['seconds']:.0f} s, "
              f"worst relative error {result['worst']:.4f}", flush=True)
        if not args.keep:
            for path in (base, tuned):
                path.unlink()
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
