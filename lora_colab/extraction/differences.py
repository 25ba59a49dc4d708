"""Each target layer's difference (tuned − base), read ahead on a thread while the previous one is factored,
in the dtype and blocking the compute device wants."""

import math
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from ..io.buffers import empty_bytes
from ..io.checkpoint import cast
from ..io.quant_noise import is_lossy, noise_sq
from ..lowrank.factor import BlockedDelta, RowBlocks, bf16_products_fast

BLOCKED_BYTES = 256 << 20  # on the CPU, a larger float32 difference is built by rows into bf16 (BlockedDelta)
READAHEAD_BYTES = 320 << 20  # remote sources: raw tensor bytes read ahead beyond the next layer


class Differences:
    """Yields (target, tuned − base) for each target. The raw tensors of the next layer are read on a
    background thread while this one is factored; that thread only reads (no torch compute, which would
    fight the SVD's threads for the cores), the cast and subtraction happen here. Layers whose float32
    difference exceeds BLOCKED_BYTES (FLUX.2's fused linear1: 1.4 GB) are read here by row blocks into a
    bf16 BlockedDelta instead, so memory stays bounded by the largest small layer, not the largest layer.

    Remote sources read further ahead, up to `readahead` bytes of raw tensors beyond the next layer, so
    the network never idles while a large layer is factored."""

    def __init__(self, base, tuned, targets, device, readahead=0, keep_base=False):
        self._base, self._tuned, self._device = base, tuned, device
        self._targets = targets
        self.noise_sq = None  # expected ‖rounding noise‖² of the last yielded difference (quantized inputs)
        self._keep_base = keep_base
        self.base_weight = None  # with keep_base: the last yielded layer's base weight, a RowBlocks
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-colab-read")
        self._readahead = readahead
        self.wait_seconds = 0.0

    def _blocked(self, target):
        return self._device.type == "cpu" and math.prod(target.shape) * 4 > BLOCKED_BYTES

    def _raw_bytes(self, target):
        return self._tuned.nbytes(target.key) + self._base.nbytes(target.key)

    def _fill(self, queue, i):
        """Queue reads of layers i, i+1, ... (not blocked ones) while their bytes, after the first, fit
        the read-ahead budget; stops at a blocked layer, which is read in its turn."""
        ahead = sum(self._raw_bytes(self._targets[j]) for j in queue)
        j = max(queue, default=i - 1) + 1
        while j < len(self._targets) and not self._blocked(self._targets[j]):
            size = self._raw_bytes(self._targets[j])
            if queue and ahead + size > self._readahead:
                break
            queue[j] = self._pool.submit(self._load, self._targets[j])
            ahead += size
            j += 1

    def _build_blocked(self, target):
        rows, cols = target.shape[0], math.prod(target.shape[1:])

        def reader(view):
            return lambda a, b: view.read(target.key, rows=(a, b)).reshape(b - a, cols)
        base_out = None
        if self._keep_base:
            base_out = empty_bytes(rows * cols * 2).view(torch.bfloat16).reshape(rows, cols)
            self.base_weight = RowBlocks(base_out, blocked=True)
        return BlockedDelta.build(reader(self._tuned), reader(self._base), (rows, cols), base_out=base_out)

    def _load(self, target):
        """Raw tensors of a layer; None for a checkpoint whose reading is compute (GGUF), whose bytes are
        only fetched here and decoded by `_decode` on the computing thread."""
        return tuple(self._fetch(view, target.key) for view in (self._tuned, self._base))

    def _read_device(self):
        # to a GPU the bytes go through the reader's pinned buffer, asynchronously
        return self._device if self._device.type == "cuda" else None

    def _fetch(self, view, key):
        if view.decodes_on_read:
            view.prefetch(key)
            return None
        return view.read(key, dtype=None, device=self._read_device())

    def _decode(self, loaded, target):
        return tuple(self._decode_one(view, tensor, target) for view, tensor in zip((self._tuned, self._base), loaded))

    def _decode_one(self, view, tensor, target):
        return tensor if tensor is not None else view.read(target.key, dtype=None, device=self._read_device())

    def _difference(self, tuned, base):
        """(tuned − base) on the compute device; `tuned` is a fresh tensor and may be reused. float32, but
        bf16 for a bf16 pair where bf16 products are fast (a CPU with bf16 dot products, a GPU of compute
        capability 8.0 or more; not a T4): the difference of two close bf16 weights is exact in bf16
        (Sterbenz), and low_rank_bf16 factors it at float32 accuracy in half the time."""
        if tuned.dtype == base.dtype == torch.bfloat16 and bf16_products_fast(self._device):
            return tuned.to(self._device).sub_(base.to(self._device))
        delta = cast(tuned.to(self._device), torch.float32)
        del tuned
        subtract_(delta, base.to(self._device))
        return delta

    def __iter__(self):
        queue = {}  # layer index -> future of its raw tensors
        self._fill(queue, 0)
        for i, target in enumerate(self._targets):
            start = time.perf_counter()
            if self._blocked(target):
                self.noise_sq = None
                delta = self._build_blocked(target)
                self.wait_seconds += time.perf_counter() - start
                self._fill(queue, i + 1)
            else:
                future = queue.pop(i, None)
                loaded = future.result() if future is not None else self._load(target)
                self.wait_seconds += time.perf_counter() - start
                self._fill(queue, i + 1)
                tuned, base = self._decode(loaded, target)
                del loaded
                self.noise_sq = self._noise_sq(target, tuned, base)
                if self._keep_base:
                    self.base_weight = RowBlocks(base.to(self._device))
                delta = self._difference(tuned, base)
                del tuned, base, future
            yield target, delta
            self.base_weight = None
            del delta

    def _noise_sq(self, target, tuned, base):
        """Expected ‖rounding noise‖² the quantized side(s) put into this difference (None: none quantized)."""
        total = None
        for view, tensor in ((self._tuned, tuned), (self._base, base)):
            lossy = [d for d in sorted(view.source_dtypes(target.key)) if is_lossy(d)]
            if lossy:
                total = (total or 0.0) + noise_sq(tensor, lossy[0])
        return total

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)


def subtract_(delta, other, chunk_bytes=8 << 20):
    """delta -= other for a float32 `delta`; a bf16/fp16 `other` is cast in small row blocks (a mixed-dtype
    sub_ is ~2.5x slower on the CPU, a whole-tensor cast would double the memory)."""
    if other.dtype == delta.dtype or delta.dim() == 0 or delta.device.type != "cpu":
        return delta.sub_(other)
    flat, src = delta.reshape(delta.shape[0], -1), other.reshape(other.shape[0], -1)
    rows = max(1, chunk_bytes // max(1, flat.shape[1] * 4))
    buffer = torch.empty(min(rows, flat.shape[0]), flat.shape[1])
    for start in range(0, flat.shape[0], rows):
        block = buffer[: min(rows, flat.shape[0] - start)]
        block.copy_(src[start:start + block.shape[0]])
        flat[start:start + block.shape[0]].sub_(block)
    return delta
