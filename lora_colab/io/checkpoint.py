"""Containers read one tensor at a time: the Checkpoint interface, single safetensors files and shards
listed by an index (pickles, GGUF and the opener that picks one live beside it)."""

import json
import math

import torch

from ..closeable import Closeable
from ..dtypes import ITEMSIZE, to_torch
from ..errors import CheckpointError
from .buffers import empty_bytes
from .byte_source import SLACK
from .locations import locate
from .safetensors import read_header

STAGING_BYTES = 32 << 20  # each of the two pinned buffers a checkpoint copies to the GPU through


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
            chunk = raw.read_staged(self._take(), offset + start, n, tensor)
            out[start:start + n].copy_(chunk, non_blocking=True)
            self._events[self._turn] = torch.cuda.Event()
            self._events[self._turn].record()
            self._turn ^= 1
        return out

    def _take(self):
        """This turn's pinned buffer (STAGING_BYTES and the slack of an aligned read), once the copy that
        last used it has finished."""
        if self._events[self._turn] is not None:
            self._events[self._turn].synchronize()
        if self._buffers[self._turn] is None:
            self._buffers[self._turn] = torch.empty(STAGING_BYTES + SLACK, dtype=torch.uint8, pin_memory=True)
        return self._buffers[self._turn]


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
        self.diffusers = None        # DiffusersFolder: what a diffusers folder's configs say the model is

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
            buf = raw.read_new(offset, nbytes, info.name)
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

    sharded = True

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
