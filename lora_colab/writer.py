"""Atomic streaming safetensors writer: header first, then one tensor at a time, then rename."""

import json
import math
import os
from pathlib import Path

from .dtypes import ITEMSIZE, from_torch
from .errors import CheckpointError
from .raw_file import byte_view

_HAS_PWRITE = hasattr(os, "pwrite")


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


class SafetensorsWriter:
    """Write a safetensors file whose tensor names, dtypes and shapes are known up front.

    The header is written at once; each `write(name, tensor)` puts one tensor's bytes at its own offset
    (any order, nothing buffered); `close()` checks every tensor arrived, fsyncs and renames `OUT.tmp` to
    `OUT`. On an error or `abort()` the temporary file is removed and `OUT` is left untouched.

    specs: iterable of (name, dtype, shape) with dtype a torch dtype or safetensors name.
    protect: input paths the output must never replace.
    """

    def __init__(self, path, specs, metadata=None, protect=()):
        self.path = Path(os.fspath(path))
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        for source in protect:
            if source is not None and self.path.exists() and _same_file(self.path, source):
                raise CheckpointError(self.path, "output path is one of the inputs; refusing to overwrite it")
        self._layout = _layout(specs, self.path)
        header = _header_bytes(self._layout, metadata, self.path)
        self._data_start = 8 + len(header)
        self._pending = set(self._layout)
        self._file = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.tmp_path, "wb", buffering=0)
            self._pwrite(len(header).to_bytes(8, "little") + header, 0)
            end = self._data_start + sum(nbytes for _, _, _, nbytes in self._layout.values())
            self._file.truncate(end)
        except OSError as exc:
            self._fail(exc)

    def write(self, name, tensor):
        """Write tensor `name`; its dtype and shape must match the spec."""
        if name not in self._layout:
            self.abort()
            raise CheckpointError(self.path, "tensor was not declared to the writer", name)
        st_dtype, shape, offset, nbytes = self._layout[name]
        if tuple(tensor.shape) != shape or from_torch(tensor.dtype) != st_dtype:
            self.abort()
            raise CheckpointError(self.path, f"got {tensor.dtype} {tuple(tensor.shape)}, declared "
                                             f"{st_dtype} {list(shape)}", name)
        if nbytes:
            data = tensor.detach().to("cpu").contiguous()
            try:
                self._pwrite(byte_view(data), self._data_start + offset)
            except OSError as exc:
                self._fail(exc, name)
        self._pending.discard(name)

    def close(self):
        """Finish: every declared tensor must be written; fsync, then atomically rename into place."""
        if self._file is None:
            return
        if self._pending:
            missing = sorted(self._pending)[0]
            self.abort()
            raise CheckpointError(self.path, f"{len(self._pending)} declared tensors never written", missing)
        try:
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            os.replace(self.tmp_path, self.path)
            _fsync_dir(self.path.parent)
        except OSError as exc:
            self._fail(exc)

    def abort(self):
        """Drop the temporary file; the target is left as it was."""
        if self._file is not None:
            self._file.close()
            self._file = None
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            pass

    def _fail(self, exc, tensor=None):
        self.abort()
        raise CheckpointError(self.path, f"write failed: {exc.strerror or exc}", tensor) from None

    def _pwrite(self, data, offset):
        view = memoryview(data).cast("B")
        while len(view):
            if _HAS_PWRITE:
                written = os.pwrite(self._file.fileno(), view, offset)
            else:
                self._file.seek(offset)
                written = self._file.write(view)
            view = view[written:]
            offset += written

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _layout(specs, path):
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


def _header_bytes(layout, metadata, path):
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


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_file(tensors, path, metadata=None, protect=()):
    """Write a dict of tensors atomically (a convenience over SafetensorsWriter)."""
    specs = [(name, t.dtype, t.shape) for name, t in tensors.items()]
    with SafetensorsWriter(path, specs, metadata, protect) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    return Path(path)
