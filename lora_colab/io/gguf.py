"""GGUF checkpoints (city96's ComfyUI-GGUF conventions) read through a ByteSource: the header parsed and
validated with positional reads (no mmap, local or remote alike), each tensor dequantized in torch by row
blocks when it is read.

Shapes are the GGML dims reversed, or `comfy.gguf.orig_shape.<name>` where the converter reshaped a
tensor; names are the model's own (the converter strips `model.diffusion_model.`).
"""

import math
import struct
import sys

import torch

from ..errors import CheckpointError
from .checkpoint import Checkpoint, _check_rows
from .gguf_quants import BY_NAME, DEQUANTIZE, FLOAT_TYPES, GGML_TYPES, dequantize
from .locations import locate
from .safetensors import TensorInfo

MAGIC = b"GGUF"
_MAX_COUNT = 1 << 24       # tensors or metadata entries
_MAX_STRING = 64 << 20
_MAX_DIMS = 4
_OUT_BLOCK = 16 << 20      # bytes of float32 output dequantized at a time
# architectures a GGUF of a text model declares (its tokenizer gives it away too)
_TEXT_MODELS = {"llama", "qwen2", "qwen3", "qwen2vl", "qwen3moe", "gemma", "gemma2", "gemma3", "mistral", "mistral3",
                "phi2", "phi3", "t5", "t5encoder", "bert", "gpt2", "gptneox", "falcon", "mamba", "command-r",
                "deepseek2", "starcoder2", "olmo", "stablelm", "umt5"}
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class _Cursor:
    """Sequential little-endian reads over a ByteSource, buffered in 1 MiB windows."""

    def __init__(self, raw, name):
        self.raw, self.name, self.pos = raw, name, 0
        self._buf, self._at = b"", 0

    def take(self, n):
        if self.pos + n > self.raw.size:
            raise CheckpointError(self.name, f"GGUF header runs past the end of the {self.raw.size}-byte file "
                                             f"(truncated?)")
        if not (self._at <= self.pos and self.pos + n <= self._at + len(self._buf)):
            self._at = self.pos
            self._buf = self.raw.pread(min(max(n, 1 << 20), self.raw.size - self.pos), self.pos)
        start = self.pos - self._at
        self.pos += n
        return self._buf[start:start + n]

    def scalar(self, fmt):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self):
        n = self.scalar("<Q")
        if n > _MAX_STRING:
            raise CheckpointError(self.name, f"GGUF string of {n} bytes at byte {self.pos} (corrupt header)")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(self.name, f"GGUF string at byte {self.pos - n} is not UTF-8") from None

    def value(self, kind, depth=0):
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == 8:
            return self.string()
        if kind == 9 and depth == 0:
            item, count = self.scalar("<I"), self.scalar("<Q")
            if count > _MAX_COUNT * 16:
                raise CheckpointError(self.name, f"GGUF array of {count} items (corrupt header)")
            return [self.value(item, 1) for _ in range(count)]
        raise CheckpointError(self.name, f"unknown GGUF metadata value type {kind} at byte {self.pos}")


def read_gguf_header(raw, name):
    """(metadata dict, [TensorInfo], {name: type name}) of a GGUF file, validated before any data is read."""
    cur = _Cursor(raw, name)
    if raw.size < 24:
        raise CheckpointError(name, f"is {raw.size} bytes, too short for a GGUF header")
    if cur.take(4) != MAGIC:
        raise CheckpointError(name, "is not a GGUF file (no GGUF magic)")
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise CheckpointError(name, f"GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
        raise CheckpointError(name, f"GGUF header claims {n_tensors} tensors and {n_kv} metadata entries")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<I"))
    entries = []
    for _ in range(n_tensors):
        tensor = cur.string()
        n_dims = cur.scalar("<I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise CheckpointError(name, f"GGUF tensor with {n_dims} dimensions", tensor)
        dims = [cur.scalar("<Q") for _ in range(n_dims)]
        type_id, offset = cur.scalar("<I"), cur.scalar("<Q")
        entries.append((tensor, dims, type_id, offset))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(name, f"GGUF general.alignment {alignment!r} is not a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    return metadata, _tensor_infos(name, metadata, entries, data_start, alignment, raw.size)


def _tensor_infos(name, metadata, entries, data_start, alignment, file_size):
    infos, types = [], {}
    for tensor, dims, type_id, offset in entries:
        if type_id not in GGML_TYPES:
            raise CheckpointError(name, f"unknown GGUF quant type {type_id}", tensor)
        type_name, block, size = GGML_TYPES[type_id]
        numel = math.prod(dims)
        if dims[0] % block:
            raise CheckpointError(name, f"rows of {dims[0]} values do not fill {type_name} blocks of {block}", tensor)
        if offset % alignment:
            raise CheckpointError(name, f"data offset {offset} is not {alignment}-byte aligned", tensor)
        nbytes = numel // block * size
        start = data_start + offset
        if start + nbytes > file_size:
            raise CheckpointError(name, f"data [{start}, {start + nbytes}) runs past the end of the {file_size}-byte "
                                        f"file (truncated?)", tensor)
        shape = tuple(reversed(dims))
        orig = metadata.get(f"comfy.gguf.orig_shape.{tensor}")
        if orig is not None:
            if not (isinstance(orig, list) and all(isinstance(d, int) and d >= 0 for d in orig)
                    and math.prod(orig) == numel):
                raise CheckpointError(name, f"comfy.gguf.orig_shape {orig!r} does not hold {numel} values", tensor)
            shape = tuple(orig)
        infos.append(TensorInfo(tensor, type_name, shape, start, nbytes))
        types[tensor] = type_name
    ordered = sorted((i for i in infos if i.nbytes), key=lambda i: i.start)
    for before, after in zip(ordered, ordered[1:]):
        if before.start + before.nbytes > after.start:
            raise CheckpointError(name, f"data overlaps tensor {before.name!r}", after.name)
    return infos


def _check_diffusion_model(name, metadata):
    arch = str(metadata.get("general.architecture", ""))
    if arch.lower() in _TEXT_MODELS or any(k.startswith("tokenizer.ggml.") for k in metadata):
        raise CheckpointError(name, f"is a GGUF of a language model ({arch or 'with a tokenizer'}), not a diffusion "
                                    f"model: give the image/video model's GGUF")


def _metadata_text(value):
    if isinstance(value, list):
        return f"[{len(value)} values]" if len(value) > 16 else str(value)
    return str(value)


class GGUFFile(Checkpoint):
    """One `.gguf` file (any source): tensors by their names, quantized ones dequantized to float32 when
    read. `dtype()` is None for a quantized tensor and `st_dtype()` names its GGML type ("Q8_0").

    Reading costs compute (dequantization), so a reader thread calls `prefetch` (bytes only) and the
    computing thread `read`, which then decodes from the prefetched bytes."""

    decodes_on_read = True

    def __init__(self, source, token=None):
        raw = locate(source, token).open()
        try:
            metadata, infos = read_gguf_header(raw, raw.name)
            _check_diffusion_model(raw.name, metadata)
        except BaseException:
            raw.close()
            raise
        self.architecture = str(metadata.get("general.architecture", ""))
        text = {key: _metadata_text(value) for key, value in metadata.items()
                if not key.startswith("comfy.gguf.orig_shape.")}
        super().__init__(raw.name, [raw], {info.name: (raw, info) for info in infos}, text)
        self._warned = set()
        self._prefetched = {}

    def prefetch(self, key):
        """Read tensor `key`'s stored bytes now (I/O only); the next whole `read` of it decodes them."""
        raw, info = self._locate(key)
        buf = raw.read_new(info.start, info.nbytes, info.name)
        raw.drop_cache(info.start, info.nbytes)
        self._prefetched[key] = buf

    def read(self, key, dtype=None, device=None):
        raw, info = self._locate(key)
        return self._read_rows(raw, info, 0, info.shape[0] if info.shape else 1, dtype, device)

    def read_rows(self, key, start, stop, dtype=None, device=None):
        raw, info = self._locate(key)
        _check_rows(raw.name, key, info.shape, start, stop)
        return self._read_rows(raw, info, start, stop, dtype, device)

    def _read_rows(self, raw, info, start, stop, dtype, device):
        _, block, size = BY_NAME[info.dtype]
        row = math.prod(info.shape[1:]) if info.shape else 1
        if info.dtype not in FLOAT_TYPES and info.dtype not in DEQUANTIZE:
            self._slow_warning(info)
        if (row * start) % block or (row * stop) % block:  # rows that split a block: read it all, then slice
            whole = self._read_rows(raw, info, 0, info.shape[0], dtype, device)
            return whole[start:stop]
        out_shape = (stop - start,) + tuple(info.shape[1:])
        offset = info.start + row * start // block * size
        nbytes = row * (stop - start) // block * size
        if info.dtype in FLOAT_TYPES:  # stored as safetensors would be: the shared reader
            return self._read_span(raw, info, offset, nbytes, out_shape, dtype, device)
        out = torch.empty(math.prod(out_shape), dtype=torch.float32)
        step = max(block, _OUT_BLOCK // 4 // block * block)  # values per chunk, whole blocks
        total = out.numel()
        stored = self._prefetched.pop(info.name, None) if (start, stop) == (0, info.shape[0]) else None
        for first in range(0, total, step):
            count = min(step, total - first)
            chunk_bytes = count // block * size
            at = first // block * size
            if stored is not None:
                buf = stored[at:at + chunk_bytes]
            else:
                buf = raw.read_new(offset + at, chunk_bytes, info.name)
                raw.drop_cache(offset + at, chunk_bytes)
            dequantize(buf, info.dtype, count, out=out[first:first + count])
        tensor = out.reshape(out_shape)
        if dtype is not None and dtype != torch.float32:
            tensor = tensor.to(dtype)
        return tensor.to(device) if device is not None else tensor

    def _slow_warning(self, info):
        if info.dtype in self._warned:
            return
        self._warned.add(info.dtype)
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise CheckpointError(self.path, f"GGUF type {info.dtype} has no torch dequantizer here; install the "
                                             f"`gguf` package to read it (slowly)", info.name) from None
        print(f"{self.path}: {info.dtype} tensors are dequantized by the gguf package's reference code (slow)",
              file=sys.stderr)
