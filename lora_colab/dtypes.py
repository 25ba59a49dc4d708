"""safetensors dtype names, their sizes and the matching torch dtypes."""

import torch

from .dtype_names import dtype_name

# Every whole-byte dtype the safetensors format defines, with its item size.
ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}


def _torch_dtypes():
    names = {
        "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32",
        "I64": "int64", "F16": "float16", "BF16": "bfloat16", "F32": "float32",
        "F64": "float64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
        "F8_E8M0": "float8_e8m0fnu", "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2FNUZ": "float8_e5m2fnuz", "U16": "uint16", "U32": "uint32",
        "U64": "uint64", "C64": "complex64",
    }
    table = {}
    for st_name, torch_name in names.items():
        dt = getattr(torch, torch_name, None)
        if dt is not None:
            table[st_name] = dt
    return table


TO_TORCH = _torch_dtypes()
FROM_TORCH = {v: k for k, v in TO_TORCH.items()}


def to_torch(name):
    """torch dtype for a safetensors dtype name, or None when this torch lacks it."""
    return TO_TORCH.get(name)


def from_torch(dtype):
    """safetensors dtype name for a torch dtype (KeyError when the format has none)."""
    return FROM_TORCH[dtype]


def parse_dtype(value):
    """Accept a torch dtype, a safetensors name ('F32') or a user string ('bf16', 'fp16', '32', ...) and
    return a torch dtype."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value in TO_TORCH:
        return TO_TORCH[value]
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name(value)]
