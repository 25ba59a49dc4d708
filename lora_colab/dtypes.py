"""dtypes in one place: safetensors dtype names and their sizes, the matching torch dtypes, and the
spellings users give for an output dtype. torch is imported on first use only (the CLI parses dtypes
before it loads torch)."""

import functools

from .errors import OptionError

# Every whole-byte dtype the safetensors format defines, with its item size.
ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}

_TORCH_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32",
    "I64": "int64", "F16": "float16", "BF16": "bfloat16", "F32": "float32",
    "F64": "float64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz", "U16": "uint16", "U32": "uint32",
    "U64": "uint64", "C64": "complex64",
}

# the spellings users give for an output dtype
ALIASES = {
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "f16": "fp16", "float16": "fp16", "half": "fp16", "16": "fp16",
    "fp32": "fp32", "f32": "fp32", "float32": "fp32", "float": "fp32", "32": "fp32",
}


@functools.lru_cache(maxsize=None)
def _tables():
    """({safetensors name: torch dtype}, its inverse) for the dtypes this torch has."""
    import torch
    to = {st: getattr(torch, name) for st, name in _TORCH_NAMES.items() if getattr(torch, name, None) is not None}
    return to, {v: k for k, v in to.items()}


def to_torch(name):
    """torch dtype for a safetensors dtype name, or None when this torch lacks it."""
    return _tables()[0].get(name)


def from_torch(dtype):
    """safetensors dtype name for a torch dtype (KeyError when the format has none)."""
    return _tables()[1][dtype]


def dtype_name(text):
    """'bf16', 'fp16' or 'fp32' for any accepted spelling; OptionError otherwise."""
    try:
        return ALIASES[str(text).strip().lower()]
    except KeyError:
        raise OptionError(f"unknown dtype {text!r}: use bf16, fp16 (or 16) or fp32 (or 32)") from None


def parse_dtype(value):
    """Accept a torch dtype, a safetensors name ('F32') or a user string ('bf16', 'fp16', '32', ...) and
    return a torch dtype."""
    import torch
    if value is None or isinstance(value, torch.dtype):
        return value
    if value in _tables()[0]:
        return _tables()[0][value]
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name(value)]
