"""Base spectral norms for the resizer: Lanczos with a residual bound (now) against the power iteration it
replaced (stopped when the estimate moved < 1e-4), on every distinct 2-D LoRA-target shape of SDXL at full
size, with spectra like real weights' (a power-law decay, half of them with a clustered top). Errors
against torch.linalg.matrix_norm; times in the same process, interleaved.

    python bench/spectral_norm.py [--shapes 12]

Goal (issue 14): every error within the 1e-4 bound; time within 1.2x of the power iteration's.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import layout  # noqa: E402

import torch  # noqa: E402

from lora_colab.lowrank.factor import spectral_norm  # noqa: E402


def power_iteration(w, tol=1e-4, max_iter=64, seed=0):
    """The method before issue 14 (lowrank.spectral_norm until then)."""
    x = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(seed)).to(w.device, w.dtype)
    x /= x.norm()
    sigma = 0.0
    for _ in range(max_iter):
        y = w @ x
        new = float(y.norm())
        x = w.T @ y
        x /= x.norm()
        if abs(new - sigma) <= tol * new:
            return new
        sigma = new
    return sigma


def matrix(shape, clustered, gen):
    m, n = shape
    r = min(m, n)
    s = torch.arange(1, r + 1, dtype=torch.float32) ** -0.5
    if clustered:
        s[:4] = torch.tensor([1.0, 0.99, 0.985, 0.98])
    u = torch.linalg.qr(torch.randn(m, r, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=gen)).Q
    return ((u * s) @ v.T).contiguous()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", type=int, default=12, help="distinct target shapes to time (largest first)")
    args = parser.parse_args()
    shapes = sorted({tuple(s) for k, s, _ in layout("sdxl-single-file") if len(s) == 2 and min(s) > 64
                     and k.endswith(".weight") and ("attn" in k or "ff.net" in k or "mlp" in k or "proj" in k)},
                    key=lambda s: -s[0] * s[1])[: args.shapes]
    gen = torch.Generator().manual_seed(0)
    totals = {"lanczos": 0.0, "power": 0.0}
    worst = {"lanczos": 0.0, "power": 0.0}
    for i, shape in enumerate(shapes):
        w = matrix(shape, clustered=i % 2 == 0, gen=gen)
        exact = float(torch.linalg.matrix_norm(w, ord=2))
        for name, method in (("power", power_iteration), ("lanczos", spectral_norm)) if i % 2 else (
                ("lanczos", spectral_norm), ("power", power_iteration)):
            start = time.perf_counter()
            value = method(w)
            totals[name] += time.perf_counter() - start
            worst[name] = max(worst[name], abs(value / exact - 1))
        print(f"{list(shape)}{' clustered top' if i % 2 == 0 else ''}: done", flush=True)
    print(f"{len(shapes)} shapes: Lanczos {totals['lanczos']:.2f} s, worst relative error {worst['lanczos']:.1e}; "
          f"power iteration {totals['power']:.2f} s, worst {worst['power']:.1e}; "
          f"time ratio {totals['lanczos'] / totals['power']:.2f}x (goal <= 1.2)")


if __name__ == "__main__":
    main()
