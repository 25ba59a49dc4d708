"""A local file read with positional reads into caller buffers (no mmap), releasing its page cache; large
reads bypass the page cache (O_DIRECT) where the file system allows."""

import os
import threading

from ..errors import CheckpointError
from .byte_source import ALIGN, ByteSource

_HAS_PREAD = hasattr(os, "preadv")
_HAS_FADVISE = hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED")
_CHUNK = 1 << 30  # Linux returns at most ~2 GiB per read call; stay well below
DIRECT_MIN_BYTES = 1 << 20  # reads this large go around the page cache (smaller ones keep its readahead)


def direct_io_enabled():
    """Whether large reads may use O_DIRECT (LORA_COLAB_DIRECT_IO=0 turns it off)."""
    return hasattr(os, "O_DIRECT") and _HAS_PREAD and os.environ.get("LORA_COLAB_DIRECT_IO", "1") != "0"


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
        self._direct = self._open_direct()  # an O_DIRECT descriptor, or -1 where the file system refuses one
        self._use_direct = self._direct >= 0

    def readinto(self, view, offset, tensor=None):
        """Fill the writable memoryview `view` from `offset`; raise CheckpointError on a short file."""
        view = view.cast("B")
        self._read_buffered(view, offset, tensor)
        self.bytes_read += len(view)

    def read_staged(self, buf, offset, nbytes, tensor=None):
        """As ByteSource.read_staged; a large read goes around the page cache: the block-aligned span
        around the bytes is read with O_DIRECT into `buf` where its address lines up with the file offset,
        so the disk's DMA lands in `buf` without the page cache's copy (which cost this process a core
        at 0.7 GB/s: half the CPU of a 2-core runtime). Falls back to a buffered read where refused."""
        if not (self._use_direct and nbytes >= DIRECT_MIN_BYTES and offset % 8 == 0):
            # (the bytes land at an address of the offset's phase: an odd offset would misalign a bf16 view)
            return super().read_staged(buf, offset, nbytes, tensor)
        from .buffers import byte_view
        lead = offset % ALIGN
        span = -(-(lead + nbytes) // ALIGN) * ALIGN
        shift = -buf.data_ptr() % ALIGN
        window = buf[shift:shift + span]
        if window.numel() < span:  # a buffer without the slack read_staged asks for
            raise ValueError(f"read_staged needs a buffer of nbytes + SLACK bytes, got {buf.numel()} for {nbytes}")
        view = byte_view(window)
        start, done, want = offset - lead, 0, lead + nbytes
        while done < want:
            try:
                got = os.preadv(self._direct, [view[done:span]], start + done)
            except OSError as exc:
                if done:
                    raise CheckpointError(self.path, f"read failed: {exc.strerror or exc}", tensor) from None
                # this file system takes no direct reads (EINVAL; a FUSE mount may say EOPNOTSUPP or EIO): read
                # through the page cache from now on, which reports its own error if the file is at fault
                self._use_direct = False
                return super().read_staged(buf, offset, nbytes, tensor)
            if got == 0:
                raise CheckpointError(self.path, f"file ended {want - done} bytes early (changed while reading?)",
                                      tensor)
            done += got
            if done % ALIGN and done < want:  # a short, unaligned read: the rest through the page cache
                self._read_buffered(view[done:want], start + done, tensor)
                break
        self.bytes_read += nbytes  # the bytes asked for (the aligned span adds under 8 KiB the disk reads)
        return window[lead:lead + nbytes]

    def _open_direct(self):
        if not direct_io_enabled():
            return -1
        try:
            return os.open(self.path, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            return -1

    def _read_buffered(self, view, offset, tensor):
        """Fill `view` from `offset` through the page cache; one CheckpointError line on a failed or short read."""
        done, total = 0, len(view)
        while done < total:
            try:
                got = self._read_some(view[done:done + _CHUNK], offset + done)
            except OSError as exc:
                raise CheckpointError(self.path, f"read failed: {exc.strerror or exc}", tensor) from None
            if got == 0:
                raise CheckpointError(self.path, f"file ended {total - done} bytes early (changed while reading?)",
                                      tensor)
            done += got

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
        if self._direct >= 0:
            os.close(self._direct)
            self._direct = -1
        self._use_direct = False
        self._f.close()
