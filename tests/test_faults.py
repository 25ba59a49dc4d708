"""Faults and interruptions lose nothing: no partial output, no temp files, threads and files closed."""

import errno
import os
import threading

import pytest
import torch

import lora_colab.lora.writer as writer_module
from lora_colab import LoraColabError, CheckpointError
from lora_colab.cli import main
from lora_colab.extraction.extractor import extract
from lora_colab.notebook.synthetic import ZImageConfig, make_zimage_pair

Z = ZImageConfig(dim=64, n_layers=2, n_refiner_layers=1, n_heads=4, cap_feat_dim=32)


@pytest.fixture
def pair(tmp_path):
    base, tuned, _ = make_zimage_pair(tmp_path / "in", Z, rank=4)
    return base, tuned


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.suffix == ".safetensors")


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_disk_full_is_a_clean_error_with_no_partial_file(pair, tmp_path, monkeypatch):
    real = os.pwrite
    written = {"n": 0}

    def pwrite(fd, data, offset):
        written["n"] += len(data)
        if written["n"] > 20_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(writer_module.os, "pwrite", pwrite)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CheckpointError, match=r"lora\.safetensors.*write failed: the disk is full"):
        extract(*pair, out / "lora.safetensors", rank=8, progress=False)
    assert leftovers(out) == []


def test_output_folder_that_cannot_exist_is_a_clean_error(pair, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(LoraColabError, match=r"a_file/sub/lora\.safetensors: .*a_file is a file, not a folder"):
        extract(*pair, blocker / "sub" / "lora.safetensors", progress=False)


def test_interrupt_mid_run_keeps_nothing_and_closes_everything(pair, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "lora.safetensors").write_bytes(b"an older result")
    fds = open_fds()
    seen = []

    def interrupt(layer):
        seen.append(layer.name)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(*pair, out / "lora.safetensors", rank=8, progress=False, on_layer=interrupt)
    assert (out / "lora.safetensors").read_bytes() == b"an older result"  # the previous file is untouched
    assert leftovers(out) == ["lora.safetensors"]
    assert not [t for t in threading.enumerate() if t.name.startswith("lora-colab-read")]
    assert open_fds() == fds


def test_cli_interrupt_exits_130_with_a_message(monkeypatch, capsys, pair, tmp_path):
    import lora_colab.extraction.extractor as extract_module

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(extract_module, "extract", boom)
    assert main(["extract", str(pair[0]), str(pair[1]), "-o", str(tmp_path / "x.safetensors")]) == 130
    assert "interrupted; no partial output was kept" in capsys.readouterr().err


def test_mismatched_architectures_and_missing_files_are_one_line_errors(pair, tmp_path, capsys):
    other = tmp_path / "flux.safetensors"
    from safetensors.torch import save_file
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}, str(other))
    assert main(["extract", str(pair[0]), str(other), "-o", str(tmp_path / "x.safetensors"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lora-colab: error: ") and "flux.safetensors: is Flux.1 (bfl), not Z-Image" in err
    assert "\n" not in err
    assert main(["extract", str(tmp_path / "nope"), str(other), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
