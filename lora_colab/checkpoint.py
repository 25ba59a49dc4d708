"""Read checkpoints one tensor at a time: single files, sharded indexes and diffusers folders."""

import json
import math
import os
from pathlib import Path

import torch

from .closeable import Closeable
from .dtypes import ITEMSIZE, to_torch
from .errors import CheckpointError
from .raw_file import RawFile, byte_view, empty_bytes
from .safetensors_header import read_header

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_MODEL_SUBFOLDERS = ("transformer", "unet")
_PREFERRED_STEMS = ("diffusion_pytorch_model", "model")


def cast(tensor, dtype):
    """tensor.to(dtype) (the tensor itself when it has that dtype); on the CPU into a huge-page buffer,
    whose first-touch page faults are much cheaper."""
    if tensor.dtype == dtype:
        return tensor
    if tensor.device.type != "cpu" or not tensor.numel():
        return tensor.to(dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    out = empty_bytes(tensor.numel() * itemsize).view(dtype).reshape(tensor.shape)
    out.copy_(tensor)
    return out


def _check_rows(path, key, shape, start, stop):
    """A row range must lie inside the first dimension of a tensor that has one."""
    if not shape:
        raise CheckpointError(path, "read_rows needs a tensor with at least one dimension", key)
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= shape[0]):
        raise CheckpointError(path, f"row range {start}:{stop} is outside 0:{shape[0]}", key)


class _PinnedStaging:
    """One reusable page-locked host buffer for host-to-GPU copies."""

    def __init__(self):
        self._buffer = None
        self._event = None

    def take(self, nbytes):
        """A pinned uint8 tensor of `nbytes`, safe to overwrite (the previous copy has finished)."""
        if self._event is not None:
            self._event.synchronize()
        if self._buffer is None or self._buffer.numel() < nbytes:
            self._buffer = None
            self._buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)
        return self._buffer[:nbytes]

    def mark_in_use(self):
        self._event = torch.cuda.Event()
        self._event.record()


class Checkpoint(Closeable):
    """A set of named tensors read lazily from one or more safetensors files.

    `read` and `read_rows` hold only the requested bytes in memory, read them with positional reads
    (no mmap) and release the file's pages from the OS page cache afterwards.
    """

    def __init__(self, path, files, locations, metadata):
        self.path = os.fspath(path)
        self._files = files          # list of SafetensorsFile-owned RawFile objects
        self._locations = locations  # name -> (RawFile, TensorInfo)
        self.metadata = metadata
        self._staging = None

    # -- lookup -------------------------------------------------------------------------------
    def keys(self):
        """Tensor names, in file order."""
        return list(self._locations)

    def __contains__(self, key):
        return key in self._locations

    def __len__(self):
        return len(self._locations)

    def info(self, key):
        """The TensorInfo (dtype name, shape, offset, bytes) of `key`."""
        return self._locate(key)[1]

    def shape(self, key):
        return self.info(key).shape

    def dtype(self, key):
        """torch dtype of `key` (None when this torch build has no such dtype)."""
        return to_torch(self.info(key).dtype)

    def st_dtype(self, key):
        """safetensors dtype name of `key` ('BF16', 'F8_E4M3', ...)."""
        return self.info(key).dtype

    def nbytes(self, key):
        return self.info(key).nbytes

    @property
    def total_bytes(self):
        return sum(self.info(key).nbytes for key in self._locations)

    @property
    def files(self):
        return [f.path for f in self._files]

    @property
    def bytes_read(self):
        """Tensor and header bytes read so far, over all files."""
        return sum(f.bytes_read for f in self._files)

    def _locate(self, key):
        try:
            return self._locations[key]
        except KeyError:
            raise CheckpointError(self.path, "no such tensor", key) from None

    # -- reading ------------------------------------------------------------------------------
    def read(self, key, dtype=None, device=None):
        """Read tensor `key`, optionally cast to `dtype` and placed on `device`."""
        raw, info = self._locate(key)
        return self._read_span(raw, info, info.start, info.nbytes, info.shape, dtype, device)

    def read_rows(self, key, start, stop, dtype=None, device=None):
        """Read rows `start:stop` of tensor `key` (first dimension), reading only those bytes."""
        raw, info = self._locate(key)
        _check_rows(raw.path, key, info.shape, start, stop)
        row_bytes = math.prod(info.shape[1:]) * ITEMSIZE[info.dtype]
        shape = (stop - start,) + tuple(info.shape[1:])
        return self._read_span(raw, info, info.start + start * row_bytes, (stop - start) * row_bytes,
                               shape, dtype, device)

    def _read_span(self, raw, info, offset, nbytes, shape, dtype, device):
        torch_dtype = to_torch(info.dtype)
        if torch_dtype is None:
            raise CheckpointError(raw.path, f"dtype {info.dtype} is not supported by torch {torch.__version__}",
                                  info.name)
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cuda":
            buf = self._staging_buffer().take(nbytes)
        else:
            buf = empty_bytes(nbytes)
        if nbytes:
            raw.readinto(byte_view(buf), offset, info.name)
            raw.drop_cache(offset, nbytes)
        if device.type == "cuda":
            on_device = torch.empty(nbytes, dtype=torch.uint8, device=device)
            on_device.copy_(buf, non_blocking=True)
            self._staging.mark_in_use()
            buf = on_device
        elif device.type != "cpu":
            buf = buf.to(device)
        tensor = buf.view(torch_dtype).reshape(shape)
        if dtype is not None and dtype != torch_dtype:
            tensor = cast(tensor, dtype)
        return tensor

    def _staging_buffer(self):
        if self._staging is None:
            self._staging = _PinnedStaging()
        return self._staging

    # -- lifetime -----------------------------------------------------------------------------
    def close(self):
        for raw in self._files:
            raw.close()
        self._staging = None

    def __repr__(self):
        return f"<{type(self).__name__} {self.path!r}: {len(self)} tensors, {self.total_bytes / 2**30:.2f} GiB>"


class SafetensorsFile(Checkpoint):
    """One `.safetensors` file."""

    def __init__(self, path):
        raw = RawFile(path)
        try:
            header = read_header(raw, raw.path)
        except BaseException:
            raw.close()
            raise
        locations = {name: (raw, info) for name, info in header.tensors.items()}
        super().__init__(path, [raw], locations, header.metadata)


class ShardedCheckpoint(Checkpoint):
    """Shards listed by a `*.safetensors.index.json` weight map."""

    def __init__(self, index_path):
        index_path = Path(index_path)
        weight_map = _read_weight_map(index_path)
        shards = {}
        locations = {}
        metadata = {}
        try:
            for shard_name in dict.fromkeys(weight_map.values()):
                shard_path = index_path.parent / shard_name
                if not shard_path.is_file():
                    raise CheckpointError(index_path, f"shard {shard_name!r} named in the weight map is missing")
                shards[shard_name] = SafetensorsFile(shard_path)
                for key, value in shards[shard_name].metadata.items():
                    metadata.setdefault(key, value)
            for key, shard_name in weight_map.items():
                shard = shards[shard_name]
                if key not in shard:
                    raise CheckpointError(shard.path, "listed in the index's weight map but not in this shard", key)
                locations[key] = shard._locations[key]
        except BaseException:
            for shard in shards.values():
                shard.close()
            raise
        files = [raw for shard in shards.values() for raw in shard._files]
        super().__init__(index_path, files, locations, metadata)


class PickleCheckpoint(Checkpoint):
    """A `.ckpt`/`.pt`/`.bin` file, loaded only with `torch.load(weights_only=True, mmap=True)`: plain
    tensors in (nested) dicts; anything else in the pickle is refused, never executed."""

    def __init__(self, path):
        path = Path(path)
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # UnpicklingError, RuntimeError (not a zip/torch file), ...
            text = str(exc)
            reason = ("it holds objects other than tensors" if "Weights only load failed" in text
                      else text.strip().splitlines()[0][:120] if text.strip() else type(exc).__name__)
            raise CheckpointError(path, f"refused: not a plain tensor pickle ({reason}); it is never loaded "
                                        f"with code execution: convert it to .safetensors with a tool you trust") from None
        tensors = {}
        _flatten(data.get("state_dict", data) if isinstance(data, dict) else data, "", tensors, path)
        if not tensors:
            raise CheckpointError(path, "holds no tensors")
        self._tensors = tensors
        super().__init__(path, [], {}, {})
        self._locations = {name: (None, None) for name in tensors}

    @property
    def files(self):
        return [self.path]

    def info(self, key):
        from .dtypes import from_torch
        from .safetensors_header import TensorInfo
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


def _flatten(obj, prefix, out, path):
    if isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(value, f"{prefix}{key}.", out, path)


def _read_weight_map(index_path):
    try:
        with open(index_path, "rb") as f:
            index = json.loads(f.read(100_000_000).decode("utf-8"))
    except OSError as exc:
        raise CheckpointError(index_path, f"cannot read index: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(index_path, f"index is not valid JSON ({str(exc)[:100]})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(index_path, "index has no 'weight_map' object of tensor name -> shard file")
    for shard_name in weight_map.values():
        if os.path.isabs(shard_name) or ".." in Path(shard_name).parts:
            raise CheckpointError(index_path, f"shard name {shard_name!r} points outside the index's folder")
    return weight_map


def open_checkpoint(path):
    """Open a `.safetensors` file, a `*.safetensors.index.json`, or a model/pipeline folder.

    Folders: a diffusers pipeline (its `transformer/` or `unet/`), a diffusers model folder with shards
    and an index, or a folder holding one `.safetensors` file. Returns a Checkpoint; use it as a context
    manager to close its files.
    """
    path = Path(os.fspath(path)).expanduser()
    if path.is_dir():
        return open_checkpoint(resolve_folder(path))
    if not path.exists():
        raise CheckpointError(path, "no such file or folder")
    name = path.name.lower()
    if name.endswith(".index.json"):
        return ShardedCheckpoint(path)
    if name.endswith(PICKLE_SUFFIXES):
        return PickleCheckpoint(path)
    if name.endswith(".gguf"):
        raise CheckpointError(path, "unsupported quantization: GGUF (use a .safetensors checkpoint)")
    return SafetensorsFile(path)


def resolve_folder(folder):
    """The file (single or index) that `open_checkpoint` reads for a folder."""
    folder = Path(folder)
    for sub in _MODEL_SUBFOLDERS:
        if (folder / sub).is_dir() and _has_weights(folder / sub):
            return resolve_folder(folder / sub)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        return _pick(folder, indexes, ".safetensors.index.json")
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return _pick(folder, files, ".safetensors")
    raise CheckpointError(folder, "folder holds no .safetensors file, index, transformer/ or unet/")


def _has_weights(folder):
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json"))


def _pick(folder, candidates, suffix):
    if len(candidates) == 1:
        return candidates[0]
    for stem in _PREFERRED_STEMS:
        for candidate in candidates:
            if candidate.name == stem + suffix:
                return candidate
    names = ", ".join(c.name for c in candidates)
    raise CheckpointError(folder, f"several checkpoints here ({names}); name the one to use")
