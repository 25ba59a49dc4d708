"""Shared helpers for the benchmarks: memory counters, layouts, cache eviction."""

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ROOT / "tests" / "layouts"


def layout(name):
    return [tuple(t) for t in json.loads((LAYOUTS / f"{name}.json").read_text())["tensors"]]


def proc_status(field):
    """A VmXXX field of /proc/self/status in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def page_cache_bytes():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) * 1024
    return 0


def evict(path):
    """Drop a file's pages from the page cache so the next read is cold."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def mib(n):
    return f"{n / 2**20:,.0f} MiB"


def in_subprocess(module, function, *args):
    """`module.function(*args)` (a bench module beside this one) in a fresh Python process: its peak RSS
    is its own. Returns what the function returned (JSON-able)."""
    import subprocess
    import sys

    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import {module} as b; "
            f"print('RESULT' + json.dumps(b.{function}(*{args!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT")), None)
    if line is None:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(line[len("RESULT"):])
