"""The progress bar extraction and resizing show: tqdm's (or a tqdm-like factory a notebook passes), with the
run's memory line as its postfix."""

from .memory import snapshot


def progress_bar(total, progress, desc="extract"):
    """None (progress=False), tqdm.auto's bar (True), or `progress(**kwargs)` (a tqdm-like factory), over
    `total` layers."""
    if not progress:
        return None
    if callable(progress):
        return progress(total=total, desc=desc, unit="layer")
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="layer", dynamic_ncols=True)


def advance(bar, layer):
    if bar is None:
        return
    bar.set_postfix_str(snapshot(nvml=False).line(short=True), refresh=False)
    bar.update(1)
