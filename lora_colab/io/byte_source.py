"""The one interface every reader above reads bytes through, wherever they come from."""

from ..closeable import Closeable

ALIGN = 4096  # block alignment direct I/O needs (of the buffer's address, the offset and the length)
SLACK = 3 * ALIGN  # bytes a buffer given to `read_staged` holds beyond those wanted: up to ALIGN - 1 to
#                    reach an aligned address, then a span rounded out to whole blocks on both sides


class ByteSource(Closeable):
    """Random-access, read-only bytes of one file: local, or remote over HTTP range requests.

    Subclasses set `name` (shown in messages, never holding a token), `size`, and implement
    `readinto`. Safe to share across threads.
    """

    name = "<source>"
    size = 0
    local_path = None  # a filesystem path when the bytes are on local disk
    identity = ""      # what changes when the content does (size, mtime, ETag, commit)

    def __init__(self):
        self.bytes_read = 0

    def readinto(self, view, offset, tensor=None):
        """Fill the writable memoryview `view` with the bytes at `offset`; errors name `tensor`."""
        raise NotImplementedError

    def read_staged(self, buf, offset, nbytes, tensor=None):
        """The `nbytes` at `offset`, read into the uint8 CPU tensor `buf` (at least nbytes + SLACK long);
        returns the slice of `buf` that holds them (a local file may place them where direct I/O needs)."""
        out = buf[:nbytes]
        if nbytes:
            from .buffers import byte_view
            self.readinto(byte_view(out), offset, tensor)
        return out

    def read_new(self, offset, nbytes, tensor=None):
        """The `nbytes` at `offset` in a fresh uint8 CPU tensor."""
        from .buffers import empty_bytes
        return self.read_staged(empty_bytes(nbytes + SLACK), offset, nbytes, tensor)

    def pread(self, n, offset):
        """Exactly `n` bytes at `offset` (small reads: headers)."""
        buf = bytearray(n)
        self.readinto(memoryview(buf), offset)
        return bytes(buf)

    def drop_cache(self, offset, length):
        """Tell the OS it may drop this range from its page cache (local files only)."""

    def close(self):
        pass

    def __repr__(self):
        return f"<{type(self).__name__} {self.name!r}: {self.size} bytes>"
