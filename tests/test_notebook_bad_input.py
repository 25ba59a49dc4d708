"""The notebooks run with wrong inputs, every cell in turn as "Run all" does: the failing cell shows one
readable line (no traceback), and the later cells say which cell to fix instead of failing with a NameError.
Also: every `#@param` line parses with Colab's form syntax."""

import ast
import json
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from lora_colab.notebook.synthetic import ZImageConfig, make_zimage_pair
from lora_colab import extract
from range_server import RangeServer

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def run_with(notebook, values, workdir, monkeypatch):
    """Execute a notebook with some `#@param` values replaced; returns its cells' outputs."""
    monkeypatch.setenv("LORA_COLAB_WORKDIR", str(workdir))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    for cell in nb.cells:
        for name, value in values.items():
            cell.source = re.sub(rf'^{name} = .*?(\s+#@param)', f"{name} = {value!r}\\1", cell.source, flags=re.M)
    NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=True).execute()
    return [cell.get("outputs", []) for cell in nb.cells]


def text_of(outputs):
    parts = []
    for out in outputs:
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type == "error":
            parts.append("ERROR " + out.ename + ": " + out.evalue)
        else:
            parts.append(out.get("data", {}).get("text/html", "") or out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    base, tuned, _ = make_zimage_pair(folder, ZImageConfig(dim=64, n_layers=1, n_refiner_layers=1, n_heads=2,
                                                           cap_feat_dim=32), rank=2)
    out = folder / "a_lora.safetensors"
    extract(base, tuned, out, rank=2, progress=False)
    return out


def assert_one_line_then_pointers(outputs, failing_cell, later_cells):
    assert not any(out.output_type == "error" for cell in outputs for out in cell), \
        [text_of(cell) for cell in outputs]
    shown = text_of(outputs[failing_cell])
    assert shown.count(f"cell {failing_cell}:") == 1 and "Traceback" not in shown, shown
    for index in later_cells:  # each later cell names the cell that failed first, and itself by its job
        said = text_of(outputs[index])
        assert f"cannot run: cell {failing_cell} failed" in said and "this cell (" in said, (index, said)
        assert not re.search(r"cell \d+ cannot run", said), (index, said)


def test_extract_notebook_with_a_model_that_is_not_there(tmp_path, monkeypatch):
    outputs = run_with("extract_lora.ipynb", {"BASE": str(tmp_path / "nothing.safetensors"),
                                              "TUNED": str(tmp_path / "nothing_either.safetensors")},
                       tmp_path / "work", monkeypatch)
    assert "nothing.safetensors" in text_of(outputs[2])
    assert_one_line_then_pointers(outputs, 2, [4, 5, 6])


def test_extract_notebook_with_a_hub_repo_that_does_not_exist(tmp_path, monkeypatch):
    server = RangeServer(tmp_path, hub_repos={}).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        outputs = run_with("extract_lora.ipynb", {"BASE": "nobody/no-such-repo:model.safetensors",
                                                  "TUNED": "nobody/no-such-repo:tuned.safetensors"},
                           tmp_path / "work", monkeypatch)
    finally:
        server.stop()
    assert "no-such-repo" in text_of(outputs[2])
    assert_one_line_then_pointers(outputs, 2, [4, 5, 6])


def test_extract_notebook_with_a_lora_given_as_the_model(tmp_path, monkeypatch, lora_file):
    outputs = run_with("extract_lora.ipynb", {"BASE": str(lora_file), "TUNED": str(lora_file)}, tmp_path / "work",
                       monkeypatch)
    assert "is a LoRA file, not a model checkpoint" in text_of(outputs[2])
    assert_one_line_then_pointers(outputs, 2, [4, 5, 6])


def test_resize_notebook_with_a_checkpoint_given_as_the_lora(tmp_path, monkeypatch, lora_file):
    base = lora_file.parent / "base"
    outputs = run_with("resize_lora.ipynb", {"CHECKPOINT": str(base), "LORAS": str(base)}, tmp_path / "work",
                       monkeypatch)
    assert "no LoRA layers found" in text_of(outputs[2])
    assert_one_line_then_pointers(outputs, 2, [4, 5])


# Colab's form syntax: `NAME = literal  #@param {type:"string"|"boolean"|"number"|"integer"|"slider"|...}` or
# `#@param ["a", "b"]`; `#@title text { display-mode: "form" }` optional
PARAM = re.compile(r'^(?P<name>[A-Za-z_]\w*) = (?P<value>.+?)\s+#@param\s*(?P<spec>\{.*\}|\[.*\])\s*$')
TYPES = {"string": str, "boolean": bool, "number": (int, float), "integer": int, "raw": object}


@pytest.mark.parametrize("notebook", ["extract_lora.ipynb", "resize_lora.ipynb"])
def test_every_param_line_parses_as_colab_reads_it(notebook):
    cells = json.loads((NOTEBOOKS / notebook).read_text())["cells"]
    seen = 0
    for cell in cells:
        for line in "".join(cell["source"]).splitlines():
            if "#@param" in line:
                hit = PARAM.match(line)
                assert hit, line
                value = ast.literal_eval(hit.group("value"))
                spec = hit.group("spec")
                if spec.startswith("{"):
                    kind = re.fullmatch(r'\{\s*type\s*:\s*"(\w+)"\s*\}', spec)
                    assert kind and kind.group(1) in TYPES, line
                    assert isinstance(value, TYPES[kind.group(1)]), line
                else:
                    assert value in ast.literal_eval(spec), line
                seen += 1
            if line.startswith("#@title"):
                assert re.fullmatch(r'#@title [^{}]+(\{ display-mode: "(form|both|code)" \})?', line), line
    assert seen >= 4
