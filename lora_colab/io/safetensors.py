"""The safetensors container: parse and validate a header before any tensor data is read; lay one out for
the writers (offsets, header bytes, a planned file's exact size)."""

import json
import math
from dataclasses import dataclass

from ..dtypes import ITEMSIZE, from_torch
from ..errors import CheckpointError

MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    name: str
    dtype: str
    shape: tuple
    start: int  # absolute file offset of the first byte
    nbytes: int

    @property
    def numel(self):
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A validated header: tensors in file order, metadata, and where the data area starts."""

    tensors: dict
    metadata: dict
    data_start: int
    file_size: int


def read_header(raw_file, path):
    """Read and validate the header of `raw_file` (a ByteSource; named `path` in errors)."""
    file_size = raw_file.size
    if file_size < 8:
        raise CheckpointError(path, f"file is {file_size} bytes, too short for a safetensors header")
    n = int.from_bytes(raw_file.pread(8, 0), "little")
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        _not_safetensors(raw_file, path, n, file_size)
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > file_size:
        raise CheckpointError(path, f"header length {n} runs past the end of the {file_size}-byte file")
    raw = raw_file.pread(n, 8)
    return parse_header(raw, file_size, path)


_SIGNATURES = ((b"version https://git-lfs", "a Git LFS pointer, not the file itself (download the real file)"),
               (b"<!doctype html", "an HTML page (a login or error page? check the address)"),
               (b"<html", "an HTML page (a login or error page? check the address)"),
               (b"GGUF", "a GGUF file"), (b"PK\x03\x04", "a zip archive (a PyTorch .pt/.ckpt pickle?)"),
               (b"\x80", "a Python pickle (.ckpt/.pt)"), (b"{", "JSON text (a config or index file?)"))


def _not_safetensors(raw_file, path, n, file_size):
    """Raise naming what the file looks like, when its first bytes cannot start a safetensors header."""
    head = raw_file.pread(min(64, file_size), 0)
    for signature, what in _SIGNATURES:
        if head.lstrip().lower().startswith(signature.lower()):
            raise CheckpointError(path, f"is not a safetensors file: it looks like {what}")
    if sum(32 <= b < 127 or b in (9, 10, 13) for b in head) == len(head):
        text = head[:40].decode("ascii").splitlines()[0] if head.strip() else ""
        raise CheckpointError(path, f"is not a safetensors file: it starts with text {text!r}")


def parse_header(raw, file_size, path):
    """Validate header bytes `raw` of a file of `file_size` bytes; return a Header."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(path, f"header is not valid UTF-8 JSON ({_short(exc)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"header is a JSON {type(obj).__name__}, not an object")
    data_start = 8 + len(raw)
    data_size = file_size - data_start
    metadata = _metadata(obj.pop("__metadata__", None), path)
    entries = [_tensor_info(name, spec, data_start, data_size, path) for name, spec in obj.items()]
    _check_coverage(entries, data_start, data_size, path)
    entries.sort(key=lambda t: t.start)
    return Header({t.name: t for t in entries}, metadata, data_start, file_size)


def _short(exc):
    return str(exc).splitlines()[0][:120]


def _metadata(meta, path):
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise CheckpointError(path, "__metadata__ is not a JSON object")
    for key, value in meta.items():
        if not isinstance(value, str):
            raise CheckpointError(path, f"__metadata__ value for {key!r} is not a string")
    return dict(meta)


def _tensor_info(name, spec, data_start, data_size, path):
    if not isinstance(spec, dict):
        raise CheckpointError(path, "header entry is not a JSON object", name)
    dtype = spec.get("dtype")
    if dtype not in ITEMSIZE:
        raise CheckpointError(path, f"unknown or unsupported dtype {dtype!r}", name)
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(path, f"shape {shape!r} is not a list of non-negative integers", name)
    offsets = spec.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
            or offsets[0] > offsets[1]):
        raise CheckpointError(path, f"data_offsets {offsets!r} are not [begin, end] with begin <= end", name)
    begin, end = offsets
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if end - begin != expected:
        raise CheckpointError(
            path, f"holds {end - begin} bytes but shape {shape} of {dtype} needs {expected}", name)
    if end > data_size:
        raise CheckpointError(path, f"data_offsets [{begin}, {end}] run past the {data_size}-byte data area", name)
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, end - begin)


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_coverage(entries, data_start, data_size, path):
    """Tensors must tile the data area exactly: no overlap, no hole, nothing after the last one."""
    position = 0
    previous = None
    for info in sorted((t for t in entries if t.nbytes), key=lambda t: t.start):
        begin = info.start - data_start
        if begin < position:
            raise CheckpointError(path, f"data overlaps tensor {previous!r}", info.name)
        if begin > position:
            raise CheckpointError(path, f"{begin - position}-byte hole in the data area before it", info.name)
        position = begin + info.nbytes
        previous = info.name
    if position != data_size:
        raise CheckpointError(
            path, f"data area is {data_size} bytes but the tensors cover {position} "
            f"(truncated or trailing bytes after tensor {previous!r})")


# --- laying one out (the writers' header, a planned file's exact size) ----------------------------

KOHYA_HASH_KEYS = {"sshs_model_hash": 64, "sshs_legacy_hash": 8}
LEGACY_START, LEGACY_LEN = 0x100000, 0x10000


def layout_of(specs, path):
    """name -> (dtype name, shape, offset, nbytes); wider dtypes first so every tensor stays aligned."""
    items = []
    for name, dtype, shape in specs:
        st_dtype = dtype if isinstance(dtype, str) else from_torch(dtype)
        if st_dtype not in ITEMSIZE:
            raise CheckpointError(path, f"unknown dtype {dtype!r}", name)
        shape = tuple(int(d) for d in shape)
        items.append((name, st_dtype, shape))
    names = [name for name, _, _ in items]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise CheckpointError(path, "declared twice", dup)
    items.sort(key=lambda item: -ITEMSIZE[item[1]])  # stable: keeps the caller's order per width
    layout, offset = {}, 0
    for name, st_dtype, shape in items:
        nbytes = math.prod(shape) * ITEMSIZE[st_dtype]
        layout[name] = (st_dtype, shape, offset, nbytes)
        offset += nbytes
    return layout


def header_bytes(layout, metadata, path):
    header = {}
    if metadata:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise CheckpointError(path, f"metadata {key!r} must map a string to a string")
        header["__metadata__"] = dict(metadata)
    for name, (st_dtype, shape, offset, nbytes) in layout.items():
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def planned_size(specs, metadata=None, kohya_hashes=False):
    """Exact size in bytes of the file SpillWriter.finish would write for `specs` and `metadata`."""
    metadata = dict(metadata or {})
    layout = layout_of(specs, "<planned>")
    data = sum(nbytes for _, _, _, nbytes in layout.values())
    if kohya_hashes:
        both = {**metadata, **{k: "0" * n for k, n in KOHYA_HASH_KEYS.items()}}
        data_start = 8 + len(header_bytes(layout, both, "<planned>"))
        lo = LEGACY_START - data_start
        metadata["sshs_model_hash"] = "0" * 64
        if lo >= 0 and data >= lo + LEGACY_LEN:
            metadata["sshs_legacy_hash"] = "0" * 8
    return 8 + len(header_bytes(layout, metadata, "<planned>")) + data
