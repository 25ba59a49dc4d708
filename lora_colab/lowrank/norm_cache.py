"""The base checkpoint's spectral and Frobenius norms per weight, cached on disk by checkpoint content, so an
extraction with a recipe leaves them for later resizes and a resize reads a base weight once."""

import hashlib
import json
import os
from pathlib import Path

from ..io.temporary import temporary_name


def cache_dir():
    """Where norms are cached: $LORA_COLAB_CACHE, else $XDG_CACHE_HOME/lora_colab, else ~/.cache/lora_colab."""
    if os.environ.get("LORA_COLAB_CACHE"):
        return Path(os.environ["LORA_COLAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lora_colab"


def fingerprint(sources):
    """Content key of a checkpoint from its open ByteSources: size and header bytes of each file (not its
    path), plus what changes with the content (mtime, ETag, commit)."""
    digest = hashlib.sha256()
    for raw in sources:
        n = int.from_bytes(raw.pread(8, 0), "little") if raw.size >= 8 else 0
        digest.update(raw.size.to_bytes(8, "little"))
        # a safetensors header, or (pickles) the first MiB
        digest.update(raw.pread(min(n if n <= 100_000_000 else 1 << 20, max(raw.size - 8, 0)), 8))
    return digest.hexdigest()[:32]


def norms_cache_path(sources):
    """The norm cache file of the checkpoint read through `sources` (v2: spectral norms by Lanczos with a
    bounded error; v1's power iteration could be 2% low)."""
    return cache_dir() / f"norms_v2_{fingerprint(sources)}.json"


def remember_norms(sources, norms):
    """Add {canonical key: (spectral norm, Frobenius norm)} of whole base weights to the checkpoint's norm
    cache (what an extraction with a recipe computed), so a later resize against that base reads nothing."""
    if not norms:
        return
    path = norms_cache_path(sources)
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    cache.update({key: list(value) for key, value in norms.items()})
    write_cache(path, cache)


def write_cache(path, cache):
    """Write a norm cache atomically; False (quietly) where the cache folder is not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_name(path, "tmp")  # each run's own: concurrent runs
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, path)
        return True
    except OSError:
        return False
