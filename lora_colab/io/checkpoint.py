"""Read checkpoints one tensor at a time: single files, sharded indexes and diffusers folders."""

import json
import math
import os
import sys
import tempfile

import torch

from ..closeable import Closeable
from ..dtypes import ITEMSIZE, to_torch
from ..errors import CheckpointError
from .buffers import byte_view, empty_bytes
from .local_file import LocalFile
from .locations import Location, locate
from .safetensors import read_header

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
STAGING_BYTES = 32 << 20  # each of the two pinned buffers a checkpoint copies to the GPU through
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
    """Two page-locked host buffers of STAGING_BYTES used in turn for host-to-GPU copies: a tensor of any
    size goes up in chunks, the read of one chunk overlapping the copy of the one before, and pinned
    memory stays 2 × STAGING_BYTES per checkpoint (a 1.4 GB FLUX.2 layer no longer pins 2 GB of RAM)."""

    def __init__(self):
        self._buffers = [None, None]
        self._events = [None, None]
        self._turn = 0

    def upload(self, raw, offset, nbytes, device, tensor=None):
        """Bytes `offset:offset+nbytes` of the ByteSource `raw`, as a uint8 tensor on `device`."""
        out = torch.empty(nbytes, dtype=torch.uint8, device=device)
        for start in range(0, nbytes, STAGING_BYTES):
            n = min(STAGING_BYTES, nbytes - start)
            buf = self._take(n)
            raw.readinto(byte_view(buf), offset + start, tensor)
            out[start:start + n].copy_(buf, non_blocking=True)
            self._events[self._turn] = torch.cuda.Event()
            self._events[self._turn].record()
            self._turn ^= 1
        return out

    def _take(self, nbytes):
        """This turn's pinned buffer, once the copy that last used it has finished."""
        if self._events[self._turn] is not None:
            self._events[self._turn].synchronize()
        if self._buffers[self._turn] is None:
            self._buffers[self._turn] = torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True)
        return self._buffers[self._turn][:nbytes]


class Checkpoint(Closeable):
    """A set of named tensors read lazily from one or more safetensors files.

    `read` and `read_rows` hold only the requested bytes in memory, read them with positional reads
    (no mmap) and release the file's pages from the OS page cache afterwards.
    """

    def __init__(self, path, files, locations, metadata):
        self.path = str(path)        # what messages name (a URL without its query, a Hub repo:file)
        self._files = files          # the ByteSources this checkpoint owns
        self._locations = locations  # name -> (ByteSource, TensorInfo)
        self.index_bytes = 0         # bytes of a shard index read (remote: over the network)
        self.index_remote = False
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
        """Names of the files read (paths, URLs, Hub repo:file)."""
        return [f.name for f in self._files]

    @property
    def sources(self):
        """The ByteSources read."""
        return list(self._files)

    @property
    def local_files(self):
        """Paths of the files that are on local disk (which an output must never replace)."""
        return [f.local_path for f in self._files if f.local_path]

    @property
    def bytes_read(self):
        """Tensor, header and index bytes read so far, over all files."""
        return sum(f.bytes_read for f in self._files) + self.index_bytes

    @property
    def network_bytes(self):
        """Of bytes_read, those read over the network (in place, by range)."""
        return (sum(f.bytes_read for f in self._files if not f.local_path)
                + (self.index_bytes if self.index_remote else 0))

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
        _check_rows(raw.name, key, info.shape, start, stop)
        row_bytes = math.prod(info.shape[1:]) * ITEMSIZE[info.dtype]
        shape = (stop - start,) + tuple(info.shape[1:])
        return self._read_span(raw, info, info.start + start * row_bytes, (stop - start) * row_bytes,
                               shape, dtype, device)

    def _read_span(self, raw, info, offset, nbytes, shape, dtype, device):
        torch_dtype = to_torch(info.dtype)
        if torch_dtype is None:
            raise CheckpointError(raw.name, f"dtype {info.dtype} is not supported by torch {torch.__version__}",
                                  info.name)
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cuda":
            buf = self._staging_buffer().upload(raw, offset, nbytes, device, info.name)
        else:
            buf = empty_bytes(nbytes)
            if nbytes:
                raw.readinto(byte_view(buf), offset, info.name)
        raw.drop_cache(offset, nbytes)
        if device.type not in ("cpu", "cuda"):
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
    """One `.safetensors` file: a path, or any Location (URL, Hub file)."""

    def __init__(self, source):
        location = locate(source)
        raw = location.open()
        try:
            header = read_header(raw, raw.name)
        except BaseException:
            raw.close()
            raise
        locations = {name: (raw, info) for name, info in header.tensors.items()}
        super().__init__(raw.name, [raw], locations, header.metadata)


class ShardedCheckpoint(Checkpoint):
    """Shards listed by a `*.safetensors.index.json` weight map."""

    def __init__(self, index):
        index = locate(index)
        weight_map, index_bytes = _read_weight_map(index)
        shards = {}
        locations = {}
        metadata = {}
        try:
            for shard_name in dict.fromkeys(weight_map.values()):
                shard = index.sibling(shard_name)
                if not shard.remote and not shard.exists():
                    raise CheckpointError(index.display, f"shard {shard_name!r} named in the weight map is missing")
                shards[shard_name] = SafetensorsFile(shard)
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
        super().__init__(index.display, files, locations, metadata)
        self.index_bytes, self.index_remote = index_bytes, index.remote


class PipelineCheckpoint(Checkpoint):
    """An SD1.5/SDXL diffusers pipeline folder: its `unet/`, `text_encoder/` and `text_encoder_2/` (each a
    single file or shards; `*.fp16.*` variants taken when they are all there is) read as one checkpoint
    whose keys carry the component's name (`unet.conv_in.weight`). vae/, tokenizer/, scheduler/ are not
    read."""

    COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

    def __init__(self, folder):
        folder = locate(folder)
        parts, locations, metadata = [], {}, {}
        try:
            for component in self.COMPONENTS:
                if component not in folder.list() or not folder.child(component).is_dir():
                    continue
                part = open_checkpoint(resolve_folder(folder.child(component)))
                parts.append(part)
                for key in part.keys():
                    locations[f"{component}.{key}"] = part._locations[key]
                for key, value in part.metadata.items():
                    metadata.setdefault(key, value)
        except BaseException:
            for part in parts:
                part.close()
            raise
        super().__init__(folder.display, [raw for part in parts for raw in part._files], locations, metadata)
        self.index_bytes = sum(part.index_bytes for part in parts)
        self.index_remote = folder.remote


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


def _read_weight_map(index):
    """(weight map, bytes read) of a `*.safetensors.index.json` Location."""
    name = index.display
    try:
        with index.open() as raw:
            if raw.size > 100_000_000:
                raise CheckpointError(name, f"index is {raw.size} bytes, too large for a weight map")
            text = raw.pread(raw.size, 0)
        index_json = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(name, f"index is not valid JSON ({str(exc)[:100]})") from None
    weight_map = _weight_map(index_json, name)
    return weight_map, len(text)


def _weight_map(index_json, name):
    """The validated {tensor: shard file} map of a parsed index."""
    weight_map = index_json.get("weight_map") if isinstance(index_json, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(name, "index has no 'weight_map' object of tensor name -> shard file")
    for shard_name in weight_map.values():
        if shard_name.startswith(("/", "\\")) or ".." in shard_name.replace("\\", "/").split("/") or "://" in shard_name:
            raise CheckpointError(name, f"shard name {shard_name!r} points outside the index's folder")
    return weight_map


def open_checkpoint(source, token=None):
    """Open a `.safetensors` or `.gguf` file, a `*.safetensors.index.json`, or a model/pipeline folder, from a
    local path, a URL or the Hub (see io.locations.locate; `token` is for plain URLs).

    Folders: a diffusers pipeline (its `transformer/` or `unet/`), a diffusers model folder with shards
    and an index, or a folder holding one `.safetensors` file. Remote files are read in place, by range.
    Returns a Checkpoint; use it as a context manager to close its files.
    """
    location = locate(source, token)
    if location.is_dir() and is_sd_pipeline(location):
        return PipelineCheckpoint(location)
    if location.is_dir():
        location = resolve_folder(location)
    elif not location.exists():
        raise CheckpointError(location.display, "no such file or folder")
    name = location.name.lower()
    if name.endswith(".index.json"):
        return ShardedCheckpoint(location)
    if name.endswith(PICKLE_SUFFIXES):
        return _open_pickle(location)
    if name.endswith(".gguf"):
        from .gguf import GGUFFile
        return GGUFFile(location)
    return SafetensorsFile(location)


def _open_pickle(location):
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


def is_sd_pipeline(folder):
    """A diffusers pipeline whose model is a UNet (SD1.5/SDXL): its text encoders are read too."""
    entries = folder.list()
    return ("unet" in entries and "transformer" not in entries and folder.child("unet").is_dir()
            and _has_weights(folder.child("unet")))


def resolve_folder(folder):
    """The file (single or index) that `open_checkpoint` reads for a folder (any Location or path)."""
    folder = locate(folder) if not isinstance(folder, Location) else folder
    entries = folder.list()
    for sub in _MODEL_SUBFOLDERS:
        if sub in entries and folder.child(sub).is_dir() and _has_weights(folder.child(sub)):
            return resolve_folder(folder.child(sub))
    indexes = [e for e in entries if e.endswith(".safetensors.index.json")]
    if indexes:
        return folder.child(_pick(folder, indexes, ".safetensors.index.json"))
    files = [e for e in entries if e.endswith(".safetensors")]
    if files:
        return folder.child(_pick(folder, files, ".safetensors"))
    raise CheckpointError(folder.display, "folder holds no .safetensors file, index, transformer/ or unet/")


def _has_weights(folder):
    return any(e.endswith((".safetensors", ".safetensors.index.json")) for e in folder.list())


def _pick(folder, candidates, suffix):
    if len(candidates) == 1:
        return candidates[0]
    for stem in _PREFERRED_STEMS:
        if stem + suffix in candidates:
            return stem + suffix
    raise CheckpointError(folder.display, f"several checkpoints here ({', '.join(sorted(candidates))}); "
                                          f"name the one to use")
