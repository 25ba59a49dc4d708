"""What a run uses, readable from the main loop: process memory (RSS, peak, VRAM, a `snapshot` of them
for status lines), the bytes read over the network (`NETWORK`, fed by io), and a purge helper."""

import ctypes
import gc
import sys
import threading
import time
from dataclasses import dataclass, field

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


class Meter:
    """Bytes received over the network, total and as a recent rate."""

    def __init__(self, window=3.0):
        self._lock = threading.Lock()
        self.total = 0
        self._window = window
        self._marks = []  # (time, total) samples within the window

    def add(self, n):
        now = time.monotonic()
        with self._lock:
            self.total += n
            self._marks.append((now, self.total))
            while len(self._marks) > 2 and now - self._marks[0][0] > self._window:
                self._marks.pop(0)

    def rate(self):
        """Bytes per second over the last few seconds (0 when idle)."""
        now = time.monotonic()
        with self._lock:
            if not self._marks or now - self._marks[-1][0] > self._window:
                return 0.0
            t0, b0 = self._marks[0]
            return (self.total - b0) / max(now - t0, 1e-3) if len(self._marks) > 1 else 0.0


NETWORK = Meter()


def _proc_fields(path, names):
    values = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in names:
                    values[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values


def _nvml_used():
    """Device memory in use as NVML reports it (all processes), or None without nvidia-ml-py or a GPU."""
    try:
        import pynvml  # the nvidia-ml-py package
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device() if torch.cuda.is_available() else 0)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:
        return None


@dataclass
class Snapshot:
    """Memory figures at one moment, in bytes (None where this machine cannot tell)."""

    rss_anon: int = None
    rss_file: int = None
    peak_rss: int = None
    available: int = None
    total: int = None
    vram_allocated: int = 0
    vram_reserved: int = 0
    vram_peak: int = 0
    vram_nvml: int = None
    net_rate: float = 0.0  # bytes/s read from the network lately
    net_total: int = 0     # bytes read from the network so far
    when: float = field(default_factory=time.time)

    def line(self, short=False):
        """One line for a status display: this process's own memory, the model-file pages it holds (the
        OS can drop them), the system's available memory, and VRAM when a GPU is in use. short=True: for a
        progress bar."""
        parts = []
        if self.rss_anon is not None:
            file_pages = fmt_bytes(self.rss_file or 0)
            parts.append(f"RAM {fmt_bytes(self.rss_anon)}" + (f" (+{file_pages} file pages)" if short else
                                                              f" used by this run (+{file_pages} of file pages "
                                                              f"the OS can drop)"))
        if self.available is not None:
            parts.append(f"{fmt_bytes(self.available)} free")
        if self.vram_reserved or self.vram_nvml:
            parts.append(f"VRAM {fmt_bytes(self.vram_allocated)}/{fmt_bytes(self.vram_reserved)}"
                         + (f" (GPU {fmt_bytes(self.vram_nvml)})" if self.vram_nvml else ""))
        if self.net_total:
            parts.append(f"net {self.net_rate / 1e6:.0f} MB/s" + ("" if short else
                                                                    f" ({fmt_bytes(self.net_total)} read)"))
        return ", ".join(parts)


def snapshot(nvml=True):
    """Sample the process and system memory now."""
    status = _proc_fields("/proc/self/status", {"RssAnon", "RssFile", "RssShmem"})
    meminfo = _proc_fields("/proc/meminfo", {"MemAvailable", "MemTotal"})
    snap = Snapshot(status.get("RssAnon"), status.get("RssFile"), peak_rss_bytes(), meminfo.get("MemAvailable"),
                    meminfo.get("MemTotal"))
    if snap.rss_anon is None:
        try:
            import psutil
            info = psutil.Process().memory_info()
            snap.rss_anon, snap.rss_file = info.rss - getattr(info, "shared", 0), getattr(info, "shared", 0)
            vm = psutil.virtual_memory()
            snap.available, snap.total = vm.available, vm.total
        except ImportError:
            pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        snap.vram_allocated = torch.cuda.memory_allocated()
        snap.vram_reserved = torch.cuda.memory_reserved()
        snap.vram_peak = torch.cuda.max_memory_allocated()
    if nvml:
        snap.vram_nvml = _nvml_used()
    snap.net_rate, snap.net_total = NETWORK.rate(), NETWORK.total
    return snap
