"""What the notebook cells call: one function per cell, so no logic lives only in a notebook."""

import os
import shutil
import sys
from pathlib import Path

from .configs import ExtractConfig, ResizeConfig
from .memory import fmt_bytes

IN_COLAB = "google.colab" in sys.modules


def workdir():
    """Working folder for downloads and results: $LORA_COLAB_WORKDIR, else /content/lora_colab in Colab,
    else ~/lora_colab_work (never inside the repository the notebook sits in)."""
    if os.environ.get("LORA_COLAB_WORKDIR"):
        folder = Path(os.environ["LORA_COLAB_WORKDIR"])
    else:
        folder = Path("/content/lora_colab") if IN_COLAB else Path.home() / "lora_colab_work"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


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
        raise ValueError("give both the base and the fine-tuned model (or neither, for the demo)")
    return (_prepare(base, "base", folder, download, token, check=True),
            _prepare(tuned, "tuned", folder, download, token, check=True))


def _prepare(source, role, folder, download, token, check=False):
    """`source` itself (read in place), or a local copy (download, or a Drive file); with `check`, opens
    it and prints what it is, so a wrong address fails here and not halfway through the run."""
    from . import downloads

    source = str(source).strip()
    if download or downloads.is_drive(source):
        source = str(downloads.fetch(source, Path(folder) / "downloads", token=token))
    if check:
        from .inspect_info import describe_checkpoint
        print(f"{role}: {describe_checkpoint(source, token)}")
    return source


def text_progress(**kwargs):
    """A tqdm bar written as text to the cell's output: it shows in Colab, JupyterLab and the classic
    notebook alike, and a saved notebook keeps its final state (a widget bar is saved at 0)."""
    from tqdm.std import tqdm

    return tqdm(file=sys.stdout, ascii=False, ncols=100, mininterval=0.5, **kwargs)


def run_extract(base, tuned, config=None, folder=None, monitor=True):
    """Extract with a live RAM/VRAM line refreshed after every layer; returns the ExtractReport.

    Prints the settings it uses first: a "Run all" takes the form's values as they are when this runs."""
    from .extractor import extract
    from .monitor import LiveMonitor

    config = config or ExtractConfig()
    print(f"settings: {config.describe()}  (to change them: edit the form above and run this cell again)")
    live = LiveMonitor() if monitor else None
    out = Path(folder or workdir()) / config.output_name
    report = extract(base, tuned, out, on_layer=live.update if live else None, progress=text_progress,
                     **config.extract_kwargs())
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
    from .resizer import _split_merge

    folder = Path(folder or workdir())
    entries = [part.strip() for line in str(loras).splitlines() for part in line.split(";") if part.strip()]
    if not checkpoint and not entries:
        report = run_demo(folder / "resize_demo", rank=16, progress=False)
        print(f"no inputs given: using a rank-16 LoRA extracted from the demo pair, {report.output}")
        return folder / "resize_demo" / "base", [report.output]
    base = _prepare(checkpoint, "base", folder, download, token, check=True) if checkpoint else None
    ready = [",".join(_prepare(path, "LoRA", folder, download, token) + (f":{weight:g}" if weight != 1.0 else "")
                      for path, weight in _split_merge(entry)) for entry in entries]
    return base, ready


def run_resize(checkpoint, loras, config=None, folder=None):
    """Resize every LoRA with every recipe; prints a summary per output and returns the reports."""
    from .resizer import resize

    config = config or ResizeConfig()
    print(f"settings: {config.describe()}  (to change them: edit the form above and run this cell again)")
    reports = resize(checkpoint, loras, folder or workdir(), **config.resize_kwargs())
    for report in reports:
        print(report.summary(config.verbose))
    return reports


def show_report(report, plot=True, top=12):
    """A per-layer table (worst layers first) and, with matplotlib, ranks and energy per layer."""
    from IPython.display import HTML, display

    layers = sorted(report.extracted, key=lambda layer: layer.rel_error, reverse=True)[:top]
    rows = "".join(f"<tr><td>{layer.name}</td><td>{layer.rank}</td><td>{layer.energy:.4f}</td>"
                   f"<td>{layer.rel_error:.4f}</td><td>{layer.clamp_change:.2%}</td></tr>" for layer in layers)
    display(HTML(f"<p>{len(report.extracted)} layers, output {report.output} ({fmt_bytes(report.output_bytes)})"
                 f"</p><table><tr><th>layer (worst first)</th><th>rank</th><th>energy kept</th>"
                 f"<th>relative error</th><th>clamp change</th></tr>{rows}</table>"))
    if plot:
        try:
            import matplotlib.pyplot as plt
        except ImportError:
            return
        done = report.extracted
        fig, axes = plt.subplots(1, 3, figsize=(15, 3))
        axes[0].bar(range(len(done)), [layer.rank for layer in done])
        axes[0].set(title=f"kept rank per layer ({report.recipe})" if report.recipe else "rank per layer",
                    xlabel="layer (file order)")
        axes[1].plot([layer.energy for layer in done], ".")
        axes[1].set(title="energy kept per layer", xlabel="layer (file order)", ylim=(0, 1.02))
        for layer in layers[:3]:  # the worst-reproduced layers' spectra
            axes[2].semilogy(layer.singular_values, label=layer.name)
        axes[2].set(title="singular values (worst layers)", xlabel="direction")
        axes[2].legend(fontsize="small")
        fig.tight_layout()
        plt.show()


def save_results(paths, drive_folder="", hub_repo="", token=None):
    """save_result for each path (a report, a path, or a list of either); returns every place."""
    items = paths if isinstance(paths, (list, tuple)) else [paths]
    places = []
    for item in items:
        places += save_result(getattr(item, "output", item), drive_folder, hub_repo, token)
    return places


def save_result(path, drive_folder="", hub_repo="", token=None):
    """Copy a result to Drive, upload it to a Hub repo, and/or offer a download link; returns where it went."""
    from .downloads import DRIVE_ROOT, SourceError, hf_token

    path = Path(path)
    places = []
    if drive_folder:
        target = Path(drive_folder if os.path.isabs(drive_folder) else os.path.join(DRIVE_ROOT, "MyDrive",
                                                                                     drive_folder))
        if str(target).startswith(DRIVE_ROOT) and not os.path.isdir(os.path.join(DRIVE_ROOT, "MyDrive")):
            raise SourceError(f"{target}: Google Drive is not mounted (lora_colab.downloads.mount_drive())")
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / path.name)
        places.append(str(target / path.name))
    if hub_repo:
        from huggingface_hub import HfApi
        api = HfApi(token=token or hf_token())
        api.create_repo(hub_repo, exist_ok=True)
        api.upload_file(path_or_fileobj=str(path), path_in_repo=path.name, repo_id=hub_repo)
        places.append(f"https://huggingface.co/{hub_repo}/blob/main/{path.name}")
    if not places:
        from IPython.display import FileLink, display
        if IN_COLAB:
            from google.colab import files
            files.download(str(path))
        else:
            display(FileLink(str(path)))
        places.append(str(path))
    for place in places:
        print(f"saved: {place}")
    return places
