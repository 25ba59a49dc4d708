"""Low-rank factorisation of one weight difference: randomized or exact SVD, balanced factors, and the
outlier clamp."""

import math
from dataclasses import dataclass

import torch


def low_rank(delta, rank, niter=2, oversample=8, generator_seed=0, stats=None):
    """Top-`rank` SVD of a 2-D float tensor: (U [m,r], S [r], V [n,r]).

    Randomized (q = rank + oversample, `niter` power iterations) unless the matrix is small enough that the
    exact thin SVD is as cheap; never `full_matrices=True`. A float32 matrix goes through `torch.svd_lowrank`;
    a bf16 one (on a GPU, one with bf16 units; a BlockedDelta where bf16 products are fast) through
    `low_rank_bf16`, which puts ‖delta‖² in `stats["norm_sq"]` (a dict, when given) from the pass it makes anyway.
    """
    m, n = delta.shape
    rank = min(rank, m, n)
    q = min(rank + oversample, m, n)
    small = min(m, n) <= max(64, 2 * q)
    if isinstance(delta, BlockedDelta):
        if small:
            delta = delta.data.float()
        elif bf16_products_fast(delta.device):
            return low_rank_bf16(delta.data, rank, niter, oversample, generator_seed, stats)
        else:
            return low_rank_blocked(delta, rank, niter, oversample, generator_seed)
    if delta.dtype != torch.float32:
        if not small and delta.dtype == torch.bfloat16 and (delta.device.type == "cpu"
                                                            or bf16_products_fast(delta.device)):
            return low_rank_bf16(delta, rank, niter, oversample, generator_seed, stats)
        delta = delta.float()
    if small:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank].T
    devices = [delta.device] if delta.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(generator_seed)
        u, s, v = torch.svd_lowrank(delta, q=q, niter=niter)
    return u[:, :rank], s[:rank], v[:, :rank]


_BF16_FAST = {}


def bf16_products_fast(device="cpu"):
    """Whether bf16 matrix products on `device` are clearly faster than float32 ones, so that a bf16 pair is
    factored from its bf16 difference. A CUDA GPU: compute capability 8.0 or more (bf16 tensor cores, Ampere
    on; LORA_COLAB_GPU_BF16=0 turns it off, to time the float32 path a T4 takes); a T4 (7.5, Colab's GPU) has
    no bf16 units, so its products stay float32, whatever is forced. A CPU: timed once per process on a
    sketch-shaped product (AVX-512 BF16, AMX); LORA_COLAB_BF16_SKETCH=1/0 forces its answer."""
    import os
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8 and os.environ.get("LORA_COLAB_GPU_BF16") != "0"
    if device.type != "cpu":
        return False
    forced = os.environ.get("LORA_COLAB_BF16_SKETCH")
    if forced in ("0", "1"):
        return forced == "1"
    if "cpu" not in _BF16_FAST:
        import time
        a = torch.randn(3072, 3072)  # a layer-sized product: small ones hide bf16's advantage (0.7x vs 0.37x)
        x = torch.randn(3072, 40)
        ab, xb = a.bfloat16(), x.bfloat16()

        times = {"bf16": [], "fp32": []}
        for _ in range(6):  # interleaved, the fastest of each: a busy machine slows both alike
            for name, f in (("bf16", lambda: ab @ xb), ("fp32", lambda: a @ x)):
                start = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - start)
        _BF16_FAST["cpu"] = min(times["bf16"]) < 0.7 * min(times["fp32"])
    return _BF16_FAST["cpu"]


def _rows_fp32(a, block_bytes=8 << 20):
    """Row blocks of a 2-D matrix as float32: (start, block), one cache-sized block at a time; a low-precision
    one is cast into one reused buffer (a fresh 8 MiB tensor per block costs its page faults each time: 5x
    the cast), a float32 one is sliced. A block is valid until the next one is taken."""
    rows = min(a.shape[0], max(1, block_bytes // max(1, a.shape[1] * 4)))
    if a.dtype == torch.float32:
        for start in range(0, a.shape[0], rows):
            yield start, a[start:start + rows]
        return
    buffer = torch.empty(rows, a.shape[1], device=a.device)
    for start in range(0, a.shape[0], rows):
        block = buffer[:min(rows, a.shape[0] - start)]
        block.copy_(a[start:start + rows])
        yield start, block


def low_rank_bf16(a, rank, niter=2, oversample=8, generator_seed=0, stats=None):
    """Randomized SVD of a bf16 matrix (a difference of bf16 checkpoints, exact in bf16 where the weights
    are close): the sketch and the first power iterations multiply in bf16 (half the bytes, twice the
    speed where the CPU has bf16 dot products); the last range product and the projection B = QᵀA run in
    float32 row blocks, so the subspace and the singular values are as accurate as the float32 algorithm's
    (same q, same iterations: ≤ 1.007x the optimal residual on power-law spectra, like torch.svd_lowrank).
    Returns (U [m,r], S [r], V [n,r]); with a dict `stats`, also ‖A‖² in stats["norm_sq"] (from the
    projection's float32 blocks: no pass of its own)."""
    m, n = a.shape
    rank = min(rank, m, n)
    q = min(rank + oversample, m, n)
    gen = torch.Generator().manual_seed(generator_seed)
    omega = torch.randn(n, q, generator=gen).to(a.device, torch.bfloat16)
    basis = torch.linalg.qr((a @ omega).float()).Q
    for i in range(niter):
        back = torch.linalg.qr((a.T @ basis.bfloat16()).float()).Q
        if i < niter - 1:
            basis = torch.linalg.qr((a @ back.bfloat16()).float()).Q
        else:
            product = torch.empty(m, q, device=a.device)
            for start, block in _rows_fp32(a):
                torch.mm(block, back, out=product[start:start + block.shape[0]])
            basis = torch.linalg.qr(product).Q
    projected = torch.zeros(n, q, device=a.device)  # Aᵀ Q = (Qᵀ A)ᵀ
    total = 0.0
    for start, block in _rows_fp32(a):
        projected.addmm_(block.T, basis[start:start + block.shape[0]])
        if stats is not None:
            total += float(torch.linalg.vector_norm(block, dim=1).double().pow(2).sum())
    if stats is not None:
        stats["norm_sq"] = total
    u_small, s, vh = torch.linalg.svd(projected.T, full_matrices=False)
    return (basis @ u_small)[:, :rank], s[:rank], vh[:rank].T


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
    if rows.dtype in (torch.bfloat16, torch.float16):  # in float32 row blocks: bf16 sums lose digits, and
        # vector_norm's own upcast is ~10x slower than a cast and a float32 norm
        return sum(float(torch.linalg.vector_norm(block, dim=1).double().pow(2).sum())
                   for _, block in _rows_fp32(rows))
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
        w = (e[cols] - 1)[:, None] * y[cols]
        cols_on = cols.to(delta.device)
        step = max(1, (4 << 20) // max(1, cols.numel() * 8))  # row chunks: no m × |cols| double copy
        for start in range(0, x.shape[0], step):
            stop = min(x.shape[0], start + step)
            part = keep[start:stop]
            if part.any():
                block = _column_block(delta, start, stop, cols_on).double()[part.to(delta.device)]
                inner += float((x[start:stop][part] * (block @ w)).sum())
    xx = x.T @ ((d * d)[:, None] * x)
    yy = y.T @ ((e * e)[:, None] * y)
    pc_sq = float(torch.trace(xx @ yy))
    total_sq = norm_sq(delta) if total_sq is None else total_sq
    return total_sq - 2 * inner + pc_sq


def _column_block(delta, start, stop, cols):
    """Rows start:stop, columns `cols` of a tensor or BlockedDelta, float32."""
    if isinstance(delta, BlockedDelta):
        return delta.data[start:stop].index_select(1, cols).float()
    return delta[start:stop].index_select(1, cols)


class RowBlocks:
    """A 2-D matrix kept in its stored dtype (bf16 for most checkpoints) and used in float32 row blocks:
    products and norms of a base weight without a float32 copy of it."""

    def __init__(self, data, block_bytes=8 << 20, blocked=False):
        self.data = data.reshape(data.shape[0], -1)
        self.blocked = blocked  # the extractor holds this layer in row blocks: no float32 copy of it
        self.shape = tuple(self.data.shape)
        self.device = self.data.device
        self._block_bytes = block_bytes

    def rows(self, start, stop):
        """Rows start:stop of the matrix, a RowBlocks sharing its storage."""
        if (start, stop) == (0, self.shape[0]):
            return self
        return RowBlocks(self.data[start:stop], blocked=self.blocked)

    def blocks(self):
        return _rows_fp32(self.data, self._block_bytes)

    def dense(self):
        return self.data.float()

    def mm(self, x):
        """W @ x (x [n] or [n, k]), float32."""
        return torch.cat([block @ x for _, block in self.blocks()])

    mv = mm

    def rmv(self, y):
        """Wᵀ @ y for a vector y [m], float32."""
        out = torch.zeros(self.shape[1], device=self.device)
        for start, block in self.blocks():
            out += block.T @ y[start:start + block.shape[0]]
        return out

    def fro(self):
        """‖W‖_F."""
        return math.sqrt(sum(float(torch.linalg.vector_norm(block).double() ** 2) for _, block in self.blocks()))


def base_references(w, u, v, keys):
    """The base-relative references of one layer's directions, as the resizer's scores use them:
    {"spn_ckpt": ‖W‖₂, "fro_ckpt": ‖W‖_F, "subspace": |uᵢᵀ W vᵢ| per direction} for the `keys` asked,
    W a RowBlocks of the base weight, (u, v) the difference's singular vectors."""
    refs = {}
    if "spn_ckpt" in keys:
        small = min(w.shape) <= 128
        # Lanczos takes some 30-160 products: a float32 copy beats casting the blocks each time, where it is
        # no larger than the difference the extractor already holds (blocked layers keep the row blocks)
        dense = w.dense() if small or w.data.dtype == torch.float32 or not w.blocked else None
        refs["spn_ckpt"] = (float(torch.linalg.matrix_norm(dense, ord=2)) if small else
                            spectral_norm(dense if dense is not None else w))
        del dense
    if "fro_ckpt" in keys:
        refs["fro_ckpt"] = w.fro()
    if "subspace" in keys:
        refs["subspace"] = (u * w.mm(v)).sum(dim=0).abs().cpu()
    return refs


def spectral_norm(w, rtol=1e-4, max_steps=160, seed=0):
    """σ₁ of W by Golub–Kahan–Lanczos bidiagonalization (full reorthogonalization), stopped by a residual
    test that bounds the error.

    After k steps W·V_k = U_k·B_k with B_k bidiagonal; the top Ritz triple of B_k (θ, p, q) has Wṽ = θũ
    exactly and ‖Wᵀũ − θṽ‖ = β_k·|p_k|, which bounds the distance from θ to a singular value of W; the loop
    stops when that is ≤ rtol·θ, and θ never exceeds σ₁. Two matrix-vector products a step, like power
    iteration, but on a flat spectrum (σ₂/σ₁ ≈ 0.98, where power iteration stalls 0.3–2% low) Lanczos
    converges with the square root of the gap. `w`: a float32 tensor, or any other dtype (used through
    RowBlocks, in float32 row blocks, without a float32 copy).
    """
    if not isinstance(w, RowBlocks) and w.dtype != torch.float32:
        w = RowBlocks(w)
    m, n = w.shape
    if min(m, n) <= 64:
        return float(torch.linalg.matrix_norm(w.dense() if isinstance(w, RowBlocks) else w, ord=2))
    mv, rmv = (w.mv, w.rmv) if isinstance(w, RowBlocks) else ((lambda x: w @ x), (lambda y: w.T @ y))
    steps = min(max_steps, min(m, n))
    dtype = torch.float32
    vs = torch.zeros(steps + 1, n, dtype=dtype, device=w.device)
    us = torch.zeros(steps, m, dtype=dtype, device=w.device)
    alphas, betas = [], []
    v = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(w.device, dtype)
    vs[0] = v / v.norm()
    beta, theta = 0.0, 0.0
    for k in range(steps):
        u = mv(vs[k])
        if k:
            u -= beta * us[k - 1]
        u -= us[:k].T @ (us[:k] @ u)           # full reorthogonalization
        alpha = float(u.norm())
        if alpha == 0.0:
            break
        us[k] = u / alpha
        v = rmv(us[k]) - alpha * vs[k]
        v -= vs[:k + 1].T @ (vs[:k + 1] @ v)
        beta = float(v.norm())
        alphas.append(alpha)
        betas.append(beta)
        bidiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if k:
            bidiagonal += torch.diag(torch.tensor(betas[:-1], dtype=torch.float64), 1)
        p, sigma, _ = torch.linalg.svd(bidiagonal)
        theta = float(sigma[0])
        if beta * abs(float(p[k, 0])) <= rtol * theta or beta == 0.0:
            return theta
        vs[k + 1] = v / beta
    return theta


def max_abs(tensor):
    """max |entry| in one pass without a temporary (nan or inf when the tensor is not finite)."""
    if not tensor.numel():
        return 0.0
    low, high = torch.aminmax(tensor)
    return math.nan if low.isnan() or high.isnan() else max(abs(float(low)), abs(float(high)))


class BlockedDelta:
    """A large difference held in bf16 (half the float32 memory) and used in float32 row blocks.

    Built row block by row block from the two checkpoints, so neither model's whole tensor is ever in
    memory; max |entry| and finiteness come from the float32 blocks, the norm from the stored bf16 matrix
    (the one factored, so that ‖Δ‖² − ‖S‖² stays exact; bf16 storage moves entries by at most 2⁻⁹ relative,
    below the bf16 factors' own rounding).
    Quacks like the 2-D float32 tensor the factorisation needs: shape, matmuls, index_select.
    """

    def __init__(self, data, norm_sq, max_abs):
        self.data = data            # [m, n] bfloat16
        self.norm_sq = norm_sq      # ‖Δ‖² of the stored matrix
        self.max_abs = max_abs      # max |Δ| (nan/inf when not finite)
        self.shape = tuple(data.shape)
        self.device = data.device

    @classmethod
    def build(cls, read_tuned, read_base, shape, block_bytes=8 << 20, base_out=None):
        """From `read_x(start, stop)` (rows as float32 2-D) of a [m, n] weight; with `base_out` (a [m, n]
        tensor), the base's rows are kept there too, from the same reads."""
        from ..io.buffers import empty_bytes

        m, n = shape
        data = empty_bytes(m * n * 2).view(torch.bfloat16).reshape(m, n)
        rows = max(1, block_bytes // max(1, n * 4))
        norm, peak = 0.0, 0.0
        for start in range(0, m, rows):
            stop = min(m, start + rows)
            block = read_tuned(start, stop)
            base = read_base(start, stop)
            if base_out is not None:
                base_out[start:stop].copy_(base)
            block.sub_(base)
            del base
            value = max_abs(block)
            peak = math.nan if math.isnan(value) or math.isnan(peak) else max(peak, value)
            data[start:stop].copy_(block)
            norm += float(torch.linalg.vector_norm(data[start:stop].float(), dim=1).double().pow(2).sum())
            del block
        return cls(data, norm, peak)

    def rows(self, start, stop):
        """Rows start:stop as a BlockedDelta sharing this one's storage (itself when that is every row)."""
        if (start, stop) == (0, self.shape[0]):
            return self
        data = self.data[start:stop]
        return BlockedDelta(data, norm_sq(data), max_abs(data))

    def numel(self):
        return self.data.numel()

    def element_size(self):
        return self.data.element_size()

    def reshape(self, *shape):
        return self

    def _blocks(self):
        return _rows_fp32(self.data)

    def matmul(self, x):
        """Δ @ x, float32."""
        return torch.cat([block @ x for _, block in self._blocks()])

    def rmatmul(self, y):
        """Δᵀ @ y, float32."""
        out = torch.zeros(self.shape[1], y.shape[1])
        for start, block in self._blocks():
            out.addmm_(block.T, y[start:start + block.shape[0]])
        return out

    def index_select(self, dim, index):
        """Rows `index` (dim 0), float32: what the clamp residual reads of clipped rows."""
        if dim != 0:
            raise ValueError("BlockedDelta selects rows only")
        return self.data.index_select(0, index).float()


def low_rank_blocked(delta, rank, niter=2, oversample=8, generator_seed=0):
    """Randomized SVD of a BlockedDelta (the algorithm of torch.svd_lowrank: range finder with QR between
    power iterations), one row block in float32 at a time. Returns (U [m,r], S [r], V [n,r])."""
    m, n = delta.shape
    rank = min(rank, m, n)
    q = min(rank + oversample, m, n)
    omega = torch.randn(n, q, generator=torch.Generator().manual_seed(generator_seed))
    basis = torch.linalg.qr(delta.matmul(omega)).Q
    for _ in range(niter):
        back = torch.linalg.qr(delta.rmatmul(basis)).Q
        basis = torch.linalg.qr(delta.matmul(back)).Q
    u_small, s, vh = torch.linalg.svd(delta.rmatmul(basis).T, full_matrices=False)
    return (basis @ u_small)[:, :rank], s[:rank], vh[:rank].T
