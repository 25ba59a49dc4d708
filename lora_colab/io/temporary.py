"""Temporary files beside an output: each run's own names, and the clean-up of those whose run died."""

import os
import secrets
from pathlib import Path


def temporary_name(path, suffix):
    """`OUT.<pid>-<random>.<suffix>` beside `path`: each run's temporary files are its own, so two runs
    writing one output never truncate each other's (the last to finish renames a complete file into place)."""
    return path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(3)}.{suffix}")


def remove_orphans(path):
    """Remove temporary files beside `path` left by runs that died (kill -9, a lost runtime): those whose
    process is gone; a live run's files are left alone. Returns how many were removed."""
    path = Path(os.fspath(path))
    removed = 0
    for tmp in path.parent.glob(f"{glob_escape(path.name)}.*-*.tmp"):
        pid = tmp.name[len(path.name) + 1:].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            try:
                tmp.unlink()
                removed += 1
            except OSError:
                pass
    return removed


def glob_escape(text):
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True
