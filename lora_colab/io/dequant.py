"""Quantised checkpoints: plain fp8 is upcast; ComfyUI scaled fp8, comfy_quant fp8 and musubi-tuner's
block-wise fp8 scales are applied; ComfyUI's NVFP4 (packed E2M1 codes, E4M3 block scales in cuBLAS's
swizzled 128x4 layout, an F32 global scale) is decoded, and so is its MXFP8 (E4M3 values, one power-of-two
E8M0 scale per 32 along a row, in the same swizzled layout, as comfy-kitchen writes them), and so is its INT8
(`int8_tensorwise`: int8 codes times one scale per tensor or per output row; with `convrot`, the rows were
rotated by a normalized Hadamard matrix per group of input columns first, which is undone); everything else
is refused with a clear message."""

import json
import math

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
    ".qweight": "SVDQuant/AWQ packed 4-bit weights (qweight: a Nunchaku or AWQ checkpoint; give the bf16, fp8 "
                "or GGUF model it was made from)",
    ".wscales": "SVDQuant packed 4-bit weights (wscales: a Nunchaku checkpoint; give the bf16, fp8 or GGUF model "
                "it was made from)",
    ".smooth_factor": "SVDQuant smoothing with a low-rank branch (a Nunchaku checkpoint; give the bf16, fp8 or "
                      "GGUF model it was made from)",
    ".SCB": "bitsandbytes int8",
}
# E2M1 (FP4) code -> value, sign in bit 3
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
NVFP4_BLOCK = 16
MXFP8_BLOCK = 32
_E8M0_NAN = 255


_H4 = ((1, 1, 1, -1), (1, 1, -1, 1), (1, -1, 1, 1), (-1, 1, 1, 1))


def hadamard(size, device=None):
    """ConvRot's normalized regular Hadamard matrix of `size` (a power of 4): the Kronecker power of
    comfy-kitchen's symmetric 4x4 seed over sqrt(size); symmetric and orthogonal."""
    h4 = torch.tensor(_H4, dtype=torch.float32)
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < size:
        matrix = torch.kron(matrix, h4)
    return (matrix / math.sqrt(size)).to(device)


def unswizzle(flat, rows, cols):
    """(rows, cols) block scales from cuBLAS's 128x4 tiled layout (the inverse of torchao's `to_blocked`,
    which pads rows to 128 and columns to 4, then stores each 128x4 tile as 32 rows of 4x4)."""
    row_tiles, col_tiles = -(-rows // 128), -(-cols // 4)
    tiles = flat.reshape(-1, 32, 4, 4).transpose(1, 2).reshape(row_tiles, col_tiles, 128, 4)
    return tiles.permute(0, 2, 1, 3).reshape(row_tiles * 128, col_tiles * 4)[:rows, :cols]


def is_auxiliary(key):
    """True for scale/marker tensors that belong to a quantised weight rather than to the model."""
    return key in AUX_KEYS or key.endswith(AUX_SUFFIXES)


class Dequantizer:
    """Finds the scale of every quantised weight in a checkpoint and applies it after reading."""

    def __init__(self, ckpt):
        self._ckpt = ckpt
        self._scales = {}  # weight key -> scale key
        self._nvfp4 = {}   # weight key -> (block scale key, global scale key)
        self._mxfp8 = {}   # weight key -> E8M0 block scale key
        self._int8 = {}    # weight key -> ConvRot group size (0: not rotated); its scale is in _scales
        self._block_scales = (None, None)  # (weight key, its unswizzled block scales): the last one read
        keys = set(ckpt.keys())
        for key in keys:
            for suffix, what in _UNSUPPORTED_SUFFIXES.items():
                if key.endswith(suffix):
                    raise CheckpointError(ckpt.path, f"unsupported quantization: {what}", key)
        for layer, spec in self._metadata_layers().items():
            self._register(layer, spec, keys, "_quantization_metadata")
        for key in keys:
            if key.endswith(".comfy_quant"):
                self._comfy_quant(key, keys)
            elif key.endswith(".scale_weight"):
                weight = key[: -len(".scale_weight")] + ".weight"
                if weight in keys:
                    self._add(weight, key)
        for key in keys:
            if key.endswith(".weight_scale_2") and key[: -len("_scale_2")] not in self._nvfp4:
                raise CheckpointError(ckpt.path, "unsupported quantization: NVFP4 scales without a comfy_quant or "
                                                 "_quantization_metadata entry saying so", key)

    def _metadata_layers(self):
        """{layer: spec ({"format": ...})} from ComfyUI's `_quantization_metadata` header entry, if any."""
        text = getattr(self._ckpt, "metadata", {}).get("_quantization_metadata")
        if not text:
            return {}
        try:
            layers = json.loads(text).get("layers", {})
        except (ValueError, AttributeError):
            raise CheckpointError(self._ckpt.path, "_quantization_metadata is not a JSON object") from None
        if not isinstance(layers, dict):
            raise CheckpointError(self._ckpt.path, "_quantization_metadata has no 'layers' object")
        return {name: spec if isinstance(spec, dict) else {"format": str(spec)} for name, spec in layers.items()}

    def _register(self, layer, spec, keys, where):
        fmt = str(spec.get("format", "")).lower()
        weight = layer + ".weight"
        if weight not in keys:
            return
        if fmt.startswith("float8"):
            if layer + ".weight_scale" not in keys:
                raise CheckpointError(self._ckpt.path, "comfy_quant fp8 weight has no weight_scale", where)
            self._add(weight, layer + ".weight_scale")
        elif fmt == "nvfp4":
            missing = [s for s in (".weight_scale", ".weight_scale_2") if layer + s not in keys]
            if missing:
                raise CheckpointError(self._ckpt.path, f"NVFP4 weight without {layer + missing[0]}", weight)
            if self._ckpt.st_dtype(weight) != "U8":
                raise CheckpointError(self._ckpt.path, f"NVFP4 weight stored as {self._ckpt.st_dtype(weight)}, not "
                                                       f"packed uint8", weight)
            self._nvfp4[weight] = (layer + ".weight_scale", layer + ".weight_scale_2")
        elif fmt == "mxfp8":
            if layer + ".weight_scale" not in keys:
                raise CheckpointError(self._ckpt.path, f"MXFP8 weight without {layer}.weight_scale", weight)
            stored = (self._ckpt.st_dtype(weight), self._ckpt.st_dtype(layer + ".weight_scale"))
            if stored[0] != "F8_E4M3" or stored[1] not in ("U8", "F8_E8M0"):
                raise CheckpointError(self._ckpt.path, f"MXFP8 weight stored as {stored[0]} with {stored[1]} scales, "
                                                       f"not F8_E4M3 with E8M0 (U8) scales", weight)
            shape = self._ckpt.shape(weight)
            if len(shape) != 2 or shape[1] % MXFP8_BLOCK:
                raise CheckpointError(self._ckpt.path, f"MXFP8 weight of shape {list(shape)}: rows must hold whole "
                                                       f"blocks of {MXFP8_BLOCK}", weight)
            self._mxfp8[weight] = layer + ".weight_scale"
        elif fmt == "int8_tensorwise":
            self._register_int8(layer, spec, keys, weight)
        else:
            raise CheckpointError(self._ckpt.path, f"unsupported quantization: comfy_quant format {fmt!r}", where)

    def _register_int8(self, layer, spec, keys, weight):
        scale = layer + ".weight_scale"
        if scale not in keys:
            raise CheckpointError(self._ckpt.path, f"INT8 weight without {scale}", weight)
        if self._ckpt.st_dtype(weight) != "I8":
            raise CheckpointError(self._ckpt.path, f"INT8 weight stored as {self._ckpt.st_dtype(weight)}, not int8",
                                  weight)
        unknown = sorted(k for k, v in spec.items() if k not in ("format", "convrot", "convrot_groupsize",
                                                                "per_channel") and v)
        if unknown:
            raise CheckpointError(self._ckpt.path, f"unsupported quantization: int8_tensorwise with {unknown[0]}",
                                  weight)
        group = int(spec.get("convrot_groupsize") or 256) if spec.get("convrot") else 0
        cols = math.prod(self._ckpt.shape(weight)[1:])
        if group and (group < 4 or 4 ** round(math.log(group, 4)) != group or cols % group):
            raise CheckpointError(self._ckpt.path, f"INT8 ConvRot group size {group} is not a power of 4 that "
                                                   f"divides the weight's {cols} columns", weight)
        self._add(weight, scale)
        self._int8[weight] = group

    def _comfy_quant(self, key, keys):
        layer = key[: -len(".comfy_quant")]
        raw = self._ckpt.read(key)
        try:
            spec = json.loads(bytes(raw.to(torch.uint8).tolist()).decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise CheckpointError(self._ckpt.path, "comfy_quant is not JSON", key) from None
        self._register(layer, spec if isinstance(spec, dict) else {}, keys, key)

    def _add(self, weight, scale_key):
        numel = 1
        for dim in self._ckpt.shape(scale_key):
            numel *= dim
        shape = self._ckpt.shape(weight)
        rows = shape[0] if shape else 1
        cols = numel // rows if rows and numel % rows == 0 else 0
        row_values = (math.prod(shape) // rows) if rows else 0
        blockwise = numel > rows and cols and row_values % cols == 0  # musubi: [out, blocks, 1]
        if numel not in (1, rows) and not blockwise:
            raise CheckpointError(self._ckpt.path, f"unsupported quantization: a scale of {numel} values does not "
                                                   f"divide the weight's {rows} rows into blocks", scale_key)
        self._scales[weight] = scale_key

    def shape(self, key):
        """The weight's logical shape (an NVFP4 weight holds two values per stored byte)."""
        shape = tuple(self._ckpt.shape(key))
        return (shape[0], shape[1] * 2) if key in self._nvfp4 else shape

    def is_packed(self, key):
        return key in self._nvfp4

    def decode(self, key, packed, rows=None):
        """float32 values of NVFP4 weight `key` from its packed bytes (rows `rows` of it)."""
        scale_key, global_key = self._nvfp4[key]
        out, half = self._ckpt.shape(key)
        start, stop = rows if rows else (0, out)
        scales = self._unswizzled(key, scale_key, NVFP4_BLOCK, "NVFP4")[start:stop].to(packed.device)
        lut = torch.tensor(E2M1, device=packed.device)
        codes = packed.to(torch.uint8)
        values = torch.stack([lut[(codes & 0x0F).long()], lut[(codes >> 4).long()]], dim=-1).reshape(codes.shape[0], -1)
        global_scale = self._ckpt.read(global_key, dtype=torch.float32).reshape(-1)[0].to(packed.device)
        values = values.reshape(codes.shape[0], -1, NVFP4_BLOCK) * (scales * global_scale).unsqueeze(-1)
        return values.reshape(codes.shape[0], -1)

    def _unswizzled(self, key, scale_key, block, what):
        """Weight `key`'s (rows, cols / block) float32 block scales, unswizzled; only the last weight's are kept
        (reads go weight by weight, and a whole model's scales would not fit in memory)."""
        cached_key, scales = self._block_scales
        if cached_key == key:
            return scales
        rows, cols = self._ckpt.shape(key)
        cols = cols * 2 if what == "NVFP4" else cols
        if what == "MXFP8":
            raw = self._ckpt.read(scale_key).view(torch.uint8).reshape(-1)
            if bool((raw == _E8M0_NAN).any()):
                raise CheckpointError(self._ckpt.path, "MXFP8 block scale is NaN (E8M0 255)", scale_key)
            flat = torch.exp2(raw.float() - 127)
        else:
            flat = self._ckpt.read(scale_key, dtype=torch.float32).reshape(-1)
        try:
            scales = unswizzle(flat, rows, cols // block)
        except RuntimeError:
            raise CheckpointError(self._ckpt.path, f"{flat.numel()} {what} block scales do not fit a {rows}x{cols} "
                                                   f"weight in the 128x4 tiled layout", scale_key) from None
        self._block_scales = (key, scales)
        return scales

    def stored_format(self, key):
        """"NVFP4" or "MXFP8" for ComfyUI's block formats, else the safetensors dtype name."""
        if key in self._nvfp4:
            return "NVFP4"
        if key in self._int8:
            return "INT8"
        return "MXFP8" if key in self._mxfp8 else self._ckpt.st_dtype(key)

    def check_weight(self, key):
        """Refuse integer-quantised weights that have no known dequantisation."""
        if key in self._nvfp4 or key in self._int8:
            return
        st_dtype = self._ckpt.st_dtype(key)
        if st_dtype in ("I8", "U8", "I16", "I32") and key.endswith(".weight"):
            raise CheckpointError(self._ckpt.path, f"unsupported quantization: {st_dtype} weight", key)

    def is_quantized(self, key):
        return key in self._scales or key in self._nvfp4 or key in self._mxfp8 or self._ckpt.st_dtype(key) in _FP8

    def apply(self, key, tensor, rows=None):
        """Multiply `tensor` (rows `rows` of weight `key`, already float) by its scale, if it has one."""
        if key in self._mxfp8:
            start, stop = rows or (0, tensor.shape[0])
            scales = self._unswizzled(key, self._mxfp8[key], MXFP8_BLOCK, "MXFP8")[start:stop].to(tensor.device)
            shaped = tensor.reshape(tensor.shape[0], -1, MXFP8_BLOCK) * scales.unsqueeze(-1)
            return shaped.reshape(tensor.shape)
        scale_key = self._scales.get(key)
        if scale_key is None:
            return tensor
        scale = self._ckpt.read(scale_key, dtype=torch.float32, device=tensor.device).reshape(-1)
        rows = rows or (0, tensor.shape[0])
        total_rows = self._ckpt.shape(key)[0]
        if scale.numel() > total_rows:  # block-wise: [rows, blocks, 1]
            blocks = scale.reshape(total_rows, -1)[rows[0]:rows[1]]
            shaped = tensor.reshape(tensor.shape[0], blocks.shape[1], -1) * blocks.unsqueeze(-1)
            return shaped.reshape(tensor.shape)
        if scale.numel() > 1:
            start, stop = rows if rows else (0, scale.numel())
            scale = scale[start:stop].reshape((-1,) + (1,) * (tensor.dim() - 1))
        tensor = tensor * scale
        group = self._int8.get(key)
        if group:  # ConvRot stored W·H per group of columns (H symmetric and orthogonal): W = (W·H)·H
            shaped = tensor.reshape(tensor.shape[0], -1, group)
            tensor = (shaped @ hadamard(group, tensor.device)).reshape(tensor.shape)
        return tensor
