"""Resume benchmarks: a run killed (-9) part-way and started again, against an uninterrupted run in the same
command. Each run in its own process with the inputs evicted from the page cache first.

    python bench/resume.py [--dir /tmp/lc_bench] [--rank 32] [--at 0.5] [--repeats 3]

Extraction (the width-true Z-Image subset pair of bench/extract.py, bf16, 30 layers, 2 x ~2.5 GB):
- journal overhead: an uninterrupted run with the journal against one with --no-resume;
- resume: killed after a share `--at` of the layers, rerun; the rerun's time over the uninterrupted run's
  time times the share of its per-layer time that was left (1.0 = it pays for exactly what was left; the
  fixed cost of opening the pair is in the rerun, not in the share), the bytes it read against the
  uninterrupted run's, and whether its output equals the uninterrupted run's tensor for tensor.
Resize (a rank-`rank` LoRA of that pair against its base, recipe spn_ckpt=1,thr=-1.2 + subspace): killed
after half the base references were read, rerun; the same ratio over the base layers left to read.
Full disk (root, where the kernel mounts a tmpfs): the extraction writing to a tmpfs that fits it, filled by
another file at the same share of the layers; the run stops with its journal, the filler is removed, the
same command resumes: the same ratio, and the file against the uninterrupted run's.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import evict  # noqa: E402

from extract import SUBSET, build  # noqa: E402

_RUN = """
import json, os, signal, sys, time
from lora_colab.extraction.extractor import extract
from lora_colab.resizing.resizer import resize
job, base, other, out, kill_at, resume = sys.argv[1:7]
kill_at, calls = int(kill_at), []
def on_layer(*_):
    calls.append(1)
    if len(calls) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    if len(calls) == -kill_at:  # something else fills the output's disk
        with open(os.path.join(os.path.dirname(out), "filler"), "wb") as f:
            try:
                while True:
                    f.write(bytes(1 << 20))
            except OSError:
                pass
start = time.perf_counter()
if job == "extract":
    report = extract(base, other, out, rank=RANK, progress=False, on_layer=on_layer, resume=resume == "1")
    extra = {"bytes_read": report.bytes_read, "resumed": report.resumed, "layers": len(report.layers),
             "layer_seconds": [layer.seconds for layer in report.layers]}
else:
    report = resize(base, [other], out, "spn_ckpt=1,thr=-1.2:subspace=1,thr=0.2", progress=False,
                    on_layer=on_layer, resume=resume == "1")[0]
    extra = {"warnings": [w for w in report.warnings if w.startswith("resuming")]}
print("RESULT" + json.dumps({"seconds": time.perf_counter() - start, **extra}))
"""


def run(job, base, other, out, rank, kill_at=0, resume=True, cache=None):
    for path in (base, other):
        for f in ([path] if Path(path).is_file() else Path(path).rglob("*.safetensors")):
            evict(f)
    env = {**os.environ, "LORA_COLAB_CACHE": str(cache)} if cache else None
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _RUN.replace("RANK", str(rank)), job, str(base), str(other),
                           str(out), str(kill_at), "1" if resume else "0"], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if kill_at > 0:
        assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
        return {"seconds": wall}
    if kill_at < 0:  # a full disk: the run stops with one line and keeps its journal
        assert done.returncode != 0 and "the disk is full" in done.stderr, done.stderr[-2000:]
        return {"seconds": wall, "said": done.stderr.strip().splitlines()[-1][-220:]}
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT")), None)
    if line is None:
        raise SystemExit(done.stderr[-3000:])
    return {**json.loads(line[len("RESULT"):]), "process_seconds": wall}


def same_tensors(a, b):
    from safetensors.torch import load_file
    import torch
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def layer_bytes(base, tuned):
    """[(key, bytes of the layer in both files)] in extraction order."""
    from lora_colab.arch.canonical import open_canonical
    with open_canonical(base) as b, open_canonical(tuned) as t:
        return [(x.key, b.nbytes(x.key) + t.nbytes(x.key)) for x in b.arch.targets(b.shapes())]


def full_disk(base, tuned, work, rank, fill_at, clean, per_layer):
    """The extraction on a tmpfs that fits it, filled at layer `fill_at`, then resumed once there is room."""
    disk = work / "disk"
    disk.mkdir(exist_ok=True)
    size = 3 * (work / "clean.safetensors").stat().st_size + (8 << 20)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        print(f"full disk: skipped (no tmpfs: {mounted.stderr.decode().strip()[:80]})", flush=True)
        return
    try:
        out = disk / "lora.safetensors"
        stopped = run("extract", base, tuned, out, rank, kill_at=-fill_at)
        (disk / "filler").unlink()
        resumed = run("extract", base, tuned, out, rank)
        time_left = sum(per_layer[fill_at - 1:]) / sum(per_layer)  # the layer being written is lost
        rows = {"disk_bytes": size, "filled_after_layers": fill_at - 1, "said": stopped["said"],
                "stopped_run_s": round(stopped["seconds"], 2), "resumed_s": round(resumed["seconds"], 2),
                "resumed_layers": resumed["resumed"], "time_left_share": round(time_left, 3),
                "resumed_over_left_share": round(resumed["seconds"] / (clean["seconds"] * time_left), 3),
                "identical_to_uninterrupted": same_tensors(out, work / "clean.safetensors")}
        print("full disk:", json.dumps(rows, indent=1), flush=True)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/lc_bench")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--at", type=float, default=0.5, help="share of the layers done when killed")
    args = parser.parse_args()
    folder = Path(args.dir) / "subset_timing"
    base, tuned = build(folder, SUBSET, spectra=False)
    work = Path(args.dir) / "resume"
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)  # outputs, journals and norm caches of earlier runs
    work.mkdir(parents=True)

    sizes = layer_bytes(base, tuned)
    n = len(sizes)
    kill_at = max(2, round(args.at * n))  # on_layer of layer k kills: layers 1..k-1 are journaled
    left = sum(size for _, size in sizes[kill_at - 1:]) / sum(size for _, size in sizes)

    times = {"plain": [], "clean": [], "killed": [], "resumed": []}
    identical = True
    for _ in range(args.repeats):  # interleaved: the machine's drift touches every kind alike
        times["plain"].append(run("extract", base, tuned, work / "plain.safetensors", args.rank, resume=False))
        times["clean"].append(run("extract", base, tuned, work / "clean.safetensors", args.rank))
        times["killed"].append(run("extract", base, tuned, work / "resumed.safetensors", args.rank, kill_at=kill_at))
        times["resumed"].append(run("extract", base, tuned, work / "resumed.safetensors", args.rank))
        identical &= same_tensors(work / "resumed.safetensors", work / "clean.safetensors")
    median = {k: statistics.median(r["seconds"] for r in v) for k, v in times.items()}
    resumed = times["resumed"][-1]
    per_layer = times["clean"][-1]["layer_seconds"]  # the uninterrupted run's own time per layer
    time_left = sum(per_layer[kill_at - 1:]) / sum(per_layer)
    rows = {
        "layers": n, "killed_after_layers": kill_at - 1, "bytes_left_share": round(left, 3),
        "repeats": args.repeats, "no_journal_s": round(median["plain"], 2),
        "with_journal_s": round(median["clean"], 2),
        "journal_overhead": round(median["clean"] / median["plain"], 3),
        "killed_run_s": round(median["killed"], 2), "resumed_s": round(median["resumed"], 2),
        "resumed_layers": resumed["resumed"],
        "time_left_share": round(time_left, 3),
        "resumed_over_left_share": round(median["resumed"] / (median["clean"] * time_left), 3),
        "resumed_bytes_over_clean": round(resumed["bytes_read"] / times["clean"][-1]["bytes_read"], 3),
        "identical_to_uninterrupted": identical,
    }
    print("extract:", json.dumps(rows, indent=1), flush=True)

    full_disk(base, tuned, work, args.rank, kill_at, times["clean"][-1], per_layer)

    lora = work / "clean.safetensors"
    clean_r = run("resize", base, lora, work / "r_clean", args.rank, cache=work / "cache_clean")
    n_refs = n  # one base reference step per LoRA layer, after the n decompositions
    killed_r = run("resize", base, lora, work / "r_resumed", args.rank, kill_at=n + n_refs // 2,
                   cache=work / "cache_killed")
    resumed_r = run("resize", base, lora, work / "r_resumed", args.rank, cache=work / "cache_resumed")
    outputs = sorted((work / "r_clean").glob("*.safetensors"))
    rows = {
        "clean_s": round(clean_r["seconds"], 2), "killed_run_s": round(killed_r["seconds"], 2),
        "resumed_s": round(resumed_r["seconds"], 2), "resumed": resumed_r["warnings"],
        "resumed_over_clean": round(resumed_r["seconds"] / clean_r["seconds"], 3),
        "identical_to_uninterrupted": all(same_tensors(p, work / "r_resumed" / p.name) for p in outputs),
    }
    print("resize:", json.dumps(rows, indent=1), flush=True)
    for f in work.rglob("*.safetensors"):
        f.unlink()


if __name__ == "__main__":
    main()
