"""Exceptions with one-line messages that name the file and the tensor."""

import errno
import os


class LoraColabError(Exception):
    """Base class for every error this package raises on purpose."""


class CheckpointError(LoraColabError, ValueError):
    """A checkpoint (or LoRA) file is unreadable, malformed or unsupported."""

    def __init__(self, path, message, tensor=None):
        self.path = os.fspath(path) if path is not None else None
        self.tensor = tensor
        self.reason = message
        where = f"{self.path}" if self.path else "<checkpoint>"
        if tensor is not None:
            where += f" [{tensor}]"
        super().__init__(f"{where}: {message}")


class WriteFault(CheckpointError):
    """The disk or the mount refused a write (full, over quota, an I/O error, a dropped or read-only mount):
    not bad input. A run stopped by it keeps its journal as far as it was written; the same command resumes."""


_CAUSES = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
           errno.EIO: "an I/O error (a dropped mount such as Drive's?)",
           errno.ENOTCONN: "the mount is gone (Drive disconnected?)", errno.EROFS: "the file system is read-only",
           errno.ESTALE: "the mount went stale (Drive reconnected?)"}


def write_fault(path, exc, tensor=None, what="write"):
    """A WriteFault naming the file, the cause of OSError `exc` in plain words, and the tensor if any."""
    cause = _CAUSES.get(exc.errno, exc.strerror or str(exc))
    return WriteFault(path, f"{what} failed: {cause}", tensor)


class OptionError(LoraColabError, ValueError):
    """An option value that cannot be used; the message names the option."""


class SourceError(LoraColabError):
    """A source (URL, Hub repo, Drive path) that cannot be read; the message never holds a token."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run whose journal keeps the finished layers; the message says how to resume."""
