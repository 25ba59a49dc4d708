"""PyTorch pickles (`.ckpt`, `.pt`, `.pth`, `.bin`): plain tensors only, loaded with `weights_only=True`, never
with code execution; a remote pickle is downloaded to a temporary file first."""

import os
import sys
import tempfile

import torch

from ..errors import CheckpointError
from .checkpoint import Checkpoint, _check_rows
from .local_file import LocalFile


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def _first_sentence(text, limit=160):
    """The first line of an error, whole words only, at most `limit` characters."""
    line = text.strip().splitlines()[0]
    if len(line) <= limit:
        return line
    return line[:limit].rsplit(" ", 1)[0].rstrip(",;:(") + " ..."


class PickleCheckpoint(Checkpoint):
    """A `.ckpt`/`.pt`/`.bin` file, loaded only with `torch.load(weights_only=True, mmap=True)`: plain
    tensors in (nested) dicts; anything else in the pickle is refused, never executed."""

    def __init__(self, path, name=None):
        name = name or str(path)
        with open(path, "rb") as f:
            head = f.read(64)
        if head[:2] != b"PK" and head[:1] != b"\x80":  # neither torch.save's zip archive nor a pickle
            shown = head[:24].decode("utf-8", "replace").split("\n")[0]
            raise CheckpointError(name, f"is not a PyTorch checkpoint (it begins {shown!r}): give a .safetensors, "
                                        f".ckpt, .pt or .bin model file")
        try:  # mmap needs the zip archive; a legacy pickle is read whole
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=head[:2] == b"PK")
        except Exception as exc:  # UnpicklingError, RuntimeError (a damaged archive), ...
            text = str(exc)
            reason = ("it holds objects other than tensors" if "Weights only load failed" in text
                      else _first_sentence(text) if text.strip() else type(exc).__name__)
            raise CheckpointError(name, f"refused: not a plain tensor pickle ({reason}); it is never loaded "
                                        f"with code execution: convert it to .safetensors with a tool you trust") from None
        tensors = {}
        _flatten(data.get("state_dict", data) if isinstance(data, dict) else data, "", tensors)
        if not tensors:
            raise CheckpointError(name, "holds no tensors")
        self._tensors = tensors
        super().__init__(name, [LocalFile(path, name)], {}, {})
        self._locations = {name: (None, None) for name in tensors}

    def info(self, key):
        from ..dtypes import from_torch
        from .safetensors import TensorInfo
        tensor = self._tensor(key)
        return TensorInfo(key, from_torch(tensor.dtype), tuple(tensor.shape), 0,
                          tensor.numel() * tensor.element_size())

    def _tensor(self, key):
        try:
            return self._tensors[key]
        except KeyError:
            raise CheckpointError(self.path, "no such tensor", key) from None

    def read(self, key, dtype=None, device=None):
        tensor = self._tensor(key).clone()
        return tensor.to(device=device or "cpu", dtype=dtype or tensor.dtype)

    def read_rows(self, key, start, stop, dtype=None, device=None):
        tensor = self._tensor(key)
        _check_rows(self.path, key, tuple(tensor.shape), start, stop)
        return tensor[start:stop].clone().to(device=device or "cpu", dtype=dtype or tensor.dtype)

    def close(self):
        self._tensors = {}
        super().close()


def _flatten(obj, prefix, out):
    if isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(value, f"{prefix}{key}.", out)


def open_pickle(location):
    """A pickle is loaded from local disk only: a remote one is downloaded to a temporary file first."""
    if location.local_path() is not None:
        return PickleCheckpoint(location.local_path())
    print(f"{location.display}: a pickle cannot be read in place; downloading it to a temporary file",
          file=sys.stderr)
    with location.open() as raw:
        fd, path = tempfile.mkstemp(prefix="lora_colab_", suffix=".pt")
        try:
            with os.fdopen(fd, "wb") as out:
                view = memoryview(bytearray(min(raw.size, 16 << 20) or 1))
                for offset in range(0, raw.size, len(view)):
                    part = view[:min(len(view), raw.size - offset)]
                    raw.readinto(part, offset)
                    out.write(part)
            return PickleCheckpoint(path, location.display)
        finally:
            os.unlink(path)  # the mmap and the open file keep the data readable until the checkpoint closes
