"""Process memory figures (RSS, peak, VRAM) and a purge helper, readable from the main loop."""

import ctypes
import gc
import sys
from dataclasses import dataclass

import torch


def _status_field(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes():
    """Resident set size now (file-backed pages included)."""
    value = _status_field("VmRSS")
    if value is None:
        try:
            import psutil
            return psutil.Process().memory_info().rss
        except ImportError:
            return 0
    return value


def peak_rss_bytes():
    """Peak resident set size of this process so far (VmHWM on Linux)."""
    value = _status_field("VmHWM")
    if value is None:
        try:
            import resource
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return peak if sys.platform == "darwin" else peak * 1024
        except (ImportError, OSError):
            return rss_bytes()
    return value


def vram_bytes():
    """(allocated, peak allocated) CUDA memory of this process through torch's counters, or (0, 0)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0, 0
    return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()


@dataclass
class PurgeResult:
    rss_before: int
    rss_after: int
    seconds: float

    @property
    def freed(self):
        return self.rss_before - self.rss_after


def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_MMAP_THRESHOLD = 4 << 20
_heap_bounded = False


def bound_heap():
    """Make glibc serve every allocation of 4 MiB or more with its own mapping, returned to the OS when
    freed. By default glibc raises that threshold after the first large free (up to 32 MiB), after which
    the row blocks of large layers pile up in the heap: +0.5 GiB on a FLUX.2 [dev] layer. Process-wide;
    a no-op off glibc."""
    global _heap_bounded
    if _heap_bounded or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, _MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (fixes it: no dynamic raise)
    except (OSError, AttributeError):
        pass
    _heap_bounded = True


def purge(full=True):
    """gc, glibc malloc_trim and the CUDA cache: hand freed memory back to the OS; reports what it freed.

    full=False collects only the young gc generations (what a loop iteration creates), which is enough
    between layers and ~100x cheaper than a full collection.
    """
    import time

    start = time.perf_counter()
    before = rss_bytes()
    gc.collect() if full else gc.collect(1)
    _malloc_trim()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    return PurgeResult(before, rss_bytes(), time.perf_counter() - start)


def fmt_bytes(n):
    """'1.23 GiB' style."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
