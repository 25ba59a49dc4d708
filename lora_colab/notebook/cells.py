"""What the notebook cells call: one function per cell, so no logic lives only in a notebook."""

import importlib
import os
import shutil
import sys
from pathlib import Path

from ..configs import ExtractConfig, ResizeConfig
from ..memory import fmt_bytes

IN_COLAB = "google.colab" in sys.modules


class Missing:
    """What a cell hands on when it could not do its job: later cells say what to fix instead of failing."""

    def __init__(self, cell, why):
        self.cell, self.why = cell, why

    def __repr__(self):
        return f"<not ready: cell {self.cell} failed: {self.why}>"

    def __bool__(self):
        return False


def _problem(text):
    """Show one readable line (red in a notebook), no traceback."""
    try:
        from IPython import get_ipython
        if get_ipython() is not None:
            from html import escape

            from IPython.display import HTML, display
            display(HTML(f"<div style='color:#b00020;font-weight:bold'>{escape(text)}</div>"))
            return
    except ImportError:
        pass
    print(text)


def _failed(cell, exc):
    """One line for an error a person can fix (bad path, repo, token, file kind); others propagate."""
    from ..errors import LoraColabError
    if not isinstance(exc, (LoraColabError, OSError, ValueError)):
        raise exc
    why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    _problem(f"cell {cell}: {why}")
    return Missing(cell, why)


def _stopped(cell, exc):
    """A stopped run cell whose journal keeps its work: one line saying how to go on, not a traceback."""
    why = str(exc).replace("the same command resumes", "run this cell again to resume")
    _problem(f"cell {cell}: {why}")
    return Missing(cell, why)


def _not_ready(*values, needed_by):
    """The first Missing among values handed on by earlier cells (after saying which cell to fix), else None.
    `needed_by` names this cell by what it does ("extract", "save"): the notebooks number their cells
    differently, and the cell to fix is the one that failed first, which the Missing carries on."""
    for value in values:
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(item, Missing):
                _problem(f"this cell ({needed_by}) cannot run: cell {item.cell} failed ({item.why}); fix it and "
                         f"run cell {item.cell} again, then this one")
                return item
    return None


REMOTE_WORKSPACE = Path("/workspace")  # the persistent folder RunPod and Vast.ai serve


def workdir():
    """Working folder for downloads and results: $LORA_COLAB_WORKDIR; else /content/lora_colab in Colab;
    else `lora_colab_work` in the folder the running Jupyter serves the notebook from, so its download links
    reach the results (a local JupyterLab's folder, a remote one's /workspace or /notebooks); else
    /workspace/lora_colab_work where that folder exists; else ~/lora_colab_work."""
    if os.environ.get("LORA_COLAB_WORKDIR"):
        folder = Path(os.environ["LORA_COLAB_WORKDIR"])
    elif IN_COLAB:
        folder = Path("/content/lora_colab")
    else:
        folder = _served_workdir() or Path.home() / "lora_colab_work"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _served_workdir():
    """`lora_colab_work` under the Jupyter root that serves the kernel's folder, or under a writable
    /workspace; None when neither is known."""
    cwd = Path(os.getcwd()).resolve()
    serving = [root for root in jupyter_roots() if cwd == root or root in cwd.parents]
    if serving:
        return max(serving, key=lambda r: len(r.parts)) / "lora_colab_work"
    if REMOTE_WORKSPACE.is_dir() and os.access(REMOTE_WORKSPACE, os.W_OK):
        return REMOTE_WORKSPACE / "lora_colab_work"
    return None


def prepare_models(base="", tuned="", folder=None, download=False, token=None):
    """The base and tuned models to read (both empty: the built-in demo pair), with a line saying what each is.

    Hub and URL sources are read in place, by range, as the extraction needs them; download=True copies
    them to the work folder first. Drive files are copied to local disk when they fit (Drive reads slowly).
    """
    from .synthetic import DEMO_ZIMAGE, make_zimage_pair

    folder = Path(folder or workdir())
    if not base and not tuned:
        demo = folder / "demo"
        if not (demo / "tuned.safetensors").exists():
            make_zimage_pair(demo, DEMO_ZIMAGE, rank=8, noise=0.0005)
        print(f"no models given: using the built-in Z-Image-shaped demo pair in {demo}")
        return demo / "base", demo / "tuned.safetensors"
    if not base or not tuned:
        failed = Missing(2, "give both the base and the fine-tuned model (or neither, for the demo)")
        _problem(f"cell 2: {failed.why}")
        return failed, failed
    try:
        return (_prepare(base, "base", folder, download, token, check=True),
                _prepare(tuned, "tuned", folder, download, token, check=True))
    except Exception as exc:  # noqa: BLE001 (_failed re-raises what a person cannot fix)
        failed = _failed(2, exc)
        return failed, failed


def _prepare(source, role, folder, download, token, check=False, check_lora=False):
    """`source` itself (read in place), or a local copy (download, or a Drive file); with `check`, opens
    it and prints what it is, so a wrong address fails here and not halfway through the run; with
    `check_lora`, refuses a file that is a model rather than a LoRA."""
    from ..io import downloads

    source = str(source).strip()
    if download or downloads.is_drive(source):
        source = str(downloads.fetch(source, Path(folder) / "downloads", token=token))
    if check:
        from ..lora.inspect import describe_checkpoint, require_model
        require_model(source, token)
        print(f"{role}: {describe_checkpoint(source, token)}")
    if check_lora:
        from ..lora.inspect import require_lora
        require_lora(source, token)
    return source


def text_progress(**kwargs):
    """A tqdm bar written as text to the cell's output: it shows in Colab, JupyterLab and the classic
    notebook alike, and a saved notebook keeps its final state (a widget bar is saved at 0). The memory
    line above it says what the bar's postfix would, so the bar keeps none."""
    from tqdm.std import tqdm

    class _Bar(tqdm):
        def set_postfix_str(self, s="", refresh=True):
            pass

    return _Bar(file=sys.stdout, ascii=False, ncols=80, mininterval=0.5, **kwargs)


def _results_folder(folder):
    """Where results (and an unfinished run's journal) go: the work folder, or `folder` (a path, or a Drive
    folder such as `MyDrive/lora_colab`, which survives a lost runtime)."""
    if not folder:
        return workdir()
    from ..io.downloads import drive_folder
    text = str(folder).strip()
    path = drive_folder(text) if IN_COLAB or text.startswith("drive:") else Path(text).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_extract(base, tuned, config=None, folder=None, monitor=True):
    """Extract with a live RAM/VRAM line refreshed after every layer; returns the ExtractReport.

    Prints the settings it uses first: a "Run all" takes the form's values as they are when this runs.
    An interrupted run (a stopped cell, a lost runtime) keeps its finished layers in a journal beside the
    output in `folder`: running the cell again resumes ("resuming from layer N of M"); on Drive the journal
    outlives the runtime."""
    from ..errors import Interrupted
    from ..extraction.extractor import extract
    from .monitor import LiveMonitor

    missing = _not_ready(base, tuned, needed_by="extract")
    if missing is not None:
        return missing
    config = config or ExtractConfig()
    print(f"settings: {config.describe()}  (to change them: edit the form above and run this cell again)")
    live = LiveMonitor() if monitor else None
    try:
        out = _results_folder(folder) / config.output_name
        report = extract(base, tuned, out, on_layer=live.update if live else None, progress=text_progress,
                         **config.extract_kwargs())
    except Interrupted as exc:
        return _stopped(4, exc)
    except Exception as exc:  # noqa: BLE001
        return _failed(4, exc)
    print(report)
    return report


def prepare_resize_inputs(checkpoint="", loras="", folder=None, download=False, token=None):
    """(checkpoint, [LoRA entries]) from sources. `loras` holds entries separated by `;` or new lines;
    an entry is one LoRA (`lora.safetensors`, `lora.safetensors:0.5`) or a weighted merge
    (`a.safetensors:0.7,b.safetensors:0.3`). Hub and URL files are read in place (download=True: copied to
    the work folder first); Drive files are copied to local disk.

    Both empty -> the demo base and a rank-16 LoRA extracted from the demo pair.
    """
    from .demo import run_demo
    from ..resizing.inputs import LoraInput

    folder = Path(folder or workdir())
    entries = [part.strip() for line in str(loras).splitlines() for part in line.split(";") if part.strip()]
    if not checkpoint and not entries:
        report = run_demo(folder / "resize_demo", rank=16, progress=False)
        print(f"no inputs given: using a rank-16 LoRA extracted from the demo pair, {report.output}")
        return folder / "resize_demo" / "base", [report.output]
    try:
        base = _prepare(checkpoint, "base", folder, download, token, check=True) if checkpoint else None
        ready = [LoraInput.parse(entry).with_paths(
            lambda path: _prepare(path, "LoRA", folder, download, token, check_lora=True)).text for entry in entries]
    except Exception as exc:  # noqa: BLE001
        failed = _failed(2, exc)
        return failed, [failed]
    if not ready:
        failed = Missing(2, "give at least one LoRA to resize")
        _problem(f"cell 2: {failed.why}")
        return base, [failed]
    return base, ready


def run_resize(checkpoint, loras, config=None, folder=None, monitor=True, plot=True):
    """Resize every LoRA with every recipe, with a memory line and a progress bar; prints a summary per
    output, shows what each recipe kept, and returns the reports."""
    from ..errors import Interrupted
    from .monitor import LiveMonitor
    from ..resizing.resizer import resize

    missing = _not_ready(checkpoint, loras, needed_by="resize")
    if missing is not None:
        return missing
    try:
        config = config or ResizeConfig()
    except Exception as exc:  # noqa: BLE001
        return _failed(3, exc)
    print(f"settings: {config.describe()}  (to change them: edit the form above and run this cell again)")
    live = LiveMonitor() if monitor else None
    try:
        reports = resize(checkpoint, loras, _results_folder(folder), progress=text_progress,
                         on_layer=live.update if live else None, **config.resize_kwargs())
    except Interrupted as exc:
        return _stopped(4, exc)
    except Exception as exc:  # noqa: BLE001
        return _failed(4, exc)
    for report in reports:
        print(report.summary(config.verbose))
    if plot:
        show_resize(reports)
    return reports


def show_resize(reports):
    """Per output: the rank of each layer before and after, and the distribution of direction scores with
    the threshold the recipe used (size= targets: the lowest kept score)."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return
    for report in reports:
        fig, axes = plt.subplots(1, 2, figsize=(12, 2.8))
        old = [layer.old_rank for layer in report.layers]
        new = [layer.new_rank for layer in report.layers]
        axes[0].bar(range(len(old)), old, color="#cccccc", label="before")
        axes[0].bar(range(len(new)), new, color="#1f77b4", label="after")
        axes[0].set(title=f"rank per layer ({report.recipe['recipe']})", xlabel="layer (file order)")
        axes[0].legend(fontsize="small")
        if report.scores:
            axes[1].hist(report.scores, bins=60, color="#1f77b4")
            if report.threshold is not None:
                axes[1].axvline(report.threshold, color="#d62728", label=f"threshold {report.threshold:.2f}")
                axes[1].legend(fontsize="small")
            axes[1].set(title="direction scores (kept: right of the line)", xlabel="log10 score")
        else:
            retained = [layer.retained for layer in report.layers]
            axes[1].bar(range(len(retained)), retained)
            axes[1].set(title="energy kept per layer", xlabel="layer (file order)",
                        ylim=(min(retained + [1.0]) * 0.98, 1.0))
        fig.tight_layout()
        plt.show()


def show_report(report, plot=True, top=12):
    """A per-layer table (worst layers first) and, with matplotlib, the rank, the relative error and the
    worst layers' spectra."""
    from IPython.display import HTML, display

    if report is None or _not_ready(report, needed_by="results") is not None:
        return
    layers = sorted(report.extracted, key=lambda layer: layer.rel_error, reverse=True)[:top]
    rows = "".join(f"<tr><td>{layer.name}</td><td>{layer.rank}</td><td>{layer.energy:.4f}</td>"
                   f"<td>{layer.rel_error:.4f}</td><td>{layer.clamp_change:.2%}</td></tr>" for layer in layers)
    where = f"output {Path(report.output).name} ({fmt_bytes(report.output_bytes)})" if report.output else "no file"
    display(HTML(f"<p>{len(report.extracted)} layers, {where}</p><table><tr><th>layer (worst first)</th>"
                 f"<th>rank</th><th>energy kept</th><th>relative error</th><th>clamp change</th></tr>{rows}</table>"))
    if plot and report.extracted:
        _plot_extraction(report, layers)


def _plot_extraction(report, worst):
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return
    done = report.extracted
    fig, axes = plt.subplots(1, 3, figsize=(15, 3))
    axes[0].bar(range(len(done)), [layer.rank for layer in done])
    axes[0].set(title=f"kept rank per layer ({report.recipe})" if report.recipe else "rank per layer",
                xlabel="layer (file order)")
    errors = [layer.rel_error for layer in done]
    axes[1].bar(range(len(done)), errors, color="#d62728")
    axes[1].set(title="relative error per layer (‖ΔW − LoRA‖ / ‖ΔW‖)", xlabel="layer (file order)",
                ylim=(0, max(errors) * 1.15 or 1.0))
    for layer in worst[:3]:  # the worst-reproduced layers' spectra
        axes[2].semilogy(layer.singular_values, label=layer.name)
    axes[2].set(title="singular values kept (worst layers)", xlabel="direction")
    axes[2].legend(fontsize="small")
    fig.tight_layout()
    plt.show()


def _outputs(item):
    """The files a report wrote (an extraction's own and its pipeline components'), or the path given."""
    components = getattr(item, "components", {}) or {}
    return [getattr(item, "output", item)] + [c.output for c in components.values() if c.output]


def save_results(paths, drive_folder="", hub_repo="", token=None):
    """save_result for each path (a report, a path, or a list of either): one line per place it went, with a
    download link when it went nowhere else. Returns nothing (the lines say it all)."""
    if _not_ready(paths, needed_by="save") is not None:
        return None
    items = paths if isinstance(paths, (list, tuple)) else [paths]
    outputs = [output for item in items for output in _outputs(item)]
    if not any(outputs):
        _problem("nothing to save: the run above wrote no file (its report says why)")
        return None
    for output in outputs:
        if output:
            try:
                save_result(output, drive_folder, hub_repo, token)
            except Exception as exc:  # noqa: BLE001
                _failed("6 (save)", exc)
    return None


def save_result(path, drive_folder="", hub_repo="", token=None):
    """Copy a result to Drive, upload it to a Hub repo, and/or offer a download; returns where it went."""
    from ..io import downloads

    path = Path(path)
    places = []
    if drive_folder:
        target = downloads.drive_folder(drive_folder)  # the folder as sources name it; Drive mounted in Colab
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / path.name)
        places.append(str(target / path.name))
        print(f"saved to {target / path.name}")
    if hub_repo:
        from huggingface_hub import HfApi
        api = HfApi(token=token or downloads.hf_token())
        api.create_repo(hub_repo, exist_ok=True)
        api.upload_file(path_or_fileobj=str(path), path_in_repo=path.name, repo_id=hub_repo)
        places.append(f"https://huggingface.co/{hub_repo}/blob/main/{path.name}")
        print(f"uploaded to {places[-1]}")
    if not places:
        places.append(str(path))
        offer_download(path)
    return places


def download_href(path, cwd=None):
    """The link a notebook page downloads `path` from: relative to the notebook's folder (the kernel's
    working directory), which JupyterLab and the classic notebook resolve under their file server."""
    return Path(os.path.relpath(Path(path).resolve(), Path(cwd or os.getcwd()).resolve())).as_posix()


def jupyter_roots():
    """The folders the running Jupyter servers serve files from (JupyterLab/Notebook 7 `root_dir`, classic
    `notebook_dir`); empty when none can be listed."""
    roots = []
    for module in ("jupyter_server.serverapp", "notebook.notebookapp"):
        try:
            servers = importlib.import_module(module).list_running_servers()
            roots.extend(Path(info.get("root_dir") or info.get("notebook_dir")).resolve() for info in servers
                         if info.get("root_dir") or info.get("notebook_dir"))
        except Exception:  # noqa: BLE001 - no server package, or unreadable runtime files: no roots known
            continue
    return roots


def unreachable_root(path, cwd=None, roots=None):
    """The server root serving the notebook (the kernel's folder) when `path` lies outside it, so no link
    can reach the file; None when the file is under that root or no root is known."""
    cwd = Path(cwd or os.getcwd()).resolve()
    roots = jupyter_roots() if roots is None else roots
    serving = [root for root in roots if cwd == root or root in cwd.parents]
    if not serving:
        return None
    root = max(serving, key=lambda r: len(r.parts))
    target = Path(path).resolve()
    return None if target == root or root in target.parents else root


def offer_download(path):
    """In Colab, the browser downloads the file; elsewhere one line with a download link, or, where the file
    lies outside the folder Jupyter serves, where it is and why no link reaches it."""
    path = Path(path)
    size = fmt_bytes(path.stat().st_size)
    if IN_COLAB:
        from google.colab import files
        print(f"downloading {path.name} ({size}); it also stays at {path}")
        files.download(str(path))
        return
    from html import escape

    from IPython.display import HTML, display
    root = unreachable_root(path)
    if root is not None:
        print(f"saved: {path.name} ({size}) in {path.parent}; Jupyter serves only {root}, so no download link "
              f"can reach it: copy it from there, or set LORA_COLAB_WORKDIR to a folder under {root}")
        return
    href = escape(download_href(path), quote=True)
    display(HTML(f"saved: <a href='{href}' download='{escape(path.name, quote=True)}'>{escape(path.name)}</a> "
                 f"({size}, in {escape(str(path.parent))})"))
