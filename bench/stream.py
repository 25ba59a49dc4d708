"""Extraction read in place over HTTP against download-then-extract, through a loopback range server
limited to 200 MB/s (tests/range_server.py, its own process), on a Z-Image pair at full width (2 x 2.5 GB:
3 main layers and the refiners, bf16). Each run is its own process.

    python bench/stream.py [--dir /tmp/lc_stream] [--bandwidth 200e6] [--rank 32] [--device cpu] [--keep]

Goals (issue 12): streamed >= 1.5x faster than download-then-extract; streamed within 1.15x of
total bytes / bandwidth; streamed peak RSS <= 1 GiB; bytes sent <= 1.1x what the extraction needs.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import ROOT, in_subprocess, layout, mib  # noqa: E402
from arch_memory import build_pair  # noqa: E402

_BLOCK = re.compile(r"(?:^|\.)(?:layers|noise_refiner|context_refiner)\.(\d+)\.")


def zimage_subset(blocks=3):
    return [(k, tuple(s), d) for k, s, d in layout("zimage-single-file")
            if not (_BLOCK.search(k) and int(_BLOCK.search(k).group(1)) >= blocks)]


def _baseline(device):
    """RSS once torch and lora_colab are loaded and, on a GPU, CUDA and its solver libraries are up."""
    import torch
    from lora_colab.memory import rss_bytes
    if device == "cuda":
        torch.linalg.svd(torch.randn(64, 64, device="cuda"))
        torch.cuda.synchronize()
    return rss_bytes()


def streamed(base_url, tuned_url, out, rank, device="cpu"):
    from lora_colab.extraction.extractor import extract
    from lora_colab.memory import peak_rss_bytes
    baseline = _baseline(device)
    start = time.perf_counter()
    report = extract(base_url, tuned_url, out, rank=rank, progress=False, device=device)
    return {"seconds": time.perf_counter() - start, "peak": peak_rss_bytes(), "baseline": baseline,
            "bytes_read": report.bytes_read, "network": report.network_bytes, "wait": report.read_wait_seconds, "layers": len(report.extracted)}


def download_first(base_url, tuned_url, out, rank, folder, device="cpu"):
    from lora_colab.io.downloads import download_url
    from lora_colab.extraction.extractor import extract
    from lora_colab.memory import peak_rss_bytes
    start = time.perf_counter()
    base = download_url(base_url, folder, progress=False)
    tuned = download_url(tuned_url, folder, progress=False)
    downloaded = time.perf_counter() - start
    report = extract(base, tuned, out, rank=rank, progress=False, device=device)
    return {"seconds": time.perf_counter() - start, "download": downloaded, "peak": peak_rss_bytes(),
            "bytes_read": report.bytes_read, "layers": len(report.extracted)}


def sent(url):
    with urllib.request.urlopen(f"{url}/stats") as response:
        return json.loads(response.read())["bytes_sent"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/lc_stream")
    parser.add_argument("--bandwidth", type=float, default=200e6)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    entries = zimage_subset()
    base, tuned = build_pair(folder, "zimage", ("zimage-single-file", entries), ("zimage-single-file", entries))
    total = base.stat().st_size + tuned.stat().st_size
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "range_server.py"), str(folder),
                               "--bandwidth", str(args.bandwidth)], stdout=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{server.stdout.readline().strip()}"
        urls = (f"{url}/files/{base.name}", f"{url}/files/{tuned.name}")
        before = sent(url)
        a = in_subprocess("stream", "streamed", *urls, str(folder / "streamed.safetensors"), args.rank, args.device)
        streamed_sent = sent(url) - before
        downloads = folder / "downloads"
        shutil.rmtree(downloads, ignore_errors=True)
        downloads.mkdir()
        b = in_subprocess("stream", "download_first", *urls, str(folder / "downloaded.safetensors"), args.rank, str(downloads),
                args.device)
        shutil.rmtree(downloads, ignore_errors=True)
    finally:
        server.terminate()
        server.wait()
    floor = total / args.bandwidth
    print(f"pair: Z-Image full width, {a['layers']} layers, {base.stat().st_size / 1e9:.2f} + "
          f"{tuned.stat().st_size / 1e9:.2f} GB; server limited to {args.bandwidth / 1e6:.0f} MB/s "
          f"(total bytes / bandwidth = {floor:.1f} s); rank {args.rank}, {args.device}")
    print(f"download then extract: {b['seconds']:.1f} s (download {b['download']:.1f} s, extract "
          f"{b['seconds'] - b['download']:.1f} s), peak RSS {mib(b['peak'])}")
    print(f"streamed: {a['seconds']:.1f} s (waiting on reads {a['wait']:.1f} s), peak RSS {mib(a['peak'])} "
          f"(baseline {mib(a['baseline'])}: torch, lora_colab{', CUDA' if args.device == 'cuda' else ''}), "
          f"{streamed_sent / 1e9:.3f} GB sent for {a['bytes_read'] / 1e9:.3f} GB read "
          f"({streamed_sent / a['bytes_read']:.3f}x), {a['network'] / a['seconds'] / 1e6:.0f} MB/s")
    print(f"ratios: download-then-extract / streamed = {b['seconds'] / a['seconds']:.2f}x (goal >= 1.5); "
          f"streamed / (bytes / bandwidth) = {a['seconds'] / floor:.3f}x (goal <= 1.15); "
          f"streamed peak {a['peak'] / 2**30:.2f} GiB (goal <= 1)")
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
