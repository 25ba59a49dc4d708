"""A RAM/VRAM monitor refreshed from the main loop (Colab does not show widget updates made from
background threads): process RSS split into anonymous and file-backed memory, system available memory,
VRAM from torch's counters and NVML when present, and peaks."""

import time
from dataclasses import dataclass, field

import torch

from ..memory import fmt_bytes, peak_rss_bytes


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
    from ..io.http import NETWORK
    snap.net_rate, snap.net_total = NETWORK.rate(), NETWORK.total
    return snap


class LiveMonitor:
    """Shows a memory line in a notebook display handle (or prints it), updated when `update()` is called
    from the main loop — e.g. as extract's/resize's per-layer callback."""

    def __init__(self, every=0.5, display=True):
        self.every = every
        self.samples = []
        self._last = 0.0
        self._handle = None
        if display:
            try:
                from IPython import get_ipython
                from IPython.display import display as show
                if get_ipython() is not None:
                    self._handle = show(self._text(snapshot()), display_id=True)
            except ImportError:
                pass

    def _text(self, snap):
        from IPython.display import Pretty
        return Pretty(snap.line())

    def update(self, *_):
        """Sample (at most every `every` seconds) and refresh the display."""
        now = time.monotonic()
        if now - self._last < self.every:
            return None
        self._last = now
        snap = snapshot(nvml=False)
        self.samples.append(snap)
        if self._handle is not None:
            self._handle.update(self._text(snap))
        return snap

    @property
    def peak_anon(self):
        return max((s.rss_anon or 0 for s in self.samples), default=0)
