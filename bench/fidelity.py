"""Fidelity per written module, per architecture x format, on full-width layers.

For each architecture, one target of each kind (the real shapes of its full layout: fused qkv, linear1,
gate_up, bigG's in_proj, ...) gets a full-rank change with a fine-tune-like spectrum (σᵢ ∝ i^-a, a drawn in
0.8-1.8), drawn independently for each row slice a split spelling writes as its own module. Each format's
pieces are factored by the extractor's own `factor_layer` at --rank; each written module's residual
‖Δ_m − up·down‖ is divided by its own optimal rank-r residual (exact singular values of Δ_m). The table gives
the worst module per architecture x format (goal <= 1.01), and, for the split spellings, what the fused path
(one decomposition of the fused weight, its rows then split over the modules: the behaviour before issue 20)
gave, with the time of the per-module path against the fused one.

    python bench/fidelity.py [--rank 32] [--arch flux,zimage] [--kinds 8]
"""

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import NATIVE_LAYOUTS, layout  # noqa: E402

import torch  # noqa: E402

from lora_colab import arch as registry  # noqa: E402
from lora_colab.extraction.layer import factor_layer  # noqa: E402
from lora_colab.lora.formats import pieces  # noqa: E402
from lora_colab.lowrank.factor import bf16_products_fast  # noqa: E402
from lora_colab.extraction.report import LayerReport  # noqa: E402

# SD3.5 Medium here (its attn2 blocks too); the other benches read Large
LAYOUTS = {**NATIVE_LAYOUTS, "sd3": "sd3.5-medium-native"}
FORMATS = ("kohya", "comfy", "diffusers")


def canonical_targets(name):
    """The architecture and its default targets, with canonical shapes, from the real full layout."""
    entries = layout(LAYOUTS[name])
    shapes = {key: tuple(shape) for key, shape, _ in entries}
    detected = registry.detect(set(shapes))
    a = detected.arch
    assert a.name == name, (name, a.name)
    cmap = a.canonical_map(shapes, detected.layout, detected.prefix)
    canonical = {}
    for key, sources in cmap.sources.items():
        if None not in sources:
            parts = [shapes[s] for s in sources]
            canonical[key] = (sum(p[0] for p in parts),) + tuple(parts[0][1:]) if len(parts) > 1 else parts[0]
    return a, a.targets(canonical)


def one_of_each_kind(targets, limit):
    """The first target of each kind (module path with block numbers dropped), split ones first."""
    kinds = {}
    for t in sorted(targets, key=lambda t: not t.splits):
        kinds.setdefault((t.component, re.sub(r"\.\d+\.", ".N.", t.module)), t)
    return list(kinds.values())[:limit]


def power_law(rows, cols, gen, most=1536):
    """A change with σᵢ ∝ i^-a (a in 0.8-1.8) over min(rows, cols, `most`) directions, rms 1 (a long tail
    past any LoRA rank; built in seconds even for FLUX.2's 55296-row linear1)."""
    k = min(rows, cols, most)
    a = 0.8 + float(torch.rand((), generator=gen))
    left = torch.linalg.qr(torch.randn(rows, k, generator=gen)).Q
    right = torch.linalg.qr(torch.randn(cols, k, generator=gen)).Q
    delta = (left * torch.arange(1, k + 1, dtype=torch.float32) ** -a) @ right.T
    return delta / delta.pow(2).mean().sqrt()


def planted(target, gen):
    """(exact change, the bf16 pair's difference) of a target: a bf16 base and a bf16 fine-tune whose
    change is drawn independently per split (what the split spellings write), power-law, 1/10 of the
    weights' rms. The extractor factors the bf16 difference (on a CPU with fast bf16 products; the float32
    one elsewhere); residuals are measured against the exact change."""
    rows, cols = target.shape[0], target.shape[1]
    change = torch.empty(rows, cols)
    for _, a, b in target.splits or (("", 0, rows),):
        change[a:b] = power_law(b - a, cols, gen) * 0.002
    base = (torch.randn(rows, cols, generator=gen) * 0.02).bfloat16()
    tuned = (base.float() + change).bfloat16()
    exact = tuned.float() - base.float()
    difference = tuned - base if bf16_products_fast() else exact
    return exact, difference


def residual(delta, up, down):
    return float((delta - up @ down).double().norm())


def optimal(delta, rank):
    """The optimal rank-r residual ‖Δ − Δ_r‖: from exact singular values, or for large matrices from
    ‖Δ‖² and the top r of a high-accuracy randomized SVD (64 extra columns, 6 power iterations: σ to ~1e-6)."""
    if delta.numel() <= 4096 * 4096:
        s = torch.linalg.svdvals(delta).double()
        return float(s[rank:].pow(2).sum().sqrt())
    torch.manual_seed(1)
    _, s, _ = torch.svd_lowrank(delta, q=rank + 64, niter=6)
    total = float(torch.linalg.vector_norm(delta, dim=1).double().pow(2).sum())
    return max(total - float(s[:rank].double().pow(2).sum()), 0.0) ** 0.5


def factor(part, rank, label):
    """(up, down, seconds) from the extractor's own factorisation (no clamp, 2 power iterations, q = r + 8)."""
    start = time.perf_counter()
    up, down = factor_layer(part, rank, None, 2, 8, None, 0, LayerReport(label, tuple(part.shape)))
    return up, down, time.perf_counter() - start


def measure(a, targets, rank):
    """{format: worst ratio}, {format: worst ratio of the fused path}, and the seconds of the per-module and
    of the fused path over the split targets."""
    gen = torch.Generator().manual_seed(0)
    formats = [fmt for fmt in FORMATS if fmt != "diffusers" or a.diffusers_model]  # (HiDream-O1: no diffusers)
    worst = {fmt: 1.0 for fmt in formats}
    fused_worst = {fmt: 1.0 for fmt in formats}
    per_module_s = fused_s = 0.0
    for target in targets:
        delta, difference = planted(target, gen)
        done = {}  # rows -> (optimal residual, ratio, seconds)

        def result(rows):
            if rows not in done:
                part = delta[rows[0]:rows[1]]
                best = optimal(part, rank)
                up, down, took = factor(difference[rows[0]:rows[1]], rank, target.module)
                done[rows] = (best, residual(part, up, down) / best if best else 1.0, took)
            return done[rows]
        for fmt in formats:
            for piece in pieces(a, fmt, target):
                worst[fmt] = max(worst[fmt], result(piece.rows)[1])
        split = [p for p in pieces(a, "diffusers", target) if not p.whole] if a.diffusers_model else []
        if not split:
            continue
        up, down, took = factor(difference, rank, target.module)  # the fused path: one decomposition, rows split
        fused_s += took
        per_module_s += sum(result(p.rows)[2] for p in split)
        for fmt in formats:
            for piece in pieces(a, fmt, target):
                if not piece.whole:
                    best = result(piece.rows)[0]
                    rows = slice(*piece.rows)
                    ratio = residual(delta[rows], up[rows], down) / best if best else 1.0
                    fused_worst[fmt] = max(fused_worst[fmt], ratio)
    return worst, fused_worst, per_module_s, fused_s


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--arch", default=",".join(LAYOUTS))
    parser.add_argument("--kinds", type=int, default=8, help="targets per architecture (one of each kind)")
    args = parser.parse_args()
    print(f"rank {args.rank}, CPU, {torch.get_num_threads()} threads, {'bf16' if bf16_products_fast() else 'float32'} "
          f"difference of bf16 pairs; residual / optimal residual of the worst written module (goal <= 1.01)")
    print(f"{'architecture':16s}{'targets':>8s}" + "".join(f"{f:>11s}" for f in FORMATS)
          + f"{'fused path (diffusers)':>24s}{'time per-module/fused':>23s}")
    overall = 1.0
    for name in args.arch.split(","):
        a, targets = canonical_targets(name)
        chosen = one_of_each_kind(targets, args.kinds)
        worst, fused, per_module_s, fused_s = measure(a, chosen, args.rank)
        overall = max(overall, *worst.values())
        split = any(t.splits for t in chosen)
        print(f"{name:16s}{len(chosen):8d}" + "".join(f"{worst[f]:11.4f}" if f in worst else f"{'-':>11s}"
                                                      for f in FORMATS)
              + (f"{fused['diffusers']:24.4f}{per_module_s / fused_s:22.2f}x" if split and fused_s else
                 f"{'(no split module)':>24s}{'-':>23s}"), flush=True)
    print(f"WORST written module over every architecture and format: {overall:.4f} (goal <= 1.01)")


if __name__ == "__main__":
    main()
