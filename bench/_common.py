"""Shared helpers for the benchmarks: memory counters, layouts, cache eviction."""

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ROOT / "tests" / "layouts"


# family -> the full layout of its native file in tests/layouts (the one each bench reads for the family)
NATIVE_LAYOUTS = {
    "sdxl": "sdxl-single-file", "flux": "flux1-dev-bfl", "chroma": "chroma1-hd-native", "zimage": "zimage-single-file",
    "qwen_image": "qwen-image-diffusers", "qwen_image_2_1": "qwen-image-2.1-native", "wan": "wan2.2-t2v-a14b-native",
    "flux2": "flux2-dev-native", "krea2": "krea2-native", "ltx2": "ltx2-native", "flux3": "flux3-native",
    "sd3": "sd3.5-large-native", "hidream": "hidream-i1-native", "lumina2": "lumina2-native",
    "ernie_image": "ernie-image-native", "ideogram4": "ideogram4-native", "kandinsky5": "kandinsky5-diffusers",
    "anima": "anima-native", "minimax_h3": "minimax-h3-native", "hunyuan_video15": "hunyuanvideo1.5-native",
    "cosmos_predict2_5": "cosmos-predict2.5-2b-native", "wan_animate2": "wan-animate2-native",
    "ace_step15": "ace-step1.5-native", "hidream_o1": "hidream-o1-native",
}


def _document(name):
    return json.loads((LAYOUTS / f"{name}.json").read_text())


def layout(name):
    """[(key, shape, dtype)] of a layout in tests/layouts."""
    return [tuple(t) for t in _document(name)["tensors"]]


def layout_metadata(name):
    """The file's metadata where the layout gives it (LTX-2.5's `config`, which ComfyUI reads its flags from)."""
    return _document(name).get("metadata")


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
