"""Resumable extraction: a run killed (kill -9, Ctrl-C) at any point and started again with the same command
continues from its journal, reads none of the finished layers again, and writes the file an uninterrupted
run writes, which reproduces the planted change."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_colab.arch.canonical import open_canonical
from lora_colab.cli import main
from lora_colab.errors import Interrupted
from lora_colab.extraction.extractor import extract
from lora_colab.resizing.resizer import resize
from lora_colab.lora.journal import journal_path
from lora_colab.notebook.synthetic import ZImageConfig, make_zimage_pair

from test_extract import lora_products, true_differences

Z = ZImageConfig(dim=128, n_layers=2, n_refiner_layers=1, n_heads=4, cap_feat_dim=32)
OPTIONS = dict(rank=8, clamp_quantile=None, device="cpu")

_KILLER = textwrap.dedent("""
    import os, signal, sys
    from lora_colab.lora import writer
    from lora_colab.extraction.extractor import extract
    base, tuned, out, point, recipe = sys.argv[1:6]
    seen = []
    def on_layer(layer):
        seen.append(layer)
        if point != "write" and len(seen) == int(point):
            os.kill(os.getpid(), signal.SIGKILL)
    if point == "write":  # the output is complete in its temporary file, not yet renamed into place
        def close(self):
            os.fsync(self._file.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        writer.SafetensorsWriter.close = close
    extract(base, tuned, out, rank=8, clamp_quantile=None, device="cpu", progress=False, on_layer=on_layer,
            recipe=recipe or None)
""")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    base, tuned, _ = make_zimage_pair(folder, Z, rank=6, dtype=torch.float32)
    return base, tuned


@pytest.fixture(scope="module")
def clean(pair, tmp_path_factory):
    """An uninterrupted run: (report, its file's tensors)."""
    out = tmp_path_factory.mktemp("clean") / "lora.safetensors"
    report = extract(*pair, out, progress=False, **OPTIONS)
    return report, load_file(str(out))


def kill_at(pair, out, point, recipe=""):
    """Run the extraction in a child process that kills itself (-9) at `point`: after that many layers,
    or "write" (the output written to its temporary file, not renamed)."""
    done = subprocess.run([sys.executable, "-c", _KILLER, *map(str, pair), str(out), str(point), recipe],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert not out.exists()
    assert journal_path(out).exists()


def assert_reproduces_the_planted_change(pair, path):
    architecture, targets, deltas = true_differences(*pair)
    products = lora_products(path, architecture, targets)
    assert set(products) == set(deltas)
    for key, delta in deltas.items():  # planted rank 6 < rank 8: exact up to the bf16 output
        assert float((delta - products[key]).norm() / delta.norm()) < 1e-2, key


def rewrite_weights(path, change):
    """Change every 2-D float32 weight of a safetensors file in place, its header and size kept."""
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    for name, entry in header.items():
        if name != "__metadata__" and entry["dtype"] == "F32" and len(entry["shape"]) == 2:
            a, b = (8 + n + x for x in entry["data_offsets"])
            w = torch.frombuffer(bytearray(data[a:b]), dtype=torch.float32).reshape(entry["shape"])
            data[a:b] = change(w).contiguous().numpy().tobytes()
    path.write_bytes(bytes(data))


def layer_bytes(pair, keys):
    """Tensor bytes of these canonical keys in both files (what reading those layers costs)."""
    total = 0
    for path in pair:
        with open_canonical(path) as view:
            total += sum(view.nbytes(key) for key in keys)
    return total


@pytest.mark.parametrize("point", [1, 9, 20, "write"])
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_file(pair, clean, tmp_path, point):
    clean_report, clean_tensors = clean
    out = tmp_path / "lora.safetensors"
    kill_at(pair, out, point)
    computed = []
    report = extract(*pair, out, progress=False, on_layer=computed.append, **OPTIONS)
    total = len(clean_report.layers)
    finished = total if point == "write" else point - 1  # the layer being computed when killed is not kept
    assert report.resumed == finished and len(computed) == total - finished
    assert f"resumed: {finished} of {total} layers" in str(report) if finished else "resumed" not in str(report)
    tensors = load_file(str(out))
    assert tensors.keys() == clean_tensors.keys()
    assert all(torch.equal(tensors[k], clean_tensors[k]) for k in tensors)
    assert [layer.rel_error for layer in report.layers] == [layer.rel_error for layer in clean_report.layers]
    assert_reproduces_the_planted_change(pair, out)
    # the finished layers were not read again: the rerun read exactly the clean run's bytes less theirs
    finished_keys = {layer.name + ".weight" for layer in clean_report.layers[:finished]}
    assert report.bytes_read == clean_report.bytes_read - layer_bytes(pair, finished_keys)
    assert not journal_path(out).exists() and not list(tmp_path.glob("*.tmp"))


def test_a_damaged_journal_is_used_up_to_the_damaged_record(pair, clean, tmp_path):
    out = tmp_path / "lora.safetensors"
    kill_at(pair, out, 12)
    journal = journal_path(out)
    with open(journal, "r+b") as f:  # cut the last record short, as a write cut off by a crash leaves it
        f.truncate(journal.stat().st_size - 100)
    report = extract(*pair, out, progress=False, **OPTIONS)
    assert report.resumed == 10
    assert any("damaged after 10 layers (a record cut short)" in w for w in report.warnings)
    tensors = load_file(str(out))
    assert all(torch.equal(tensors[k], clean[1][k]) for k in tensors) and tensors.keys() == clean[1].keys()
    assert_reproduces_the_planted_change(pair, out)


def test_a_flipped_byte_in_a_record_is_detected(pair, clean, tmp_path):
    out = tmp_path / "lora.safetensors"
    kill_at(pair, out, 6)
    journal = journal_path(out)
    data = bytearray(journal.read_bytes())
    data[-10] ^= 0xFF  # inside the last record's tensor bytes
    journal.write_bytes(bytes(data))
    report = extract(*pair, out, progress=False, **OPTIONS)
    assert report.resumed == 4
    assert any("checksum does not match" in w for w in report.warnings)
    tensors = load_file(str(out))
    assert all(torch.equal(tensors[k], clean[1][k]) for k in tensors)


def test_other_options_or_a_changed_input_start_over_saying_why(pair, tmp_path, capsys):
    out = tmp_path / "lora.safetensors"
    kill_at(pair, out, 9)
    report = extract(*pair, out, progress=True, **{**OPTIONS, "rank": 4})
    assert report.resumed == 0
    assert "starting over: option rank changed (8 -> 4)" in capsys.readouterr().err
    assert {v.shape[0] for k, v in load_file(str(out)).items() if k.endswith("lora_down.weight")} == {4}

    base, tuned = pair
    changed = tmp_path / "tuned_epoch2.safetensors"
    out = tmp_path / "epoch.safetensors"
    kill_at((base, tuned), out, 9)
    shutil.copy(tuned, changed)
    rewrite_weights(changed, lambda w: w + 0.01 * w.roll(1, 0))  # another epoch: same names, sizes, header
    assert changed.stat().st_size == tuned.stat().st_size
    report = extract(base, changed, out, progress=False, **OPTIONS)
    assert report.resumed == 0
    assert any("starting over: the fine-tuned model changed (its content differs" in w for w in report.warnings)
    assert_reproduces_the_planted_change((base, changed), out)


def test_a_copy_of_the_inputs_elsewhere_resumes(pair, clean, tmp_path):
    """A new runtime: the models downloaded again (new paths, new mtimes), the journal beside the output."""
    out = tmp_path / "lora.safetensors"
    kill_at(pair, out, 9)
    copies = []
    for path in pair:
        copies.append(tmp_path / "again" / path.name)
        copies[-1].parent.mkdir(exist_ok=True)
        (shutil.copytree if path.is_dir() else shutil.copy)(path, copies[-1])
    report = extract(*copies, out, progress=False, **OPTIONS)
    assert report.resumed == 8
    tensors = load_file(str(out))
    assert all(torch.equal(tensors[k], clean[1][k]) for k in tensors)


def test_restart_and_ctrl_c_from_the_command_line(pair, clean, tmp_path, capsys):
    out = tmp_path / "lora.safetensors"
    kill_at(pair, out, 9)
    argv = ["extract", *map(str, pair), "-o", str(out), "--rank", "8", "--clamp-quantile", "1", "--device", "cpu"]
    assert main(argv + ["--restart", "-q"]) == 0
    output = capsys.readouterr()
    assert "resumed" not in output.out and "set aside (--restart)" in output.out
    assert all(torch.equal(v, clean[1][k]) for k, v in load_file(str(out)).items())

    calls = []

    def interrupt(layer):
        calls.append(layer)
        if len(calls) == 5:
            raise KeyboardInterrupt
    out2 = tmp_path / "second.safetensors"
    with pytest.raises(Interrupted, match="keeps 4 finished layers of 20: the same command resumes"):
        extract(*pair, out2, progress=False, on_layer=interrupt, **OPTIONS)
    assert journal_path(out2).exists() and not out2.exists()
    report = extract(*pair, out2, progress=False, **OPTIONS)
    assert report.resumed == 4
    assert all(torch.equal(v, clean[1][k]) for k, v in load_file(str(out2)).items())


def test_a_recipe_run_resumes_with_its_collected_directions(pair, tmp_path):
    recipe = "spn_ckpt=1,thr=-3"
    whole = tmp_path / "whole.safetensors"
    clean_report = extract(*pair, whole, progress=False, recipe=recipe, **OPTIONS)
    out = tmp_path / "lora.safetensors"
    kill_at(pair, out, 11, recipe)
    report = extract(*pair, out, progress=False, recipe=recipe, **OPTIONS)
    assert report.resumed == 10
    assert report.directions == clean_report.directions and report.threshold == clean_report.threshold
    want, got = load_file(str(whole)), load_file(str(out))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert_reproduces_the_planted_change(pair, out)


def test_a_second_run_on_a_locked_journal_keeps_none_and_a_finished_run_leaves_none(pair, tmp_path):
    from lora_colab.lora.journal import Journal
    out = tmp_path / "lora.safetensors"
    holder = Journal(out, {"run": "other"})
    try:
        report = extract(*pair, out, progress=False, **OPTIONS)
        assert any("cannot be resumed" in w for w in report.warnings)
        assert_reproduces_the_planted_change(pair, out)
    finally:
        holder.abort()
    assert journal_path(out).exists()  # the holder's, untouched
    os.unlink(journal_path(out))
    extract(*pair, out, progress=False, resume=False, **OPTIONS)
    assert not journal_path(out).exists()


def test_the_notebook_run_cell_resumes_and_says_so(pair, tmp_path, capsys, monkeypatch):
    """Cell 4 stopped mid-run says how to go on; run again, it says "resuming from layer N of M" and
    writes what an uninterrupted run writes, in the results folder it was given."""
    from lora_colab.notebook import cells as notebook
    from lora_colab.configs import ExtractConfig
    from lora_colab.notebook.monitor import LiveMonitor
    config = ExtractConfig(rank=8, clamp_quantile=1.0, device="cpu")
    seen = []

    def stop_at_seven(self, layer):
        seen.append(layer)
        if len(seen) == 7:
            raise KeyboardInterrupt
    monkeypatch.setattr(LiveMonitor, "update", stop_at_seven)
    folder = tmp_path / "on_drive"
    stopped = notebook.run_extract(*pair, config, folder=str(folder))
    assert not stopped and "keeps 6 finished layers of 20: run this cell again to resume" in capsys.readouterr().out
    monkeypatch.setattr(LiveMonitor, "update", lambda self, layer: None)
    report = notebook.run_extract(*pair, config, folder=str(folder))
    assert "resuming from layer 7 of 20: 6 finished layers taken from" in capsys.readouterr().out
    assert report.resumed == 6 and report.output == str(folder / config.output_name)
    extract(*pair, tmp_path / "whole.safetensors", progress=False, **config.extract_kwargs())
    want, got = load_file(str(tmp_path / "whole.safetensors")), load_file(report.output)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert_reproduces_the_planted_change(pair, report.output)


# --- resize ----------------------------------------------------------------------------------------

RECIPES = "rank=2:spn_ckpt=1,thr=-0.6:subspace=1,thr=0.5"

_RESIZE_KILLER = textwrap.dedent("""
    import os, signal, sys
    from lora_colab.lora import writer
    from lora_colab.resizing.resizer import resize
    base, lora, folder, point = sys.argv[1:5]
    calls = []
    def on_layer():
        calls.append(1)
        if not point.startswith("write") and len(calls) == int(point):
            os.kill(os.getpid(), signal.SIGKILL)
    if point == "write2":  # the first recipe's file is in place, the second one's is being written
        close = writer.SafetensorsWriter.close
        def second_close(self):
            calls.append("w")
            if calls.count("w") == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            close(self)
        writer.SafetensorsWriter.close = second_close
    resize(base, [lora], folder, RECIPES, device="cpu", progress=False, on_layer=on_layer)
""").replace("RECIPES", repr(RECIPES))


@pytest.fixture(scope="module")
def resize_inputs(tmp_path_factory):
    """A base and a kohya LoRA over every Z-Image layer with known spectra, and {key: ΔW}."""
    from test_resize import Z as RZ, zimage_base, zimage_lora
    from lora_colab import arch
    from lora_colab.notebook.synthetic import zimage_specs
    folder = tmp_path_factory.mktemp("resize")
    base = zimage_base(folder)
    keys = [t.key for t in arch.get("zimage").targets(dict(zimage_specs(RZ)))]
    spectra = {key: [x / (1 + i / 4) for x in (2.0, 0.9, 0.3, 0.05)] for i, key in enumerate(keys)}
    lora, deltas = zimage_lora(folder, spectra)
    return base, lora, deltas


def counted_base_reads(monkeypatch):
    from lora_colab.resizing.base_refs import BaseReferences
    reads = []
    weight = BaseReferences.weight
    monkeypatch.setattr(BaseReferences, "weight", lambda self, key, rows: reads.append(key) or weight(self, key, rows))
    return reads


@pytest.mark.parametrize("point", [5, 25, "write2"])
def test_a_killed_resize_resumes_reading_no_base_layer_twice(resize_inputs, tmp_path, monkeypatch, point):
    base, lora, deltas = resize_inputs
    n = len(deltas)
    monkeypatch.setenv("LORA_COLAB_CACHE", str(tmp_path / "cache_clean"))
    reads = counted_base_reads(monkeypatch)
    clean = resize(base, [lora], tmp_path / "clean", RECIPES, device="cpu", progress=False)
    clean_reads = len(reads)
    assert clean_reads == 2 * n  # each layer's base weight: once for its norms, once for its subspace terms

    monkeypatch.setenv("LORA_COLAB_CACHE", str(tmp_path / "cache"))  # a new runtime: no norm cache
    folder = tmp_path / "out"
    env = {**os.environ, "LORA_COLAB_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", _RESIZE_KILLER, str(base), str(lora), str(folder), str(point)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert (folder / "lora.resize.journal").exists()
    reads.clear()
    reports = resize(base, [lora], folder, RECIPES, device="cpu", progress=False)
    referenced = 0 if point == 5 else n if point == "write2" else point - n  # base references journaled
    assert len(reads) == 2 * (n - referenced)
    decomposed = point - 1 if point != "write2" and point <= n else n  # on_layer comes before each decomposition
    assert f"resuming: {decomposed} decomposed layers and {referenced} base references taken from " \
           f"lora.resize.journal" in reports[0].warnings
    for got, want in zip(reports, clean):
        a, b = load_file(got.output), load_file(want.output)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the truth: rank=2 keeps each layer's best rank-2 approximation of its ΔW
    t = load_file(reports[0].output)
    for key, delta in deltas.items():
        name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
        up, down = t[name + ".lora_up.weight"].double(), t[name + ".lora_down.weight"].double()
        product = t[name + ".alpha"].item() / down.shape[0] * up @ down
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        torch.testing.assert_close(product, (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-4, atol=1e-5)
    assert not (folder / "lora.resize.journal").exists()


def test_a_resize_with_another_lora_starts_over(resize_inputs, tmp_path):
    base, lora, deltas = resize_inputs
    folder = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", _RESIZE_KILLER, str(base), str(lora), str(folder), "25"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    changed = tmp_path / "lora.safetensors"  # same name: a retrained LoRA
    shutil.copy(lora, changed)
    rewrite_weights(changed, lambda w: 2 * w)
    report = resize(base, [changed], folder, "rank=2", device="cpu", progress=False)[0]
    assert any("starting over: the LoRA changed (its content differs" in line for line in report.warnings)
    assert not any(line.startswith("resuming") for line in report.warnings)


def test_the_notebook_resize_cell_resumes_and_says_so(resize_inputs, tmp_path, capsys, monkeypatch):
    from lora_colab.notebook import cells as notebook
    from lora_colab.configs import ResizeConfig
    from lora_colab.notebook.monitor import LiveMonitor
    base, lora, deltas = resize_inputs
    monkeypatch.setenv("LORA_COLAB_CACHE", str(tmp_path / "cache"))
    config = ResizeConfig(recipes="spn_ckpt=1,thr=-0.6", device="cpu")
    calls = []

    def stop(self, layer=None):
        calls.append(1)
        if len(calls) == len(deltas) + 6:  # every layer decomposed, 6 base references read
            raise KeyboardInterrupt
    monkeypatch.setattr(LiveMonitor, "update", stop)
    stopped = notebook.run_resize(str(base), [str(lora)], config, folder=str(tmp_path / "out"), plot=False)
    assert not stopped and f"keeps {len(deltas) + 6} finished steps" in capsys.readouterr().out
    monkeypatch.setattr(LiveMonitor, "update", lambda self, layer=None: None)
    reads = counted_base_reads(monkeypatch)
    reports = notebook.run_resize(str(base), [str(lora)], config, folder=str(tmp_path / "out"), plot=False)
    assert f"resuming: {len(deltas)} decomposed layers and 6 base references taken" in capsys.readouterr().out
    assert len(reads) == len(deltas) - 6 and reports[0].output


_RUNTIME = textwrap.dedent("""
    import os, signal, sys
    from lora_colab.io import downloads
    from lora_colab.notebook import cells as nb
    from lora_colab.notebook.monitor import LiveMonitor
    from lora_colab.configs import ExtractConfig
    drive, base, tuned = sys.argv[1:4]
    downloads.DRIVE_ROOT = drive   # Drive mounted at a folder standing in for /content/drive
    seen = []
    def lost_runtime(self, layer):  # the runtime is recycled mid-run: no Ctrl-C, no cleanup
        seen.append(layer)
        if len(seen) == 9:
            os.kill(os.getpid(), signal.SIGKILL)
    LiveMonitor.update = lost_runtime
    nb.run_extract(base, tuned, ExtractConfig(rank=8, clamp_quantile=1.0, device="cpu"),
                   folder="drive:MyDrive/lora_colab")
""")


def test_a_run_on_drive_resumes_in_a_new_runtime_after_remounting(pair, tmp_path, capsys, monkeypatch):
    """As the notebook says: with RESULTS_FOLDER on Drive, a runtime lost mid-run (killed, its local disk
    gone) is resumed by running the cells again in a new runtime: the models fetched again to new local
    paths, Drive mounted again, the run cell says "resuming from layer 9" and writes the uninterrupted file."""
    from lora_colab.configs import ExtractConfig
    from lora_colab.io import downloads
    from lora_colab.notebook import cells as nb
    drive = tmp_path / "drive"
    (drive / "MyDrive").mkdir(parents=True)
    first = tmp_path / "runtime1"
    first.mkdir()
    inputs = [shutil.copytree(p, first / p.name) if p.is_dir() else shutil.copy(p, first / p.name) for p in pair]
    done = subprocess.run([sys.executable, "-c", _RUNTIME, str(drive), *map(str, inputs)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    shutil.rmtree(first)  # the old runtime's local disk is gone with it
    assert list((drive / "MyDrive" / "lora_colab").glob("*.journal"))
    second = tmp_path / "runtime2"
    second.mkdir()
    again = [shutil.copytree(p, second / p.name) if p.is_dir() else shutil.copy(p, second / p.name) for p in pair]
    monkeypatch.setattr(downloads, "DRIVE_ROOT", str(drive))  # mounted again
    config = ExtractConfig(rank=8, clamp_quantile=1.0, device="cpu")
    report = nb.run_extract(*map(Path, again), config, folder="drive:MyDrive/lora_colab")
    assert "resuming from layer 9 of 20: 8 finished layers taken from" in capsys.readouterr().out
    extract(*pair, tmp_path / "whole.safetensors", progress=False, **config.extract_kwargs())
    want, got = load_file(str(tmp_path / "whole.safetensors")), load_file(report.output)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
