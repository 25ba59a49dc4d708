"""Expected rounding noise of a quantized weight, from its format's step size: what a quantized checkpoint
beside an unquantized one adds, full rank, to their difference.

Rounding to a grid of step h errs uniformly in ±h/2: variance h²/12 per value. Block formats (GGUF) have
one step per (sub-)block of b-bit codes, estimated as the block's range / (2^b − 1); floating formats (fp8)
have a step of 2^(exponent − mantissa bits) at each value.
"""

import torch

# GGML type -> (values sharing one step, code bits)
_BLOCKS = {"Q8_0": (32, 8), "Q4_0": (32, 4), "Q4_1": (32, 4), "Q5_0": (32, 5), "Q5_1": (32, 5), "Q2_K": (16, 2),
           "Q3_K": (16, 3), "Q4_K": (32, 4), "Q5_K": (32, 5), "Q6_K": (16, 6), "IQ4_NL": (32, 4), "IQ4_XS": (32, 4)}
_MANTISSA = {"F8_E4M3": 3, "F8_E5M2": 2, "MXFP8": 3}  # MXFP8: E4M3 under power-of-two scales
_E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_E2M1_WIDTH = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.75, 1.0, 1.5, 1.0])


def is_lossy(stored):
    """True for stored types whose values were rounded from a finer one (GGUF quants, fp8, NVFP4, MXFP8,
    INT8)."""
    return stored in _BLOCKS or stored in _MANTISSA or stored in ("NVFP4", "INT8")


_CHUNK = 1 << 22  # values per step: the estimate's temporaries stay small for any layer


def noise_sq(values, stored):
    """Expected ‖noise‖² of `values` (float, as dequantized) stored as `stored`; 0 for float formats."""
    if not is_lossy(stored):
        return 0.0
    if stored == "INT8":  # symmetric codes in ±127 with one step per row (its largest value at 127)
        rows = values.reshape(values.shape[0], -1).float()
        step = rows.abs().amax(dim=1) / 127
        return float(step.double().pow(2).sum()) * rows.shape[1] / 12
    flat = values.reshape(-1)
    size = _BLOCKS.get(stored, (16,))[0] if stored not in _MANTISSA else 1
    flat = flat[: flat.numel() // size * size]
    step = _CHUNK // size * size
    return sum(_chunk_noise_sq(flat[i:i + step], stored) for i in range(0, flat.numel(), step))


def _chunk_noise_sq(flat, stored):
    if stored in _BLOCKS:
        size, bits = _BLOCKS[stored]
        low, high = torch.aminmax(flat.reshape(-1, size).float(), dim=1)
        step = (high - low) / (2 ** bits - 1)
        return float(step.double().pow(2).sum()) * size / 12
    if stored == "NVFP4":  # E2M1 codes per 16 values, the block's largest at 6
        blocks = flat.reshape(-1, 16).float()
        scale = blocks.abs().amax(dim=1, keepdim=True) / 6
        code = (blocks.abs() / scale.clamp_min(1e-30)).unsqueeze(-1).sub(_E2M1_GRID.to(blocks.device)).abs().argmin(-1)
        width = _E2M1_WIDTH.to(blocks.device)[code] * scale  # the interval rounding to each code (6: up to the max)
        return float(width.double().pow(2).sum()) / 12
    _, exponent = torch.frexp(flat.float())  # |v| = m · 2^e with m in [0.5, 1)
    step = torch.exp2((exponent - 1 - _MANTISSA[stored]).float())
    return float(step.double().pow(2).sum()) / 12
