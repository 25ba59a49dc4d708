"""Write faults a Colab or a laptop throws mid-run (a full disk or quota, an I/O error, a dropped or read-only
mount; ENOSPC on a real small file system; a mount that lies about what it wrote): the run stops with one line
saying what happened and that the same command resumes, keeps its journal as far as it was written, leaves no
partial output; the rerun resumes from the last good record and writes the file an uninterrupted run writes."""

import errno
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

import lora_colab.lora.writer as writer_module
from lora_colab.errors import WriteFault
from lora_colab.extraction.extractor import extract
from lora_colab.lora.journal import journal_path
from lora_colab.notebook.synthetic import ZImageConfig, make_zimage_pair
from lora_colab.resizing.resizer import resize

Z = ZImageConfig(dim=64, n_layers=2, n_refiner_layers=1, n_heads=4, cap_feat_dim=32)
OPTIONS = dict(rank=8, clamp_quantile=None, device="cpu", progress=False)
ERRNOS = {"ENOSPC": "the disk is full", "EDQUOT": "the disk quota is used up", "EIO": "an I/O error",
          "ENOTCONN": "the mount is gone", "EROFS": "the file system is read-only"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base, tuned, _ = make_zimage_pair(tmp_path_factory.mktemp("pair"), Z, rank=6, dtype=torch.float32)
    return base, tuned


@pytest.fixture(scope="module")
def clean(pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "lora.safetensors"
    report = extract(*pair, out, **OPTIONS)
    return report, load_file(str(out))


class FailingDisk:
    """os.pwrite as the writers see it, failing with `code` at `point`: "first" (the first journal record),
    "middle" (the record half-way through the layers), "assembly" (the first write of the output itself)."""

    def __init__(self, code, point, records):
        self.code, self.point, self.records = code, point, records
        self.seen = 0
        self.real = os.pwrite

    def __call__(self, fd, data, offset):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if bytes(data[:4]) == b"LCJR":
            self.seen += 1
            if (self.point, self.seen) in (("first", 1), ("middle", self.records // 2 + 1)):
                raise OSError(self.code, os.strerror(self.code))
        if self.point == "assembly" and target.endswith(".tmp") and ".parts." not in target:
            raise OSError(self.code, os.strerror(self.code))
        return self.real(fd, data, offset)


def assert_same_file(path, clean, pair):
    """The resumed file is the uninterrupted run's, tensor for tensor, and holds the planted change."""
    from test_resume import assert_reproduces_the_planted_change
    tensors = load_file(str(path))
    assert tensors.keys() == clean[1].keys() and all(torch.equal(tensors[k], clean[1][k]) for k in tensors)
    assert_reproduces_the_planted_change(pair, path)


@pytest.mark.parametrize("name,point", [(n, "middle") for n in ERRNOS] + [("ENOSPC", "first"), ("ENOSPC", "assembly")])
def test_a_write_fault_keeps_the_journal_and_the_same_command_resumes_to_the_same_file(pair, clean, tmp_path,
                                                                                         monkeypatch, name, point):
    out = tmp_path / "lora.safetensors"
    records = len(clean[0].layers)
    disk = FailingDisk(getattr(errno, name), point, records)
    monkeypatch.setattr(writer_module.os, "pwrite", disk)
    with pytest.raises(WriteFault) as caught:
        extract(*pair, out, **OPTIONS)
    message = str(caught.value)
    done = {"first": 0, "middle": records // 2, "assembly": records}[point]
    assert ERRNOS[name] in message and "\n" not in message
    if done:
        assert f"journal keeps {done} finished layers" in message and "run the same command again" in message
    assert not out.exists() and not list(tmp_path.glob("*.tmp")) and journal_path(out).exists() == bool(done)
    monkeypatch.setattr(writer_module.os, "pwrite", disk.real)
    computed = []
    report = extract(*pair, out, on_layer=computed.append, **OPTIONS)
    assert report.resumed == done and len(computed) == records - done
    assert_same_file(out, clean, pair)
    assert not journal_path(out).exists()


def test_a_mount_that_lies_about_a_write_is_caught_by_the_checksum(pair, clean, tmp_path, monkeypatch):
    """A record whose last bytes never reached the disk though the write said they did: the rerun finds it
    by its CRC and resumes from the record before."""
    out = tmp_path / "lora.safetensors"
    real, state = os.pwrite, {"records": 0, "lie": False}

    def pwrite(fd, data, offset):
        if bytes(data[:4]) == b"LCJR":
            state["records"] += 1
            state["lie"] = state["records"] == 5
        elif state["lie"] and len(data) > 64:  # the record's tensor bytes: claim all, write a few short
            state["lie"] = False
            real(fd, bytes(len(data)), offset)
            return len(data)
        return real(fd, data, offset)

    def stop(layer, seen=[]):
        seen.append(layer)
        if len(seen) == 6:
            raise KeyboardInterrupt
    monkeypatch.setattr(writer_module.os, "pwrite", pwrite)
    with pytest.raises(KeyboardInterrupt):
        extract(*pair, out, on_layer=stop, **OPTIONS)
    monkeypatch.setattr(writer_module.os, "pwrite", real)
    report = extract(*pair, out, **OPTIONS)
    assert report.resumed == 4 and any("checksum does not match" in w for w in report.warnings)
    assert_same_file(out, clean, pair)


def test_a_disk_too_small_is_refused_before_any_work_with_both_figures(pair, tmp_path, monkeypatch):
    read = []
    monkeypatch.setattr(writer_module, "free_bytes", lambda path: 20_000)
    with pytest.raises(WriteFault, match=r"needs about .* free \(journal .* \+ output while it is assembled .*\) "
                                         r"but its disk has 19\.53 KiB"):
        extract(*pair, tmp_path / "lora.safetensors", on_layer=read.append, **OPTIONS)
    assert not read and not list(tmp_path.iterdir())


def small_disk(path, size):
    """A tmpfs of `size` at `path` (root, where the kernel allows it), else skip."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode:
        pytest.skip(f"no tmpfs here: {done.stderr.decode().strip()[:80]}")
    return path


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def make(size):
        mounted.append(small_disk(tmp_path / f"disk{len(mounted)}", size))
        return mounted[-1]
    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_real_full_disk_mid_run_keeps_the_journal_and_resumes(pair, clean, tmp_path, tmpfs):
    """On a 2 MiB tmpfs: the run fits when it starts, then something else fills the disk after the third
    layer; the run stops saying the disk is full, keeps its journal, and resumes once the filler is gone."""
    disk = tmpfs("2m")
    out = disk / "lora.safetensors"
    filler = disk / "filler"

    def fill(layer, seen=[]):
        seen.append(layer)
        if len(seen) == 3:
            with open(filler, "wb") as f:
                try:
                    while True:
                        f.write(bytes(1 << 16))
                except OSError:
                    pass
    with pytest.raises(WriteFault, match="the disk is full.*journal keeps 2 finished layers"):
        extract(*pair, out, on_layer=fill, **OPTIONS)
    assert not out.exists() and journal_path(out).exists()
    filler.unlink()
    report = extract(*pair, out, **OPTIONS)
    assert report.resumed == 2
    assert_same_file(out, clean, pair)


def test_a_real_small_disk_is_refused_up_front(pair, tmp_path, tmpfs):
    disk = tmpfs("64k")
    with pytest.raises(WriteFault, match=r"needs about .* but its disk has"):
        extract(*pair, disk / "lora.safetensors", **OPTIONS)
    assert os.listdir(disk) == []


@pytest.fixture(scope="module")
def lora(pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "lora.safetensors"
    extract(*pair, out, **OPTIONS)
    return out


@pytest.mark.parametrize("point", ["middle", "assembly"])
def test_a_resize_stopped_by_a_write_fault_resumes_to_the_same_files(pair, lora, tmp_path, monkeypatch, point):
    recipes = "spn_ckpt=1,thr=-1.5:rank=2"
    want = [load_file(r.output) for r in resize(pair[0], [lora], tmp_path / "clean", recipes, progress=False)]
    n_layers = len(load_file(str(lora))) // 3
    disk = FailingDisk(errno.ENOSPC, point, 2 * n_layers)  # a record per layer and per base reference
    monkeypatch.setattr(writer_module.os, "pwrite", disk)
    with pytest.raises(WriteFault, match="the disk is full.*run the same command again"):
        resize(pair[0], [lora], tmp_path / "out", recipes, progress=False)
    assert list((tmp_path / "out").glob("*.resize.journal")) and not list((tmp_path / "out").glob("*.safetensors"))
    monkeypatch.setattr(writer_module.os, "pwrite", disk.real)
    reports = resize(pair[0], [lora], tmp_path / "out", recipes, progress=False)
    assert any("resuming:" in w for w in reports[0].warnings)
    for report, tensors in zip(reports, want):
        got = load_file(report.output)
        assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in got)
    assert not list((tmp_path / "out").glob("*.journal"))


def test_a_resize_that_cannot_fit_is_refused_before_decomposing(pair, lora, tmp_path, monkeypatch):
    monkeypatch.setattr(writer_module, "free_bytes", lambda path: 10_000)
    with pytest.raises(WriteFault, match=r"needs about .* \(journal .* \+ outputs .* \+ the largest again while it "
                                         r"is assembled .*\) but its disk has 9\.77 KiB"):
        resize(None, [lora], tmp_path / "out", "rank=2:sv_fro=0.9", progress=False)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_the_notebook_run_cell_says_the_disk_is_too_small_before_its_progress_bar(pair, tmp_path, monkeypatch, capsys):
    from lora_colab.configs import ExtractConfig
    from lora_colab.notebook import cells as nb
    monkeypatch.setattr(writer_module, "free_bytes", lambda path: 20_000)
    result = nb.run_extract(*pair, ExtractConfig(rank=8, device="cpu"), folder=str(tmp_path / "out"))
    out = capsys.readouterr().out
    assert not result and "needs about" in out and "but its disk has 19.53 KiB" in out
    assert "extract:" not in out  # no progress bar was started
