"""The spellings users give for an output dtype, without importing torch (the CLI parses them at once)."""

from .errors import OptionError

ALIASES = {
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "f16": "fp16", "float16": "fp16", "half": "fp16", "16": "fp16",
    "fp32": "fp32", "f32": "fp32", "float32": "fp32", "float": "fp32", "32": "fp32",
}


def dtype_name(text):
    """'bf16', 'fp16' or 'fp32' for any accepted spelling; OptionError otherwise."""
    try:
        return ALIASES[str(text).strip().lower()]
    except KeyError:
        raise OptionError(f"unknown dtype {text!r}: use bf16, fp16 (or 16) or fp32 (or 32)") from None
