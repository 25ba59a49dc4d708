"""A local file read with positional reads into caller buffers (no mmap), releasing its page cache."""

import os
import threading

from ..errors import CheckpointError
from .byte_source import ByteSource

_HAS_PREAD = hasattr(os, "preadv")
_HAS_FADVISE = hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED")
_CHUNK = 1 << 30  # Linux returns at most ~2 GiB per read call; stay well below


class LocalFile(ByteSource):
    """A read-only local file read with `preadv`/`readinto` at explicit offsets; safe to share across threads."""

    def __init__(self, path, name=None):
        super().__init__()
        self.path = self.local_path = os.fspath(path)
        self.name = name or self.path
        try:
            self._f = open(self.path, "rb", buffering=0)
        except OSError as exc:
            raise CheckpointError(self.path, f"cannot open: {exc.strerror or exc}") from None
        self.fd = self._f.fileno()
        self.size = os.fstat(self.fd).st_size
        self._lock = None if _HAS_PREAD else threading.Lock()
        self._previous_start = 0
        stat = os.fstat(self.fd)
        self.identity = f"{self.size}:{stat.st_mtime_ns}"

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
