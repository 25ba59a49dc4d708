"""Extraction from a GGUF Q8_0 pair against the same pair in bf16 safetensors: Z-Image at full width
(2 main layers and the refiners), each run in its own process with the files evicted from the page cache.

    python bench/gguf_extract.py [--dir /tmp/lc_gguf] [--rank 32] [--keep]

Goals (issue 13): peak RSS <= 1 GB; GGUF time <= 1.3x the bf16 time on the CPU.
"""

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import evict, in_subprocess, mib  # noqa: E402
from arch_memory import build_pair  # noqa: E402
from stream import zimage_subset  # noqa: E402


def to_gguf(source, target):
    """`source` (safetensors) as a ComfyUI-GGUF style file: 2-D weights Q8_0, everything else F32."""
    import gguf
    from gguf import GGMLQuantizationType as T, quants

    from lora_colab import open_checkpoint
    writer = gguf.GGUFWriter(str(target), "lumina2")
    with open_checkpoint(source) as ckpt:
        for key in ckpt.keys():
            values = ckpt.read(key).float().numpy()
            if values.ndim == 2 and values.shape[1] % 32 == 0:
                data = quants.quantize(values, T.Q8_0)
                writer.add_tensor(key, data, raw_shape=data.shape, raw_dtype=T.Q8_0)
            else:
                writer.add_tensor(key, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def worker(base, tuned, out, rank):
    from lora_colab.extraction.extractor import extract
    from lora_colab.memory import peak_rss_bytes, rss_bytes
    baseline = rss_bytes()
    start = time.perf_counter()
    report = extract(base, tuned, out, rank=rank, progress=False, device="cpu")
    return {"seconds": time.perf_counter() - start, "peak": peak_rss_bytes(), "baseline": baseline,
            "layers": len(report.extracted), "worst": max(layer.rel_error for layer in report.extracted)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/lc_gguf")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    entries = zimage_subset(2)
    base, tuned = build_pair(folder, "zimage", ("zimage-single-file", entries), ("zimage-single-file", entries))
    ggufs = []
    for path in (base, tuned):
        target = path.with_suffix(".gguf")
        if not target.exists():
            start = time.perf_counter()
            to_gguf(path, target)
            print(f"wrote {target.name}: {target.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s",
                  flush=True)
        ggufs.append(target)
    results = {}
    for name, pair in (("bf16 safetensors", (base, tuned)), ("GGUF Q8_0", ggufs)):
        for path in pair:
            evict(path)
        results[name] = in_subprocess("gguf_extract", "worker", str(pair[0]), str(pair[1]),
                                      str(folder / f"{name.split()[0]}_lora.safetensors"), args.rank)
    a, b = results["bf16 safetensors"], results["GGUF Q8_0"]
    print(f"pair: Z-Image full width, {a['layers']} layers; bf16 {base.stat().st_size / 1e9:.2f} GB per file, "
          f"GGUF Q8_0 {ggufs[0].stat().st_size / 1e9:.2f} GB per file; rank {args.rank}, CPU")
    for name, r in results.items():
        print(f"{name}: {r['seconds']:.1f} s, peak RSS {mib(r['peak'])} (baseline {mib(r['baseline'])}), "
              f"worst relative error {r['worst']:.4f}")
    print(f"ratios: GGUF / bf16 time = {b['seconds'] / a['seconds']:.2f}x (goal <= 1.3); GGUF peak "
          f"{b['peak'] / 2**30:.2f} GiB (goal <= 1)")
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
