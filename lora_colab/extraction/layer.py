"""One layer's factors: the randomized SVD of its difference, the rank an energy target keeps, the balanced
and clamped up/down factors with their error figures, and each piece's rows and sketch seed."""

import math
import zlib

import torch

from ..lowrank.factor import BlockedDelta, clamp_outliers, clamped_residual_sq, low_rank, max_abs, norm_sq, \
    product_change


def layer_seed(seed, key):
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63)


def choose_rank(s, total_sq, max_rank, energy):
    """The smallest rank whose directions keep `energy` of ‖ΔW‖² (`max_rank` without an energy target)."""
    if energy is None or total_sq == 0:
        return max_rank
    kept = torch.cumsum(s.double() ** 2, 0) / total_sq
    reached = (kept >= energy).nonzero()
    return int(reached[0]) + 1 if reached.numel() else max_rank


def decompose_layer(delta, rank, niter, oversample, seed):
    """(flat difference, U, S, V, ‖ΔW‖²) of one difference, its top `rank` directions."""
    flat = delta.reshape(delta.shape[0], -1)
    stats = {}
    u, s, v = low_rank(flat, rank, niter=niter, oversample=oversample, generator_seed=seed, stats=stats)
    if isinstance(flat, BlockedDelta):
        total_sq = flat.norm_sq
    else:
        total_sq = stats["norm_sq"] if "norm_sq" in stats else norm_sq(flat)
    return flat, u, s, v, total_sq


def finish_layer(u, s, v, total_sq, clamp_quantile, layer, flat=None):
    """Balanced factors (up, down) of the kept directions U·diag(S)·Vᵀ, clamped; fills `layer`.

    up = U·√S and down = √S·Vᵀ (balanced, for fp16/bf16 headroom); with clamp_quantile, outlier rows of
    up and columns of down are scaled down (see lowrank.clamp_outliers). With the difference `flat` the
    clamped error is exact; without it (a recipe chose the directions after the pass) it adds the clamp's
    change to the truncation error as if they were orthogonal.
    """
    r = s.numel()
    kept_sq = float(s.double().pow(2).sum())
    root = s.sqrt()
    up, down = u * root, root[:, None] * v.T
    layer.rank = r
    layer.singular_values = [round(float(x), 8) for x in s]
    layer.diff_norm = math.sqrt(total_sq)
    layer.energy = min(1.0, kept_sq / total_sq) if total_sq else 1.0
    res_sq = total_sq - kept_sq  # exact: the SVD's part is an orthogonal projection of the difference
    if clamp_quantile is not None and clamp_quantile < 1.0 and r:
        up, down, clamp = clamp_outliers(up, down, clamp_quantile)
        layer.clipped = clamp.cut_fraction
        layer.clamp_change = product_change(u * root, root[:, None] * v.T, clamp)
        if layer.clamp_change:
            res_sq = (clamped_residual_sq(flat, u, s, v, clamp, total_sq) if flat is not None
                      else res_sq + layer.clamp_change ** 2 * kept_sq)
    layer.rel_error = math.sqrt(max(res_sq, 0.0) / total_sq) if total_sq else 0.0
    return up, down


def factor_layer(delta, rank, clamp_quantile, niter, oversample, energy, seed, layer):
    """Factor one difference: returns (up, down) with up @ down ≈ delta, and fills `layer` (a LayerReport)."""
    flat, u, s, v, total_sq = decompose_layer(delta, rank, niter, oversample, seed)
    r = choose_rank(s, total_sq, s.numel(), energy)
    return finish_layer(u[:, :r], s[:r], v[:, :r], total_sq, clamp_quantile, layer, flat)


def piece_rows(delta, piece):
    """The piece's rows of a target's difference (a view; a BlockedDelta slice for blocked layers)."""
    if piece.whole:
        return delta
    if isinstance(delta, BlockedDelta):
        return delta.rows(*piece.rows)
    return delta.reshape(delta.shape[0], -1)[piece.rows[0]:piece.rows[1]]


def piece_seed(seed, piece):
    """A piece's sketch seed: the target's (whole pieces), or one of its own for a slice."""
    key = piece.target.key if piece.whole else f"{piece.target.key}[{piece.rows[0]}:{piece.rows[1]}]"
    return layer_seed(seed, key)


def layer_max_abs(delta):
    """max |delta| (nan or inf when the difference is not finite)."""
    return delta.max_abs if isinstance(delta, BlockedDelta) else max_abs(delta)
