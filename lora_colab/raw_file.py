"""Positional reads into caller buffers, without mmap, and page-cache release after each read."""

import ctypes
import os
import sys
import threading

import torch

from .errors import CheckpointError

_HAS_PREAD = hasattr(os, "preadv")
_HAS_FADVISE = hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED")
_CHUNK = 1 << 30  # Linux returns at most ~2 GiB per read call; stay well below


_HUGE = 2 << 20


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


_MADVISE = _load_madvise()
_MADV_HUGEPAGE = 14


def empty_bytes(nbytes):
    """An uninitialised uint8 CPU tensor; large ones ask Linux for huge pages, which makes first-touch
    page faults (the main cost of reading into fresh memory) several times cheaper."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if _MADVISE is not None and nbytes >= 4 * _HUGE:
        start = (buf.data_ptr() + _HUGE - 1) & ~(_HUGE - 1)
        length = (buf.data_ptr() + nbytes - start) & ~(_HUGE - 1)
        _MADVISE(start, length, _MADV_HUGEPAGE)  # advisory: failure just means normal pages
    return buf


def byte_view(tensor):
    """A writable memoryview over a contiguous CPU tensor's bytes (no numpy needed)."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray(0))
    return memoryview((ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())).cast("B")


class RawFile:
    """A read-only file read with `pread`/`readinto` at explicit offsets; safe to share across threads."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            self._f = open(self.path, "rb", buffering=0)
        except OSError as exc:
            raise CheckpointError(self.path, f"cannot open: {exc.strerror or exc}") from None
        self.fd = self._f.fileno()
        self.size = os.fstat(self.fd).st_size
        self._lock = None if _HAS_PREAD else threading.Lock()
        self.bytes_read = 0
        self._previous_start = 0

    def pread(self, n, offset):
        """Return exactly `n` bytes at `offset` (small reads: headers)."""
        buf = bytearray(n)
        self.readinto(memoryview(buf), offset)
        return bytes(buf)

    def readinto(self, view, offset, tensor=None):
        """Fill the writable memoryview `view` from `offset`; raise CheckpointError on a short file."""
        view = view.cast("B")
        done, total = 0, len(view)
        while done < total:
            chunk = view[done:done + _CHUNK]
            try:
                got = self._read_some(chunk, offset + done)
            except OSError as exc:
                raise CheckpointError(self.path, f"read failed: {exc.strerror or exc}", tensor) from None
            if got == 0:
                raise CheckpointError(self.path, f"file ended {total - done} bytes early (changed while reading?)",
                                      tensor)
            done += got
        self.bytes_read += total

    def _read_some(self, chunk, offset):
        if self._lock is None:
            return os.preadv(self.fd, [chunk], offset)
        with self._lock:
            self._f.seek(offset)
            return self._f.readinto(chunk)

    def drop_cache(self, offset, length):
        """Tell the OS it may drop this range from the page cache (no-op where unsupported).

        The range is widened back to the start of the previous read: pages of skipped tensors that
        readahead brought in, and pages still under I/O during the previous call (which the OS does not
        drop), go too.
        """
        if not (_HAS_FADVISE and length):
            return
        end = offset + length
        start = min(offset, self._previous_start)
        try:
            os.posix_fadvise(self.fd, start, end - start, os.POSIX_FADV_DONTNEED)
        except OSError:
            return
        self._previous_start = offset

    def close(self):
        self._f.close()
