"""Low-rank factorisation of one weight difference: randomized or exact SVD, balanced factors, and the
outlier clamp."""

import math
from dataclasses import dataclass

import torch


def low_rank(delta, rank, niter=4, oversample=8, generator_seed=0):
    """Top-`rank` SVD of a 2-D float tensor: (U [m,r], S [r], V [n,r]).

    Randomized (`torch.svd_lowrank`, q = rank + oversample, `niter` power iterations) unless the
    matrix is small enough that the exact thin SVD is as cheap; never `full_matrices=True`.
    """
    m, n = delta.shape
    rank = min(rank, m, n)
    q = min(rank + oversample, m, n)
    if min(m, n) <= max(64, 2 * q):
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank].T
    devices = [delta.device] if delta.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(generator_seed)
        u, s, v = torch.svd_lowrank(delta, q=q, niter=niter)
    return u[:, :rank], s[:rank], v[:, :rank]


def quantile(values, q):
    """Exact q-quantile of a 1-D tensor (kthvalue: no input-size limit, unlike torch.quantile)."""
    k = min(values.numel(), max(1, math.ceil(q * values.numel())))
    return values.float().cpu().kthvalue(k).values.item()


@dataclass
class Clamp:
    """Per-row scale of up and per-column scale of down (1 where nothing was cut)."""

    up_scale: torch.Tensor
    down_scale: torch.Tensor

    @property
    def cut_fraction(self):
        cut = int((self.up_scale < 1).sum()) + int((self.down_scale < 1).sum())
        return cut / (self.up_scale.numel() + self.down_scale.numel())


def clamp_outliers(up, down, q):
    """Scale rows of `up` [m,r] and columns of `down` [r,n] whose norm exceeds the q-quantile of their
    norms down to that quantile. Every entry of up @ down is then at most t_up · t_down in magnitude
    (Cauchy–Schwarz), which cuts the spikes that give NaN or black images, while a difference without
    outliers barely moves. Returns (up, down, Clamp)."""
    row = up.norm(dim=1)
    col = down.norm(dim=0)
    up_scale = (quantile(row, q) / row.clamp_min(1e-30)).clamp(max=1.0)
    down_scale = (quantile(col, q) / col.clamp_min(1e-30)).clamp(max=1.0)
    return up * up_scale[:, None], down * down_scale, Clamp(up_scale, down_scale)


def product_change(up, down, clamp):
    """‖P − P_c‖_F / ‖P‖_F for P = up @ down and the clamped P_c, from r×r products only."""
    x, y = up.double(), down.double().T  # P = x yᵀ
    d, e = clamp.up_scale.double(), clamp.down_scale.double()
    xx = lambda w: x.T @ (w[:, None] * x)  # noqa: E731  Xᵀ diag(w) X
    yy = lambda w: y.T @ (w[:, None] * y)  # noqa: E731
    one_x, one_y = torch.ones_like(d), torch.ones_like(e)
    p_sq = torch.trace(xx(one_x) @ yy(one_y))
    cross = torch.trace(xx(d) @ yy(e))
    pc_sq = torch.trace(xx(d * d) @ yy(e * e))
    change_sq = (p_sq - 2 * cross + pc_sq).clamp_min(0)
    return float(change_sq.sqrt() / p_sq.sqrt().clamp_min(1e-30))


def norm_sq(x):
    """‖x‖²_F accurate enough for ‖Δ‖² − ‖S‖² cancellations: float32 norms of rows (short sums) added in
    double. A float64 cast of the whole tensor costs ~10x more; one float32 reduction loses ~1e-4."""
    rows = x.reshape(x.shape[0], -1) if x.dim() else x.reshape(1, 1)
    return float(torch.linalg.vector_norm(rows, dim=1).double().pow(2).sum())


def clamped_residual_sq(delta, u, s, v, clamp, total_sq=None):
    """‖delta − P_c‖²_F for the clamped product P_c = (D·U√S)(√S·Vᵀ·E), touching only clipped rows/columns.

    Uses ‖Δ − P_c‖² = ‖Δ‖² − 2⟨Δ, P_c⟩ + ‖P_c‖², with ⟨Δ, U S Vᵀ⟩ = ‖S‖² (exact for an SVD that projects
    Δ on its subspaces), so only the rows and columns the clamp scaled need a pass over Δ.
    """
    x = (u * s.sqrt()).double()            # up before the clamp, [m, r]
    y = (v * s.sqrt()).double()            # downᵀ before the clamp, [n, r]
    d, e = clamp.up_scale.double(), clamp.down_scale.double()
    rows = (d < 1).nonzero().flatten()
    cols = (e < 1).nonzero().flatten()
    inner = float(s.double().pow(2).sum())  # ⟨Δ, P⟩
    if rows.numel():  # rows i with d_i < 1: (P_c − P)[i, :] = x_i (d_i e ∘ y − y)ᵀ
        block = delta.index_select(0, rows.to(delta.device)).double()
        yc = (e[:, None] * y)
        inner += float(((d[rows, None] * x[rows]) * (block @ yc)).sum() - (x[rows] * (block @ y)).sum())
    if cols.numel():  # remaining rows, columns j with e_j < 1: (P_c − P)[i, j] = x_i·y_j (e_j − 1)
        keep = torch.ones(x.shape[0], dtype=torch.bool)
        keep[rows] = False
        block = delta.index_select(1, cols.to(delta.device)).double()[keep.to(delta.device)]
        inner += float((x[keep] * (block @ ((e[cols] - 1)[:, None] * y[cols]))).sum())
    xx = x.T @ ((d * d)[:, None] * x)
    yy = y.T @ ((e * e)[:, None] * y)
    pc_sq = float(torch.trace(xx @ yy))
    total_sq = norm_sq(delta) if total_sq is None else total_sq
    return total_sq - 2 * inner + pc_sq


def spectral_norm(w, tol=1e-4, max_iter=64, seed=0):
    """Largest singular value by power iteration on WᵀW, stopped when the estimate moves < tol (relative)
    or after max_iter rounds (the budget of elias-gaeros/resize_lora: q=1, niter=64).

    The estimate ‖W x‖ only ever rises towards σ₁ (Rayleigh quotient); its error is quadratic in the
    vector's, so a flat spectrum costs iterations, not accuracy in the score's log10 terms.
    """
    x = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(seed)).to(w.device, w.dtype)
    x /= x.norm()
    sigma = 0.0
    for _ in range(max_iter):
        y = w @ x
        new = float(y.norm())
        if new == 0.0:
            return 0.0
        x = w.T @ y
        x /= x.norm()
        if abs(new - sigma) <= tol * new:
            return new
        sigma = new
    return sigma
