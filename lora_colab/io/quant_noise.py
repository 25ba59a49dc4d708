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
_MANTISSA = {"F8_E4M3": 3, "F8_E5M2": 2}


def is_lossy(stored):
    """True for stored types whose values were rounded from a finer one (GGUF quants, fp8)."""
    return stored in _BLOCKS or stored in _MANTISSA


def noise_sq(values, stored):
    """Expected ‖noise‖² of `values` (float, as dequantized) stored as `stored`; 0 for float formats."""
    if stored in _BLOCKS:
        size, bits = _BLOCKS[stored]
        flat = values.reshape(-1)
        flat = flat[: flat.numel() // size * size].reshape(-1, size).float()
        low, high = torch.aminmax(flat, dim=1)
        step = (high - low) / (2 ** bits - 1)
        return float(step.double().pow(2).sum()) * size / 12
    if stored in _MANTISSA:
        _, exponent = torch.frexp(values.float())  # |v| = m · 2^e with m in [0.5, 1)
        step = torch.ldexp(torch.ones((), device=values.device), exponent - 1 - _MANTISSA[stored])
        return float(step.double().pow(2).sum()) / 12
    return 0.0
