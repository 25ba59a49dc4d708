import json
import re
from pathlib import Path

import pytest

from lora_colab.notebook import links
from lora_colab.configs import PRESETS, ExtractConfig, build_recipe
from lora_colab.memory import snapshot
from lora_colab.notebook.monitor import LiveMonitor
from lora_colab.lowrank.recipes import RecipeError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

pytest.importorskip("ipywidgets")


def test_extract_form_defaults_presets_and_config():
    from lora_colab.notebook.widgets import ExtractForm
    form = ExtractForm()
    assert form.config() == ExtractConfig()
    name = next(n for n in PRESETS if n.startswith("subtle"))
    form.apply_preset(name)
    config = form.config()
    assert (config.rank, config.alpha, config.scale) == (32, 16.0, 0.5)
    form.clamp.value, form.conv_rank.value, form.dtype.value = 1.0, 8, "fp16"
    kwargs = form.config().extract_kwargs()
    assert kwargs["clamp_quantile"] is None and kwargs["conv_rank"] == 8 and kwargs["dtype"] == "fp16"
    assert kwargs["conv_alpha"] is None and kwargs["alpha"] == 16.0 and kwargs["scale"] == 0.5


def test_resize_form_builds_recipes_and_rejects_bad_ones():
    from lora_colab.notebook.widgets import ResizeForm
    form = ResizeForm()
    assert form.config().recipes == "spn_ckpt=1,thr=-1.2"
    form.weights["spn_ckpt"].value, form.weights["params"].value = 2.0, 1.0
    form.selection.value, form.value.value = "size", 50
    form.add_recipe()
    assert form.config().recipes == "spn_ckpt=1,thr=-1.2:spn_ckpt=2,params=1,size=50"
    form.recipes.value += "\nbogus=1"
    with pytest.raises(RecipeError, match="unknown key 'bogus'"):
        form.config()
    assert build_recipe({"fro_ckpt": 1.0, "spn_lora": 0.0}, "thr", -2, rescale=0.5) == "fro_ckpt=1,thr=-2,rescale=0.5"


def test_snapshot_figures_match_proc_and_track_an_allocation():
    import mmap
    before = snapshot(nvml=False)
    status = Path("/proc/self/status").read_text()
    anon = int(re.search(r"RssAnon:\s+(\d+)", status).group(1)) * 1024
    assert abs(before.rss_anon - anon) < 64 << 20
    assert 0 < before.available <= before.total
    block = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # fresh, every page touched
    for offset in range(0, 64 << 20, 4096):
        block[offset] = 1
    after = snapshot(nvml=False)
    assert after.rss_anon - before.rss_anon > 56 << 20
    assert "RAM" in after.line() and "free" in after.line()
    block.close()
    monitor = LiveMonitor(every=0.0, display=False)
    assert monitor.update() is not None and monitor.peak_anon > 0


def test_readme_badges_and_notebook_installs_come_from_one_repository_address():
    readme = (ROOT / "README.md").read_text()
    for nb in NOTEBOOKS:
        assert links.colab_badge(nb.name) in readme, nb.name
        text = nb.read_text()
        assert links.pip_spec() in text and links.colab_url(nb.name) in text


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_committed_clean(path):
    nb = json.loads(path.read_text())
    assert "widgets" not in nb["metadata"]
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
            source = "".join(cell["source"])
            lines = [line for line in source.splitlines() if line.strip()]
            code = [line for line in lines if not line.lstrip().startswith(("#", "%", "import", "from", "if "))
                    and "#@param" not in line]
            assert len(code) <= 1, f"{path.name}: a cell holds more than one call: {code}"
        text = "".join(cell["source"])
        assert not re.search(r"hf_[A-Za-z0-9]{20,}|/root/|/home/|/work/", text)


@pytest.mark.parametrize("download", [False, True])
def test_resize_inputs_take_several_loras_on_one_line_and_read_remote_ones_in_place(tmp_path, monkeypatch, capsys,
                                                                                     download):
    import lora_colab.io.downloads as downloads
    import lora_colab.lora.inspect as inspect_info
    from lora_colab.notebook import cells as notebook
    fetched = []

    def fake_fetch(source, folder, token=None, **_):
        fetched.append(source)
        return Path(folder) / Path(source.split(":")[-1]).name

    monkeypatch.setattr(downloads, "fetch", fake_fetch)
    monkeypatch.setattr(inspect_info, "describe_checkpoint", lambda source, token=None: f"{source}: checked")
    monkeypatch.setattr(inspect_info, "require_lora", lambda source, token=None: None)
    monkeypatch.setattr(inspect_info, "require_model", lambda source, token=None: None)
    base, loras = notebook.prepare_resize_inputs(
        "owner/base:model.safetensors", "owner/a:a.safetensors:0.7,drive:MyDrive/b.safetensors:0.3; c.safetensors:0.5;"
        "d.safetensors", folder=tmp_path, download=download)
    got = tmp_path / "downloads"
    if download:
        assert fetched == ["owner/base:model.safetensors", "owner/a:a.safetensors", "drive:MyDrive/b.safetensors",
                           "c.safetensors", "d.safetensors"]
        assert base == f"{got}/model.safetensors"
        assert loras[0] == f"{got}/a.safetensors:0.7,{got}/b.safetensors:0.3"
    else:  # Hub and URL files are read in place; only the Drive file is copied to local disk
        assert fetched == ["drive:MyDrive/b.safetensors"]
        assert base == "owner/base:model.safetensors"
        assert loras == [f"owner/a:a.safetensors:0.7,{got}/b.safetensors:0.3", "c.safetensors:0.5", "d.safetensors"]
    assert f"base: {base}: checked" in capsys.readouterr().out


def test_run_cells_say_which_settings_they_used(tmp_path, capsys):
    from lora_colab.notebook import cells as notebook
    from lora_colab.notebook.synthetic import ZImageConfig, make_zimage_pair
    base, tuned, _ = make_zimage_pair(tmp_path, ZImageConfig(dim=64, n_layers=1, n_refiner_layers=1, n_heads=4,
                                                             cap_feat_dim=32), rank=2)
    report = notebook.run_extract(base, tuned, ExtractConfig(rank=4, alpha=2.0), folder=tmp_path, monitor=False)
    out = capsys.readouterr().out
    assert out.startswith("settings: rank 4, alpha 2, strength 1, clamp 0.99, format auto, dtype auto, device auto")
    assert "edit the form above and run this cell again" in out
    assert "extract: 100%" in out and f"{len(report.layers)}/{len(report.layers)}" in out  # a text bar, finished


def test_without_ipywidgets_the_forms_say_how_to_get_them_and_use_the_defaults(monkeypatch, capsys):
    """Local Jupyter after a plain `pip install .`: no traceback at the options cell, one line naming the
    extras, and the later cells run with the default options."""
    import sys
    from lora_colab.configs import ExtractConfig, ResizeConfig
    from lora_colab.notebook.widgets import ExtractForm, ResizeForm
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import ipywidgets raises ImportError
    for form, default in ((ExtractForm, ExtractConfig()), (ResizeForm, ResizeConfig())):
        shown = form().show()
        assert shown.config() == default
        out = capsys.readouterr().out
        assert out.count("\n") == 1 and "%pip install 'lora_colab[colab]'" in out


def test_a_file_outside_the_folder_jupyter_serves_gets_a_plain_line_not_a_dead_link(tmp_path, monkeypatch, capsys):
    """JupyterLab started in the notebooks' folder cannot serve ~/lora_colab_work: the save line says where
    the file is and why no link reaches it; under the served folder it stays a link. The server is found
    as Jupyter lists its running servers (a jpserver-*.json runtime file whose pid is alive)."""
    import json
    import os

    from lora_colab.notebook import cells as nb
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    served = tmp_path / "served" / "notebooks"
    served.mkdir(parents=True)
    (runtime / "jpserver-1.json").write_text(json.dumps({"pid": os.getpid(), "root_dir": str(served.parent)}))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(runtime))
    monkeypatch.chdir(served)  # the kernel runs in the notebook's folder
    assert nb.jupyter_roots() == [served.parent.resolve()]
    outside = tmp_path / "work" / "lora.safetensors"
    outside.parent.mkdir()
    outside.write_bytes(b"x" * 2048)
    inside = served / "lora.safetensors"
    inside.write_bytes(b"x" * 2048)
    assert nb.unreachable_root(outside) == served.parent.resolve() and nb.unreachable_root(inside) is None
    nb.offer_download(outside)
    line = capsys.readouterr().out
    assert f"Jupyter serves only {served.parent.resolve()}" in line and str(outside.parent) in line
    assert line.count("\n") == 1 and "href" not in line


def test_save_names_drive_folders_as_the_sources_do(tmp_path, monkeypatch, capsys):
    """The save step's Drive folder is read like a Drive source: `drive:MyDrive/x`, `MyDrive/x`, `x` and
    `Shareddrives/team/x` under the mounted Drive, an absolute path as it is; outside Colab an unmounted
    Drive is one line, and nothing is written."""
    from lora_colab.io import downloads
    from lora_colab.notebook.cells import save_result, save_results
    result = tmp_path / "lora.safetensors"
    result.write_bytes(b"x" * 100)
    assert save_result(result, str(tmp_path / "out")) == [str(tmp_path / "out" / "lora.safetensors")]
    assert (tmp_path / "out" / "lora.safetensors").read_bytes() == b"x" * 100
    drive = tmp_path / "drive"
    (drive / "MyDrive").mkdir(parents=True)
    monkeypatch.setattr(downloads, "DRIVE_ROOT", str(drive))
    for given, where in (("drive:MyDrive/a", "MyDrive/a"), ("MyDrive/b", "MyDrive/b"), ("c", "MyDrive/c"),
                         ("Shareddrives/team/d", "Shareddrives/team/d")):
        assert save_result(result, given) == [str(drive / where / "lora.safetensors")], given
    monkeypatch.setattr(downloads, "DRIVE_ROOT", str(tmp_path / "unmounted"))
    capsys.readouterr()
    save_results(result, "drive:MyDrive/e")
    out = capsys.readouterr()
    assert "Google Drive can only be mounted inside Colab" in out.out + out.err
    assert not (tmp_path / "unmounted").exists()


def test_save_takes_a_pipelines_component_files_with_the_main_one(tmp_path):
    """An extraction of pipeline folders wrote OUT and OUT_text_encoder: saving its report saves both."""
    from lora_colab.extraction.report import ExtractReport
    from lora_colab.notebook.cells import save_results
    files = [tmp_path / name for name in ("lora.safetensors", "lora_text_encoder.safetensors")]
    for i, path in enumerate(files):
        path.write_bytes(bytes([i]) * 64)
    report = ExtractReport("base", "tuned", output=str(files[0]))
    report.components["text_encoder"] = ExtractReport("base/text_encoder", "tuned/text_encoder", output=str(files[1]))
    save_results(report, str(tmp_path / "saved"))
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == sorted(p.name for p in files)
    assert (tmp_path / "saved" / files[1].name).read_bytes() == bytes([1]) * 64


def test_the_resize_form_chooses_the_spelling_the_output_is_written_in():
    """The form's "write for" choice reaches resize() as `to` (None: the LoRA's own spelling)."""
    pytest.importorskip("ipywidgets")
    from lora_colab.configs import ResizeConfig
    from lora_colab.notebook.widgets import ResizeForm
    assert ResizeConfig().resize_kwargs()["to"] is None
    form = ResizeForm(ResizeConfig(to="comfy"))
    assert form.config().to == "comfy" and form.config().resize_kwargs()["to"] == "comfy"
    form.to.value = "peft"
    assert form.config().resize_kwargs()["to"] == "peft" and "written for peft" in form.config().describe()


def test_the_default_work_folder_is_one_jupyter_serves(tmp_path, monkeypatch):
    """Local JupyterLab: results land under the folder it serves (so a download link reaches them); a remote
    Jupyter (RunPod, Vast) without a known root: /workspace; neither: the home folder."""
    from lora_colab.notebook import cells
    served = tmp_path / "served"
    (served / "notebooks").mkdir(parents=True)
    monkeypatch.delenv("LORA_COLAB_WORKDIR", raising=False)
    monkeypatch.setattr(cells, "IN_COLAB", False)
    monkeypatch.setattr(cells, "jupyter_roots", lambda: [served.resolve()])
    monkeypatch.chdir(served / "notebooks")
    assert cells.workdir() == served.resolve() / "lora_colab_work"
    assert cells.unreachable_root(cells.workdir() / "lora.safetensors") is None  # a link reaches it
    monkeypatch.setattr(cells, "jupyter_roots", lambda: [])
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    monkeypatch.setattr(cells, "REMOTE_WORKSPACE", workspace)
    assert cells.workdir() == workspace / "lora_colab_work"
    monkeypatch.setattr(cells, "REMOTE_WORKSPACE", tmp_path / "none")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cells.workdir() == tmp_path / "home" / "lora_colab_work"
