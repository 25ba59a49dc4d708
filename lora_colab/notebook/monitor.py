"""A RAM/VRAM monitor refreshed from the main loop (Colab does not show widget updates made from
background threads): process RSS split into anonymous and file-backed memory, system available memory,
VRAM from torch's counters and NVML when present, and peaks."""

import time

from ..memory import snapshot


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
