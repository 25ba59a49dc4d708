"""GGML block formats and their dequantization in torch (vectorised over blocks, bit-exact with the
`gguf` package's reference `gguf.quants.dequantize`).

Each dequantizer takes a uint8 tensor of shape (blocks, type size) and returns float32 of shape
(blocks, block size).
"""

import torch

QK_K = 256

# GGML type id -> (name, elements per block, bytes per block), as in gguf's GGML_QUANT_SIZES
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}
BY_NAME = {name: (type_id, block, size) for type_id, (name, block, size) in GGML_TYPES.items()}
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _f16(b):
    """Little-endian float16 fields (blocks, 2k bytes) -> float32 (blocks, k)."""
    return b.contiguous().view(torch.float16).float()


def _bits(x, group, shifts, mask):
    """Split each `group` bytes of x (blocks, n) by the given right shifts: (blocks, n/group, shifts, group)."""
    s = torch.tensor(shifts, dtype=torch.uint8).reshape(1, 1, -1, 1)
    return (x.reshape(x.shape[0], -1, 1, group) >> s) & mask


def _q8_0(b):
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _q4_0(b):
    q = _bits(b[:, 2:], 16, [0, 4], 0x0F).reshape(b.shape[0], -1).to(torch.int16) - 8
    return _f16(b[:, :2]) * q.float()


def _q4_1(b):
    q = _bits(b[:, 4:], 16, [0, 4], 0x0F).reshape(b.shape[0], -1).float()
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _five_bit(qh_bytes, qs):
    """The 5-bit quants of Q5_0/Q5_1: 16 bytes of low nibbles plus 32 high bits."""
    qh = qh_bytes.contiguous().view(torch.int32)  # (blocks, 1)
    high = ((qh >> torch.arange(32, dtype=torch.int32)) & 1).to(torch.uint8)
    low = _bits(qs, 16, [0, 4], 0x0F).reshape(qs.shape[0], -1)
    return (low | (high << 4)).to(torch.int16)


def _q5_0(b):
    return _f16(b[:, :2]) * (_five_bit(b[:, 2:6], b[:, 6:]) - 16).float()


def _q5_1(b):
    return _f16(b[:, :2]) * _five_bit(b[:, 4:8], b[:, 8:]).float() + _f16(b[:, 2:4])


def _q2_k(b):
    n = b.shape[0]
    scales, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(qs, 32, [0, 2, 4, 6], 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b):
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = _bits(scales[:, :8], 8, [0, 4], 0xFF).reshape(n, 16)
    high = _bits(scales[:, 8:12], 4, [0, 2, 4, 6], 0xFF).reshape(n, 16)
    sc = ((low & 0x0F) | ((high & 0x03) << 4)).to(torch.int16) - 32
    dl = (d * sc.float()).reshape(n, 16, 1)
    ql = _bits(qs, 32, [0, 2, 4, 6], 3).reshape(n, 16, 16).to(torch.int16)
    qh = (_bits(hmask, 32, list(range(8)), 1).reshape(n, 16, 16) ^ 1).to(torch.int16)
    return (dl * (ql - (qh << 2)).float()).reshape(n, QK_K)


def _scale_min_k4(scales):
    """Q4_K/Q5_K's 6-bit scales and mins, packed in 12 bytes."""
    s = scales.reshape(scales.shape[0], 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _q4_k(b):
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc).reshape(n, -1, 1)
    dm = (_f16(b[:, 2:4]) * mn).reshape(n, -1, 1)
    q = _bits(b[:, 16:], 32, [0, 4], 0x0F).reshape(n, -1, 32).float()
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(b):
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc).reshape(n, -1, 1)
    dm = (_f16(b[:, 2:4]) * mn).reshape(n, -1, 1)
    ql = _bits(b[:, 48:], 32, [0, 4], 0x0F).reshape(n, -1, 32)
    qh = _bits(b[:, 16:48], 32, list(range(8)), 1).reshape(n, -1, 32)
    return (d * (ql | (qh << 4)).float() - dm).reshape(n, QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    d = (d * scales.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    low = _bits(ql, 64, [0, 4], 0x0F).reshape(n, -1, 32)
    high = _bits(qh, 32, [0, 2, 4, 6], 3).reshape(n, -1, 32)
    q = ((low | (high << 4)).to(torch.int16) - 32).reshape(n, 16, -1).float()
    return (d * q).reshape(n, QK_K)


DEQUANTIZE = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q2_K": _q2_k,
              "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def _q8_0_into(blocks, out):
    """Q8_0 straight into `out`: int8 quants times their block's scale."""
    view = out.view(blocks.shape[0], -1)
    view.copy_(blocks[:, 2:].view(torch.int8))  # a cast then an in-place multiply: 4x a mixed-dtype mul
    view.mul_(_f16(blocks[:, :2]))
    return out


def dequantize(raw, type_name, numel, out=None):
    """float32 values of `numel` elements stored as `type_name` in the uint8 tensor `raw` (into `out`, a
    contiguous float32 tensor of `numel` elements, when given)."""
    if type_name in FLOAT_TYPES:
        values = raw.view(FLOAT_TYPES[type_name])
        return values.float() if out is None else out.copy_(values)
    _, block, size = BY_NAME[type_name]
    blocks = raw.reshape(-1, size)
    if type_name == "Q8_0" and out is not None and numel == blocks.shape[0] * block:
        return _q8_0_into(blocks, out)
    if type_name in DEQUANTIZE:
        values = DEQUANTIZE[type_name](blocks).reshape(-1)[:numel]
        return values if out is None else out.copy_(values)
    from gguf.quants import dequantize as reference  # the slow path: types with no torch dequantizer

    values = torch.from_numpy(reference(raw.numpy(), BY_NAME[type_name][0]).astype("float32").reshape(-1))[:numel]
    return values if out is None else out.copy_(values)
