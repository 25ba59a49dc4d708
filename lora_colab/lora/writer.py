"""Atomic streaming safetensors writer: header first, then one tensor at a time, then rename."""

import errno
import hashlib
import shutil
import os
from pathlib import Path

import torch

from ..dtypes import from_torch
from ..errors import CheckpointError, WriteFault, write_fault
from ..io.buffers import byte_view
from ..io.safetensors import KOHYA_HASH_KEYS, LEGACY_LEN, LEGACY_START, header_bytes, layout_of
from ..io.temporary import temporary_name

_HAS_PWRITE = hasattr(os, "pwrite")


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


class SafetensorsWriter:
    """Write a safetensors file whose tensor names, dtypes and shapes are known up front.

    The header is written at once; each `write(name, tensor)` puts one tensor's bytes at its own offset
    (any order, nothing buffered); `close()` checks every tensor arrived, fsyncs and renames the run's own
    `OUT.<pid>-<random>.tmp` to `OUT`. On an error or `abort()` the temporary file is removed and `OUT` is left untouched.

    specs: iterable of (name, dtype, shape) with dtype a torch dtype or safetensors name.
    protect: input paths the output must never replace.
    """

    def __init__(self, path, specs, metadata=None, protect=()):
        self.path = Path(os.fspath(path))
        self.tmp_path = temporary_name(self.path, "tmp")
        for source in protect:
            if source is not None and self.path.exists() and _same_file(self.path, source):
                raise CheckpointError(self.path, "output path is one of the inputs; refusing to overwrite it")
        self._layout = layout_of(specs, self.path)
        header = header_bytes(self._layout, metadata, self.path)
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
        self.write_raw(name, byte_view(tensor.detach().to("cpu").contiguous()))

    def write_raw(self, name, data, offset_in_tensor=0):
        """Write raw little-endian bytes of tensor `name` (or a piece of it, from `offset_in_tensor`)."""
        _, _, offset, nbytes = self._layout[name]
        if len(data):
            try:
                self._pwrite(data, self._data_start + offset + offset_in_tensor)
            except OSError as exc:
                self._fail(exc, name)
        if offset_in_tensor + len(data) >= nbytes:
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
            if hasattr(os, "posix_fadvise"):  # written and synced: the page cache need not keep it
                os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
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
        raise write_fault(self.path, exc, tensor) from None

    def _pwrite(self, data, offset):
        _pwrite_all(self._file, data, offset)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


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


_COPY_CHUNK = 16 << 20


class SpillWriter:
    """Collect tensors whose names and shapes are not known up front, then write one safetensors file.

    Each `add` appends the tensor's bytes to the run's own `OUT.<pid>-<random>.parts.tmp` (so memory holds
    one tensor at a time);
    `finish` writes the final file atomically through SafetensorsWriter, optionally with kohya's
    `sshs_model_hash` (sha256 of the data area) and `sshs_legacy_hash`, and removes the spill file.
    """

    def __init__(self, path, protect=()):
        self.path = Path(os.fspath(path))
        self.spill_path = self._spill_name()
        self._protect = protect
        for source in protect:
            if source is not None and self.path.exists() and _same_file(self.path, source):
                raise CheckpointError(self.path, "output path is one of the inputs; refusing to overwrite it")
        self._entries = {}  # name -> (dtype, shape, spill offset, nbytes)
        self._size = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._spill = self._open_spill()
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.EEXIST, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG):
                raise CheckpointError(self.path, f"cannot write here: {exc.strerror or exc}") from None
            raise write_fault(self.path, exc) from None

    def _spill_name(self):
        return temporary_name(self.path, "parts.tmp")

    def _open_spill(self):
        return open(self.spill_path, "w+b", buffering=0)

    def add(self, name, tensor):
        if name in self._entries:
            self.abort()
            raise CheckpointError(self.path, "written twice", name)
        data = byte_view(tensor.detach().to("cpu").contiguous())
        try:
            _pwrite_all(self._spill, data, self._size)
        except OSError as exc:
            self.abort()
            raise write_fault(self.path, exc, name) from None
        self._entries[name] = (from_torch(tensor.dtype), tuple(tensor.shape), self._size, len(data))
        self._size += len(data)

    def __len__(self):
        return len(self._entries)

    def read(self, name):
        """A tensor added earlier, read back from the spill file."""
        return self._read_entry(self._entries[name])

    def _read_entry(self, entry):
        """The tensor an entry (dtype, shape, spill offset, nbytes) describes, read back from the spill file."""
        from ..dtypes import to_torch

        dtype, shape, offset, nbytes = entry
        data = bytearray(os.pread(self._spill.fileno(), nbytes, offset))
        return torch.frombuffer(data, dtype=to_torch(dtype)).reshape(shape) if nbytes else \
            torch.empty(shape, dtype=to_torch(dtype))

    def finish(self, metadata=None, kohya_hashes=False):
        """Write the final file (atomically) and drop the spill; returns the final path."""
        metadata = dict(metadata or {})
        specs = [(name, dtype, shape) for name, (dtype, shape, _, _) in self._entries.items()]
        try:
            if kohya_hashes:
                metadata.update(self._hashes(specs, metadata))
            with SafetensorsWriter(self.path, specs, metadata, self._protect) as writer:
                for name in writer._layout:
                    self._copy(name, lambda chunk, at, name=name: writer.write_raw(name, chunk, at))
        finally:
            self.abort()
        return self.path

    def _copy(self, name, sink):
        _, _, offset, nbytes = self._entries[name]
        done = 0
        while done < nbytes:
            n = min(_COPY_CHUNK, nbytes - done)
            try:
                chunk = os.pread(self._spill.fileno(), n, offset + done)
            except OSError as exc:
                raise write_fault(self.spill_path, exc, name, what="reading back") from None
            sink(chunk, done)
            done += n

    def _hashes(self, specs, metadata):
        placeholder = {k: "0" * n for k, n in KOHYA_HASH_KEYS.items()}
        layout = layout_of(specs, self.path)
        data_start = 8 + len(header_bytes(layout, {**metadata, **placeholder}, self.path))
        sha = hashlib.sha256()
        legacy = hashlib.sha256()
        lo, hi = LEGACY_START - data_start, LEGACY_START - data_start + LEGACY_LEN
        position = 0
        for name in layout:
            def feed(chunk, at, base=position):
                sha.update(chunk)
                start = base + at
                a, b = max(lo, start), min(hi, start + len(chunk))
                if a < b:
                    legacy.update(chunk[a - start:b - start])
            self._copy(name, feed)
            position += self._entries[name][3]
        hashes = {"sshs_model_hash": sha.hexdigest()}
        if lo >= 0 and position >= hi:
            hashes["sshs_legacy_hash"] = legacy.hexdigest()[:8]
        return hashes

    def abort(self):
        """Drop the spill file."""
        if not self._spill.closed:
            self._spill.close()
        try:
            os.unlink(self.spill_path)
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.abort()


def _pwrite_all(f, data, offset):
    view = memoryview(data).cast("B")
    while len(view):
        if _HAS_PWRITE:
            written = os.pwrite(f.fileno(), view, offset)
        else:
            f.seek(offset)
            written = f.write(view)
        view = view[written:]
        offset += written


def free_bytes(path):
    """Free bytes on the file system that holds `path` (its nearest existing folder); None where unknown."""
    folder = Path(os.fspath(path)).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def require_space(path, needed, parts):
    """Refuse, before any work, a run whose files cannot fit: a WriteFault naming what it will write
    (`parts`: [(what, bytes)], adding up to `needed`) and what the disk holds free."""
    from ..memory import fmt_bytes
    free = free_bytes(path)
    if free is None or needed <= free:
        return
    detail = " + ".join(f"{what} {fmt_bytes(n)}" for what, n in parts if n)
    raise WriteFault(path, f"needs about {fmt_bytes(needed)} free ({detail}) but its disk has {fmt_bytes(free)}: "
                           f"free space or write elsewhere (-o)")
