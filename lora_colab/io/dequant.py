"""Quantised checkpoints: plain fp8 is upcast, ComfyUI scaled fp8 and per-tensor comfy_quant fp8 are
dequantised, everything else is refused with a clear message."""

import json

import torch

from ..errors import CheckpointError

AUX_SUFFIXES = (".scale_weight", ".weight_scale", ".weight_scale_2", ".input_scale", ".scale_input",
                ".comfy_quant")
AUX_KEYS = ("scaled_fp8",)
_FP8 = ("F8_E4M3", "F8_E5M2")
_UNSUPPORTED_SUFFIXES = {
    ".absmax": "bitsandbytes NF4/FP4",
    ".quant_map": "bitsandbytes NF4/FP4",
    ".quant_state.bitsandbytes__nf4": "bitsandbytes NF4",
    ".quant_state.bitsandbytes__fp4": "bitsandbytes FP4",
    ".qweight": "SVDQuant/AWQ packed weights (qweight)",
    ".SCB": "bitsandbytes int8",
    ".weight_scale_2": "NVFP4",
}


def is_auxiliary(key):
    """True for scale/marker tensors that belong to a quantised weight rather than to the model."""
    return key in AUX_KEYS or key.endswith(AUX_SUFFIXES)


class Dequantizer:
    """Finds the scale of every quantised weight in a checkpoint and applies it after reading."""

    def __init__(self, ckpt):
        self._ckpt = ckpt
        self._scales = {}  # weight key -> scale key
        keys = set(ckpt.keys())
        for key in keys:
            for suffix, what in _UNSUPPORTED_SUFFIXES.items():
                if key.endswith(suffix):
                    raise CheckpointError(ckpt.path, f"unsupported quantization: {what}", key)
        for key in keys:
            if key.endswith(".comfy_quant"):
                self._comfy_quant(key, keys)
            elif key.endswith(".scale_weight"):
                weight = key[: -len(".scale_weight")] + ".weight"
                if weight in keys:
                    self._add(weight, key)

    def _comfy_quant(self, key, keys):
        layer = key[: -len(".comfy_quant")]
        raw = self._ckpt.read(key)
        try:
            spec = json.loads(bytes(raw.to(torch.uint8).tolist()).decode("utf-8"))
            fmt = spec.get("format", "") if isinstance(spec, dict) else ""
        except (ValueError, UnicodeDecodeError):
            raise CheckpointError(self._ckpt.path, "comfy_quant is not JSON", key) from None
        if not str(fmt).startswith("float8"):
            raise CheckpointError(self._ckpt.path, f"unsupported quantization: comfy_quant format {fmt!r}", key)
        if layer + ".weight_scale" not in keys:
            raise CheckpointError(self._ckpt.path, "comfy_quant fp8 weight has no weight_scale", key)
        self._add(layer + ".weight", layer + ".weight_scale")

    def _add(self, weight, scale_key):
        numel = 1
        for dim in self._ckpt.shape(scale_key):
            numel *= dim
        rows = self._ckpt.shape(weight)[0] if self._ckpt.shape(weight) else 1
        if numel not in (1, rows):
            raise CheckpointError(self._ckpt.path, f"unsupported quantization: blockwise scale of "
                                                   f"{numel} values", scale_key)
        self._scales[weight] = scale_key

    def check_weight(self, key):
        """Refuse integer-quantised weights that have no known dequantisation."""
        st_dtype = self._ckpt.st_dtype(key)
        if st_dtype in ("I8", "U8", "I16", "I32") and key.endswith(".weight"):
            raise CheckpointError(self._ckpt.path, f"unsupported quantization: {st_dtype} weight", key)

    def is_quantized(self, key):
        return key in self._scales or self._ckpt.st_dtype(key) in _FP8

    def apply(self, key, tensor, rows=None):
        """Multiply `tensor` (rows `rows` of weight `key`, already float) by its scale, if it has one."""
        scale_key = self._scales.get(key)
        if scale_key is None:
            return tensor
        scale = self._ckpt.read(scale_key, dtype=torch.float32, device=tensor.device).reshape(-1)
        if scale.numel() > 1:
            start, stop = rows if rows else (0, scale.numel())
            scale = scale[start:stop].reshape((-1,) + (1,) * (tensor.dim() - 1))
        return tensor * scale
