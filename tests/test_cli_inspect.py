import json
import subprocess
import sys

import torch

from lora_colab import __version__, save_file
from lora_colab.cli import main

from conftest import load_layout


def _zimage_headers_only(tmp_path, prefix=""):
    # real Z-Image key names, every dim shrunk to 2 so the file stays tiny
    tensors = {prefix + key: torch.zeros([min(d, 2) for d in shape], dtype=torch.bfloat16)
               for key, shape, _ in load_layout("zimage-single-file")}
    path = tmp_path / "z.safetensors"
    save_file(tensors, path, metadata={"modelspec.title": "tiny"})
    return path, len(tensors)


def test_inspect_prints_counts_dtypes_metadata_and_layout(tmp_path, capsys):
    path, count = _zimage_headers_only(tmp_path, prefix="model.diffusion_model.")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"tensors:   {count}" in out
    assert f"dtypes:    BF16 x{count}" in out
    assert "detected:  Z-Image (single-file, prefix 'model.diffusion_model.')" in out
    assert "modelspec.title: tiny" in out
    assert "targets:   170 default, 32 adaln" in out


def test_inspect_json_and_keys(tmp_path, capsys):
    path, count = _zimage_headers_only(tmp_path)
    assert main(["inspect", "--json", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tensors"] == count and summary["detected"] == "Z-Image (single-file)"
    assert main(["inspect", "--keys", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "layers.0.attention.qkv.weight\tBF16\t[2, 2]" in lines


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00[1,2]")
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lora-colab: error: {bad}: header is a JSON list, not an object"


def test_module_entry_point_version_and_help():
    out = subprocess.run([sys.executable, "-m", "lora_colab", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"lora-colab {__version__}"
    helptext = subprocess.run([sys.executable, "-m", "lora_colab", "--help"], capture_output=True, text=True).stdout
    assert "inspect" in helptext and "usage: lora-colab" in helptext
