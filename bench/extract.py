"""Extraction benchmarks: memory on a full-size Z-Image pair, speed against the seed approach and against
kohya's full SVD, the read/compute floor, and the randomized SVD's accuracy against the optimal truncation.
Every figure is a ratio against a baseline run in the same command, each run in its own process with the
files evicted from the page cache first; speed runs are interleaved (ours, seed, ours, seed, ...).

    python bench/extract.py [--dir /tmp/lc_bench] [--full] [--keep] [--rank 32] [--repeats 3]

Without --full it uses a width-true subset pair (real 3840 width, 1 refiner of each kind + 4 layers,
30 target layers, ~2.5 GB per file) whose changes have fine-tune-like spectra (full rank, σᵢ ∝ i^-a with a
between 0.8 and 1.8 per layer); --full adds the 2 x 12.3 GB memory run.

The seed approach is the seed script's: safe_open + get_tensor, `torch.svd_lowrank(delta, q=rank)` with
torch's default 2 power iterations, one save at the end. Our defaults are q = rank + 8 and 2 power
iterations (they were 4 before issue 14: `--old` adds that configuration to the table). A bf16 pair on a CPU
with fast bf16 products is factored from its bf16 difference (bf16 sketch, float32 last range product and
projection); `ours_fp32` is the same run with LORA_COLAB_BF16_SKETCH=0 (the float32 path before issue 20).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import evict, mib, page_cache_bytes, proc_status  # noqa: E402

import torch  # noqa: E402

from lora_colab.notebook.synthetic import ZImageConfig, make_zimage_pair  # noqa: E402

SUBSET = ZImageConfig(n_layers=4, n_refiner_layers=1)
FULL = ZImageConfig()


def build(folder, cfg, spectra=True):
    """A bf16 single-file pair; spectra=False plants rank 8 plus full-rank noise instead of power-law
    spectra (the same work for the extractor, built in a fraction of the time: the full-size timing pair)."""
    folder = Path(folder)
    base, tuned = folder / "base.safetensors", folder / "tuned.safetensors"
    if not (base.exists() and tuned.exists()):
        start = time.perf_counter()
        if spectra:
            make_zimage_pair(folder, cfg, noise=0.0, delta_scale=0.002, base_layout="single-file",
                             tuned_layout="single-file", decay=(0.8, 1.8))
        else:
            make_zimage_pair(folder, cfg, rank=8, noise=0.001, delta_scale=0.002, base_layout="single-file",
                             tuned_layout="single-file")
        print(f"built {folder} in {time.perf_counter() - start:.0f} s "
              f"({base.stat().st_size / 1e9:.2f} + {tuned.stat().st_size / 1e9:.2f} GB)", flush=True)
    return base, tuned


def target_keys(base):
    from lora_colab.arch.canonical import open_canonical
    with open_canonical(base) as c:
        return [t.key for t in c.arch.targets(c.shapes())]


# --- workers (each runs in its own process) ------------------------------------------------------

def w_ours(base, tuned, out, rank, niter=2, recipe=None, device="cpu", **_):
    from lora_colab.extraction.extractor import extract
    report = extract(base, tuned, out, rank=rank, progress=False, device=device, niter=niter, recipe=recipe)
    return {"layers": len(report.extracted), "read_wait": report.read_wait_seconds,
            "purge": report.purge_seconds, "bytes": report.output_bytes,
            "worst_rel_error": max(layer.rel_error for layer in report.extracted),
            "bytes_read": report.bytes_read, "ranks": sorted({layer.rank for layer in report.extracted}),
            "peak_vram": report.peak_vram}


def w_seed(base, tuned, out, rank, keys, **_):
    """The seed approach: safe_open + get_tensor, svd_lowrank(q=rank) (torch's default 2 power iterations)
    per layer, no prefetch, one save at the end."""
    import gc

    from safetensors import safe_open
    from safetensors.torch import save_file
    factors = {}
    with safe_open(base, "pt") as fb, safe_open(tuned, "pt") as ft:
        for key in keys:
            delta = ft.get_tensor(key).float() - fb.get_tensor(key).float()
            u, s, v = torch.svd_lowrank(delta, q=rank)
            name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
            factors[name + ".lora_up.weight"] = (u[:, :rank] * s[:rank]).to(torch.bfloat16).contiguous()
            factors[name + ".lora_down.weight"] = v[:, :rank].T.to(torch.bfloat16).contiguous()
            factors[name + ".alpha"] = torch.tensor(float(rank))
            del delta, u, s, v
            gc.collect()
    save_file(factors, out)
    return {"layers": len(keys)}


def _deltas(base, tuned, keys):
    """(key, float32 difference, bf16 difference or None) of each layer."""
    from lora_colab import open_checkpoint
    with open_checkpoint(base) as b, open_checkpoint(tuned) as t:
        for key in keys:
            raw_t, raw_b = t.read(key, dtype=None), b.read(key, dtype=None)
            delta = raw_t.float()
            delta.sub_(raw_b)
            low = raw_t - raw_b if raw_t.dtype == raw_b.dtype == torch.bfloat16 else None
            yield key, delta, low


def w_read_only(base, tuned, keys, **_):
    """Only the reads the extractor does: each target's raw bytes from both files."""
    from lora_colab import open_checkpoint
    total = 0
    with open_checkpoint(base) as b, open_checkpoint(tuned) as t:
        for key in keys:
            total += t.read(key).numel() + b.read(key).numel()
    return {"elements": total}


def w_compute_only(base, tuned, keys, rank, **_):
    """Everything but reading: the float32 difference, SVD and factor work, timed on tensors already read."""
    from lora_colab import open_checkpoint
    from lora_colab.io.checkpoint import cast
    from lora_colab.extraction.differences import subtract_
    from lora_colab.extraction.layer import factor_layer
    from lora_colab.lowrank.factor import bf16_products_fast
    from lora_colab.extraction.report import LayerReport
    compute = 0.0
    with open_checkpoint(base) as b, open_checkpoint(tuned) as t:
        for key in keys:
            raw_tuned, raw_base = t.read(key), b.read(key)
            start = time.perf_counter()
            if raw_tuned.dtype == raw_base.dtype == torch.bfloat16 and bf16_products_fast():
                delta = raw_tuned.sub_(raw_base)  # what the extractor does with a bf16 pair
            else:
                delta = subtract_(cast(raw_tuned, torch.float32), raw_base)
            factor_layer(delta, rank, 0.99, 2, 8, None, 0, LayerReport(key, tuple(delta.shape)))
            compute += time.perf_counter() - start
            del delta, raw_tuned, raw_base
    return {"compute": compute}


def w_quality(base, tuned, keys, rank, full_svd, **_):
    """Per layer: the residual ‖Δ − Δ_r‖ of each randomized configuration (ours now, ours before, the seed's)
    over the optimal one (exact SVD), and the time of ours against kohya's full SVD."""
    from lora_colab.lowrank.factor import low_rank, low_rank_bf16
    rows = []
    for key, delta, low in _deltas(base, tuned, keys):
        row = {"key": key}
        optimal = None
        start = time.perf_counter()
        if full_svd:
            u, s, vh = torch.linalg.svd(delta)  # kohya: full_matrices=True
        else:
            s = torch.linalg.svdvals(delta)
        row["exact_s"] = time.perf_counter() - start
        optimal = float(s[rank:].double().pow(2).sum().sqrt())
        for name, (q, niter) in CONFIGS.items():
            torch.manual_seed(0)
            start = time.perf_counter()
            if name == "seed":
                u, s, v = torch.svd_lowrank(delta, q=q(rank), niter=niter)
            elif name == "ours_bf16":
                if low is None:
                    row[name], row[name + "_s"] = float("nan"), 0.0
                    continue
                u, s, v = low_rank_bf16(low, rank, niter=niter, oversample=q(rank) - rank)
            else:
                u, s, v = low_rank(delta, rank, niter=niter, oversample=q(rank) - rank)
            row[name + "_s"] = time.perf_counter() - start
            approx = (u[:, :rank] * s[:rank]) @ v[:, :rank].T
            row[name] = float((delta - approx).double().norm()) / optimal
        rows.append(row)
    return {"rows": rows}


# name -> (q as a function of rank, power iterations)
CONFIGS = {"ours_bf16": (lambda r: r + 8, 2), "ours": (lambda r: r + 8, 2), "ours_before": (lambda r: r + 8, 4),
           "seed": (lambda r: r, 2)}


WORKERS = {"ours": w_ours, "seed": w_seed, "read_only": w_read_only, "compute_only": w_compute_only,
           "quality": w_quality}


def worker_main(name, args):
    baseline = proc_status("VmHWM")
    cache0 = page_cache_bytes()
    start = time.perf_counter()
    result = WORKERS[name](**args)
    result.update(wall=time.perf_counter() - start, peak=proc_status("VmHWM"), baseline=baseline,
                  cache_growth=page_cache_bytes() - cache0)
    print(json.dumps(result))


def run(name, base, tuned, env=None, **args):
    evict(base)
    evict(tuned)
    payload = json.dumps({"base": str(base), "tuned": str(tuned), **args})
    out = subprocess.run([sys.executable, __file__, "--worker", name, payload], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def recipe_cost(base, tuned, out, args):
    """A base-aware recipe (by default spn_ckpt + subspace, to an exact size) against a plain extraction at the
    same rank cap: wall, peak memory and bytes read (the recipe reads nothing more), interleaved. The bench's
    base weights are Gaussian, the worst case for the spectral norm's Lanczos (a flat top: 60-80 steps)."""
    recipe = args.recipe
    walls = {"plain": [], "recipe": []}
    for _ in range(args.repeats):
        plain = run("ours", base, tuned, out=out, rank=args.rank)
        walls["plain"].append(plain["wall"])
        chosen = run("ours", base, tuned, out=out, rank=args.rank, recipe=recipe)
        walls["recipe"].append(chosen["wall"])
    median = {k: sorted(v)[len(v) // 2] for k, v in walls.items()}
    print(f"plain rank {args.rank}: {median['plain']:.1f} s, peak RSS {mib(plain['peak'])}, read "
          f"{plain['bytes_read'] / 1e9:.2f} GB, {plain['bytes'] / 2**20:.1f} MiB file")
    print(f"recipe {recipe} (cap {args.rank}): {median['recipe']:.1f} s, peak RSS {mib(chosen['peak'])}, read "
          f"{chosen['bytes_read'] / 1e9:.2f} GB, {chosen['bytes'] / 2**20:.2f} MiB file, ranks {chosen['ranks'][0]}-"
          f"{chosen['ranks'][-1]}")
    print(f"RATIO recipe/plain wall: {median['recipe'] / median['plain']:.2f}x; peak RSS "
          f"{chosen['peak'] / plain['peak']:.2f}x; bytes read {chosen['bytes_read'] / plain['bytes_read']:.3f}x")


def cold_read(*paths):
    """Seconds to read files cold (evicted from the page cache), as `cat` does: through the page cache."""
    for path in paths:
        evict(path)
    start = time.perf_counter()
    subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def direct_read(*paths):
    """Seconds to read files with O_DIRECT in 64 MiB requests (`dd iflag=direct`): the disk's own limit,
    without the page cache's copy (on this VM `cat` spends a whole core in the kernel at 0.7 GB/s)."""
    start = time.perf_counter()
    for path in paths:
        subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=64M", "iflag=direct", "status=none"], check=True)
    return time.perf_counter() - start


def full_pair(root, out, args):
    """The whole 2 x 12.3 GB Z-Image pair: ours against the cold read of both files (`cat`, and `dd` with
    O_DIRECT) and against ours reading through the page cache (LORA_COLAB_DIRECT_IO=0, the reader before
    issue 20's last step), interleaved, each run cold; --old adds the float32 path (LORA_COLAB_BF16_SKETCH=0)."""
    fbase, ftuned = build(root / "full", FULL, spectra=False)
    reads, directs, walls, buffered, fp32 = [], [], [], [], []
    for _ in range(args.full_repeats):
        reads.append(cold_read(fbase, ftuned))
        directs.append(direct_read(fbase, ftuned))
        full = run("ours", fbase, ftuned, out=out, rank=args.rank, device=args.device)
        walls.append(full["wall"])
        buffered.append(run("ours", fbase, ftuned, {"LORA_COLAB_DIRECT_IO": "0"}, out=out, rank=args.rank,
                            device=args.device)["wall"])
        if args.old or args.device != "cpu":  # on a GPU: its float32 path too, the one a T4 takes
            fp32.append(run("ours", fbase, ftuned, {"LORA_COLAB_BF16_SKETCH": "0", "LORA_COLAB_GPU_BF16": "0"},
                            out=out, rank=args.rank, device=args.device)["wall"])

    def median(values):
        return sorted(values)[len(values) // 2]
    read, direct, wall = median(reads), median(directs), median(walls)
    size = (Path(fbase).stat().st_size + Path(ftuned).stat().st_size) / 1e9
    print(f"FULL pair 2 x {size / 2:.1f} GB: cold read (cat) {read:.1f} s ({size / read:.2f} GB/s), direct read (dd) "
          f"{direct:.1f} s ({size / direct:.2f} GB/s); ours {wall:.1f} s; "
          f"peak RSS (VmHWM) {mib(full['peak'])} (goal <= 1.0 GB), page cache +{mib(full['cache_growth'])}, "
          f"{full['layers']} layers, LoRA {full['bytes'] / 1e6:.0f} MB, waited on reads {full['read_wait']:.1f} s"
          + (f", on {args.device}: peak VRAM {mib(full['peak_vram'])}" if args.device != "cpu" else ""))
    print(f"RATIO ours/cold read: {wall / read:.2f}x (goal <= 1.1); ours/direct read: {wall / direct:.2f}x; "
          f"page-cache reader/ours: {median(buffered) / wall:.2f}x  [runs: {', '.join(f'{w:.1f}' for w in walls)} s; "
          f"page-cache reader {', '.join(f'{w:.1f}' for w in buffered)} s; cat {', '.join(f'{r:.1f}' for r in reads)} s; "
          f"dd {', '.join(f'{r:.1f}' for r in directs)} s]")
    if fp32:
        print(f"RATIO float32 path/ours: {median(fp32) / wall:.2f}x  [float32 path runs: "
              f"{', '.join(f'{w:.1f}' for w in fp32)} s]")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/lc_bench")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--full", action="store_true", help="also the 2 x 12.3 GB run: time against the cold read, "
                        "memory")
    parser.add_argument("--full-only", action="store_true", help="only the 2 x 12.3 GB run")
    parser.add_argument("--full-repeats", type=int, default=2, help="interleaved cold reads and runs of the full pair")
    parser.add_argument("--keep", action="store_true", help="keep the generated pairs")
    parser.add_argument("--kohya-layers", type=int, default=6, help="layers timed with kohya's full SVD")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved speed runs of each contender")
    parser.add_argument("--old", action="store_true", help="also time the defaults before issue 14 (niter 4)")
    parser.add_argument("--recipe-only", action="store_true", help="only the base-aware recipe's cost against a "
                        "plain extraction")
    parser.add_argument("--recipe", default="spn_ckpt=1,subspace=0.5,size=20", help="the recipe --recipe-only times")
    parser.add_argument("--device", default="cpu", help="where our runs factor (cpu, cuda); the full pair's run on "
                                                        "a GPU also times its float32 path (a T4's)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args.worker[0], json.loads(args.worker[1]))
    root = Path(args.dir)
    if args.full_only:
        return full_pair(root, str(root / "out.safetensors"), args)
    base, tuned = build(root / "subset", SUBSET)
    keys = target_keys(base)
    out = str(root / "out.safetensors")
    print(f"subset pair: {len(keys)} target layers at full width, rank {args.rank}, CPU, {torch.get_num_threads()} "
          f"threads", flush=True)
    if args.recipe_only:
        return recipe_cost(base, tuned, out, args)
    walls = {"ours": [], "ours_fp32": [], "seed": []}
    if args.old:
        walls["ours_before"] = []
    for repeat in range(args.repeats):  # interleaved: the machine's drift hits every contender alike
        ours = run("ours", base, tuned, out=out, rank=args.rank)
        walls["ours"].append(ours["wall"])
        walls["ours_fp32"].append(run("ours", base, tuned, {"LORA_COLAB_BF16_SKETCH": "0"}, out=out,
                                      rank=args.rank)["wall"])
        seed = run("seed", base, tuned, out=out, rank=args.rank, keys=keys)
        walls["seed"].append(seed["wall"])
        if args.old:
            walls["ours_before"].append(run("ours", base, tuned, out=out, rank=args.rank, niter=4)["wall"])
        print(f"  run {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in walls.items()), flush=True)
    read = run("read_only", base, tuned, keys=keys)
    compute = run("compute_only", base, tuned, keys=keys, rank=args.rank)
    print(f"ours      : peak RSS {mib(ours['peak'])} (+{mib(ours['peak'] - ours['baseline'])} over baseline), "
          f"page cache +{mib(ours['cache_growth'])}, waited on reads {ours['read_wait']:.1f} s, purge "
          f"{ours['purge']:.2f} s, worst rel. error {ours['worst_rel_error']:.4f}")
    print(f"seed      : peak RSS {mib(seed['peak'])}, page cache +{mib(seed['cache_growth'])}")
    print(f"read only : {read['wall']:.1f} s;  compute only: {compute['compute']:.1f} s (of {compute['wall']:.1f} s)")
    median = {k: sorted(v)[len(v) // 2] for k, v in walls.items()}
    print("wall (median of interleaved runs): " + ", ".join(f"{k} {v:.1f} s" for k, v in median.items()))
    print(f"RATIO seed/ours wall: {median['seed'] / median['ours']:.2f}x (goal >= 1.6)")
    print(f"RATIO ours float32 path/ours wall: {median['ours_fp32'] / median['ours']:.2f}x")
    if args.old:
        print(f"RATIO ours before (niter 4)/ours wall: {median['ours_before'] / median['ours']:.2f}x")
    floor = max(read["wall"], compute["compute"])
    print(f"RATIO ours/max(read, compute): {median['ours'] / floor:.2f} (goal <= 1.25)")
    kinds = {}  # the first layer of each kind (qkv, out, w1, ...), then the rest in order
    for key in keys:
        kinds.setdefault(key.rsplit(".", 2)[-2], key)
    spread = (list(kinds.values()) + [k for k in keys if k not in kinds.values()])[:args.kohya_layers]
    quality = run("quality", base, tuned, keys=spread, rank=args.rank, full_svd=True)
    print(f"residual over the optimal (exact SVD) one, {len(quality['rows'])} layers, rank {args.rank}:")
    print("  layer                                   " + "".join(f"{k:>13}" for k in CONFIGS))
    for r in quality["rows"]:
        print(f"  {r['key'][:40]:40s}" + "".join(f"{r[k]:13.4f}" for k in CONFIGS))
    worst = {k: max(r[k] for r in quality["rows"]) for k in CONFIGS}
    print("  worst                                   " + "".join(f"{worst[k]:13.4f}" for k in CONFIGS)
          + "   (goal: ours <= 1.01)")
    ours_t = sum(r["ours_s"] for r in quality["rows"])
    exact_t = sum(r["exact_s"] for r in quality["rows"])
    print(f"kohya full SVD on {len(quality['rows'])} layers: {exact_t:.1f} s vs ours {ours_t:.2f} s -> "
          f"RATIO {exact_t / ours_t:.0f}x (goal >= 20)")
    if args.full:
        full_pair(root, out, args)
    if not args.keep:
        import shutil
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
