"""Exceptions with one-line messages that name the file and the tensor."""

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


class OptionError(LoraColabError, ValueError):
    """An option value that cannot be used; the message names the option."""


class SourceError(LoraColabError):
    """A source (URL, Hub repo, Drive path) that cannot be read; the message never holds a token."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run whose journal keeps the finished layers; the message says how to resume."""
