"""Peak RSS, wall time and page-cache growth: our reader vs safetensors.safe_open, one tensor at a time.

Builds a >= 2 GB file with Z-Image shapes (the first tensors of the real single-file layout), then reads
every tensor once in a fresh process per reader, each starting with the file evicted from the page cache.

    python bench/read_memory.py [--gb 2.2] [--dir /tmp]
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import evict, layout, mib, page_cache_bytes, proc_status  # noqa: E402


def build(path, target_bytes):
    import torch

    from lora_colab import SafetensorsWriter

    specs, total = [], 0
    for key, shape, _ in layout("zimage-single-file"):
        specs.append((key, torch.bfloat16, shape))
        total += 2 * torch.Size(shape).numel()
        if total >= target_bytes:
            break
    gen = torch.Generator().manual_seed(0)
    with SafetensorsWriter(path, specs) as writer:
        for key, dtype, shape in specs:
            writer.write(key, torch.randn(shape, generator=gen).to(dtype))
    largest = max(2 * torch.Size(s).numel() for _, _, s in specs)
    return total, largest, len(specs)


def worker(reader, path):
    import torch

    def touch(t):
        # one byte per 4 KiB page: forces mapped pages in without a full-size temporary
        return int(t.reshape(-1).view(torch.uint8)[::4096].sum())

    baseline = proc_status("VmHWM")
    cache0 = page_cache_bytes()
    start = time.perf_counter()
    checksum = 0
    if reader == "ours":
        from lora_colab import open_checkpoint
        with open_checkpoint(path) as ckpt:
            for key in ckpt.keys():
                t = ckpt.read(key)
                checksum += touch(t)
                del t
    else:
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                checksum += touch(t)
                del t
    wall = time.perf_counter() - start
    print(json.dumps({"reader": reader, "baseline": baseline, "peak": proc_status("VmHWM"), "wall": wall,
                      "cache_growth": page_cache_bytes() - cache0, "checksum": checksum}))


def run(reader, path):
    evict(path)
    out = subprocess.run([sys.executable, __file__, "--worker", reader, path], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.2)
    parser.add_argument("--dir", default=os.environ.get("TMPDIR", "/tmp"))
    parser.add_argument("--worker", nargs=2, metavar=("READER", "PATH"))
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    path = os.path.join(args.dir, "lora_colab_bench_read.safetensors")
    try:
        total, largest, count = build(path, int(args.gb * 1e9))
        print(f"file: {count} Z-Image tensors, {total / 1e9:.2f} GB, largest tensor {mib(largest)}")
        results = {reader: run(reader, path) for reader in ("ours", "safe_open")}
    finally:
        if os.path.exists(path):
            os.unlink(path)
    if results["ours"]["checksum"] != results["safe_open"]["checksum"]:
        raise SystemExit("readers disagree on the data")
    for r in results.values():
        growth = r["peak"] - r["baseline"]
        print(f"{r['reader']:>9}: peak RSS above baseline {mib(growth)}, wall {r['wall']:.2f} s, "
              f"page cache growth {mib(r['cache_growth'])}")
    ours, theirs = results["ours"], results["safe_open"]
    budget = 150 * 2**20 + largest
    print(f"ratio peak-growth ours/safe_open: {(ours['peak'] - ours['baseline']) / max(1, theirs['peak'] - theirs['baseline']):.3f}")
    print(f"ratio wall ours/safe_open: {ours['wall'] / theirs['wall']:.3f}")
    print(f"goal peak <= 150 MiB + largest tensor ({mib(budget)}): "
          f"{'met' if ours['peak'] - ours['baseline'] <= budget else 'MISSED'}; "
          f"goal no slower: {'met' if ours['wall'] <= theirs['wall'] * 1.05 else 'MISSED'}")


if __name__ == "__main__":
    main()
