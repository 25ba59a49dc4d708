"""What a newcomer meets on the command line: bad options, wrong inputs, notices, and small frictions."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lora_colab import LoraColabError, extract, open_checkpoint, resize
from lora_colab.cli import main
from lora_colab.notebook.synthetic import ZImageConfig, make_zimage_pair

Z = ZImageConfig(dim=64, n_layers=2, n_refiner_layers=1, n_heads=4, cap_feat_dim=32)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    base, tuned, _ = make_zimage_pair(folder, Z, rank=4)
    lora = folder / "lora.safetensors"
    extract(base, tuned, lora, rank=4, progress=False)
    return base, tuned, lora


def one_error_line(capsys):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.mark.parametrize("options,says", [
    (["--scale", "-1"], "--scale: '-1': must be a finite number > 0"),
    (["--scale", "0"], "--scale: '0': must be a finite number > 0"),
    (["--alpha", "inf"], "--alpha: 'inf': must be a finite number > 0"),
    (["--device", "tpu"], "--device: 'tpu': use cpu, cuda (or cuda:N) or auto"),
    (["--device", "mps"], "--device: 'mps': use cpu, cuda (or cuda:N) or auto"),
    (["--dtype", "fp8"], "--dtype: 'fp8': use bf16, fp16"),
    (["--rank", "0"], "--rank: '0': must be a positive integer"),
    (["--rank", "x"], "--rank: 'x' is not a number"),
    (["--clamp-quantile", "2"], "--clamp-quantile: '2': must be in [0.5, 1]"),
    (["--alpha", "-3"], "--alpha: '-3': must be a finite number > 0"),
    (["--energy", "1.5"], "--energy: '1.5': must be in (0, 1]"),
    (["--include", "foo"], "--include foo: not an optional target group of Z-Image; its groups: adaln"),
    (["--include", "modulation"], "--include modulation: not an optional target group of Z-Image"),
    (["--format", "pef"], "argument --format: invalid choice"),
])
def test_bad_options_are_one_line_and_exit_2(demo, tmp_path, capsys, options, says):
    base, tuned, _ = demo
    out = tmp_path / "out.safetensors"
    assert main(["extract", str(base), str(tuned), "-o", str(out), "-q"] + options) == 2
    line = one_error_line(capsys)
    assert says in line and line.startswith("lora-colab: error: ")  # one prefix for every error
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("kwargs,says", [
    (dict(scale=-1), "scale must be a finite number > 0"), (dict(scale=0), "scale must be a finite number > 0"),
    (dict(alpha=float("inf")), "alpha must be a finite number > 0, got inf"),
    (dict(device="tpu"), "unknown device 'tpu': use cpu, cuda"), (dict(device="mps"), "device 'mps' is not supported"),
    (dict(device="meta"), "device 'meta' is not supported"),
    (dict(dtype="fp8"), "unknown dtype 'fp8'"), (dict(rank=2.5), "rank must be a positive integer"),
    (dict(groups=["modulation"]), "not an optional target group of Z-Image"),
])
def test_bad_options_in_the_api_are_errors_not_tracebacks(demo, tmp_path, kwargs, says):
    base, tuned, _ = demo
    with pytest.raises(LoraColabError, match=says):
        extract(base, tuned, tmp_path / "x.safetensors", progress=False, **kwargs)


def test_options_that_cannot_apply_get_a_one_line_notice(demo, tmp_path):
    base, tuned, _ = demo
    report = extract(base, tuned, tmp_path / "a.safetensors", rank=100000, conv_rank=8, progress=False)
    notes = "\n".join(report.warnings)
    assert "conv_rank 8 ignored: this Z-Image model has no k×k convolutions" in notes
    assert "rank 100000 is above every layer's full rank (at most 64)" in notes
    assert "warning: conv_rank 8 ignored" in str(report)


def test_output_folder_is_refused_before_reading_anything(demo, tmp_path, capsys, monkeypatch):
    import lora_colab.extraction.run as run
    base, tuned, _ = demo
    monkeypatch.setattr(run, "open_canonical", lambda *a, **k: pytest.fail("read an input first"))
    assert main(["extract", str(base), str(tuned), "-o", str(tmp_path), "-q"]) == 2
    assert one_error_line(capsys).endswith(f"{tmp_path}: is a folder; the output is a file, e.g. "
                                           f"{tmp_path / 'lora.safetensors'}")


def test_resize_output_must_be_a_folder_and_dtype_spellings_match_extract(demo, tmp_path, capsys):
    base, tuned, lora = demo
    a_file = tmp_path / "taken.safetensors"
    a_file.write_bytes(b"x")
    assert main(["resize", str(base), str(lora), "-o", str(a_file), "-r", "rank=2"]) == 2
    assert "is a file; the resize output is a folder" in one_error_line(capsys)
    for spelling, dtype in (("fp16", torch.float16), ("16", torch.float16), ("bf16", torch.bfloat16),
                            ("fp32", torch.float32), ("32", torch.float32)):
        assert main(["resize", str(base), str(lora), "-o", str(tmp_path / spelling), "-r", "rank=2",
                     "-t", spelling]) == 0
        out = load_file(str(tmp_path / spelling / "lora_rank2.safetensors"))
        assert out["lora_unet_layers_0_attention_qkv.lora_down.weight"].dtype == dtype
    assert main(["extract", str(base), str(tuned), "-o", str(tmp_path / "e.safetensors"), "-q", "-t", "16"]) == 0
    assert load_file(str(tmp_path / "e.safetensors"))["lora_unet_layers_0_attention_qkv.lora_up.weight"].dtype == \
        torch.float16
    help_text = subprocess.run([sys.executable, "-m", "lora_colab", "resize", "--help"], capture_output=True,
                               text=True).stdout
    assert "a folder, not a file" in help_text
    help_text = subprocess.run([sys.executable, "-m", "lora_colab", "extract", "--help"], capture_output=True,
                               text=True).stdout
    assert "a file, not a folder" in help_text and "--include adaln" in " ".join(help_text.split())


def test_a_lora_where_a_checkpoint_belongs_says_so(demo, tmp_path, capsys):
    base, _, lora = demo
    for args in (["extract", str(base), str(lora), "-o", str(tmp_path / "x.safetensors"), "-q"],
                 ["resize", str(lora), str(lora), "-o", str(tmp_path / "r")]):
        assert main(args) == 2
        assert f"{lora}: is a LoRA file, not a model checkpoint" in one_error_line(capsys)


def test_inspect_recognises_lora_files(demo, capsys):
    _, _, lora = demo
    assert main(["inspect", str(lora)]) == 0
    out = capsys.readouterr().out
    assert "kind:      LoRA for Z-Image, 20 modules (lora x20)" in out
    assert "spelling:  kohya (sd-scripts): loads in kohya's networks/lora.py, A1111/Forge, ComfyUI" in out
    assert "ranks:     4 x20" in out and "alphas:    4 x20" in out
    assert "ss_base_model_version=zimage" in out
    assert main(["inspect", "--json", str(lora)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "LoRA" and summary["modules"] == 20 and summary["ranks"] == {"4": 20}


def test_text_renamed_safetensors_and_lfs_pointers_are_named(tmp_path, capsys):
    text = tmp_path / "notes.safetensors"
    text.write_text("these are some notes, not a model\n" * 3)
    assert main(["inspect", str(text)]) == 2
    assert one_error_line(capsys).endswith("is not a safetensors file: it starts with text 'these are some "
                                           "notes, not a model'")
    pointer = tmp_path / "model.safetensors"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    assert main(["inspect", str(pointer)]) == 2
    assert "it looks like a Git LFS pointer, not the file itself" in one_error_line(capsys)


def test_identical_models_and_skipped_nan_layers_read_cleanly(demo, tmp_path):
    base, _, _ = demo
    report = extract(base, base, tmp_path / "same.safetensors", progress=False)
    assert "max |difference| 0 <= min_diff 0" in str(report) and "-0" not in str(report)
    assert not (tmp_path / "same.safetensors").exists()


def test_nan_skip_is_reported_once(tmp_path):
    from lora_colab.notebook.synthetic import write_checkpoint
    specs = [("layers.0.attention.qkv.weight", (24, 8)), ("layers.0.attention.out.weight", (8, 8)),
             ("cap_embedder.1.weight", (8, 4))]
    base = write_checkpoint(tmp_path / "b.safetensors", specs, lambda k, s: torch.ones(s), torch.float32)
    tuned = write_checkpoint(tmp_path / "t.safetensors", specs,
                             lambda k, s: torch.full(s, float("nan")) if "qkv" in k else torch.ones(s) * 2,
                             torch.float32)
    report = extract(base, tuned, tmp_path / "x.safetensors", on_nonfinite="skip", progress=False)
    assert str(report).count("has NaN or Inf values") == 1


def test_inspect_into_a_closed_pipe_has_no_traceback(demo):
    _, _, lora = demo
    shell = subprocess.run(f'"{sys.executable}" -m lora_colab inspect --json "{lora}" | head -1', shell=True,
                           capture_output=True, text=True)
    assert shell.stdout.strip() == "{" and "Traceback" not in shell.stderr and "BrokenPipe" not in shell.stderr


def test_resize_reports_print_as_summaries(demo, tmp_path):
    base, _, lora = demo
    reports = resize(base, [lora], tmp_path, "rank=2:spn_ckpt=1,thr=-9")
    text = str(reports)
    assert "ResizeReport(" not in text and len(text.splitlines()) >= 2
    assert "lora.safetensors [rank=2] ->" in text and "total rank 80 -> 40" in text


def test_help_does_not_load_torch():
    code = ("import sys, contextlib, io\nfrom lora_colab.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    main(['extract', '--help'])\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


def test_argparse_errors_share_the_one_prefix(capsys):
    assert main(["extract", "a.safetensors", "b.safetensors"]) == 2
    assert one_error_line(capsys).startswith("lora-colab: error: extract: the following arguments are required: -o")


def test_peft_is_the_diffusers_spelling_and_the_report_names_the_scale(demo, tmp_path):
    base, tuned, _ = demo
    report = extract(base, tuned, tmp_path / "p.safetensors", rank=4, format="peft", scale=0.5, progress=False)
    keys = set(load_file(str(tmp_path / "p.safetensors")))
    assert report.format == "diffusers" and any(k.endswith(".lora_A.weight") for k in keys)
    assert "scale 0.5)" in str(report).splitlines()[0]
    assert "scale" not in str(extract(base, tuned, tmp_path / "q.safetensors", rank=4, progress=False)).splitlines()[0]


def test_a_merge_names_its_sources_and_weights(demo, tmp_path):
    from safetensors import safe_open
    _, _, lora = demo
    report = resize(None, [f"{lora}:0.5,{lora}:-0.25"], tmp_path, "rank=2", progress=False)[0]
    with safe_open(report.output, "pt") as f:
        assert json.loads(f.metadata()["lora_colab.merge"]) == [["lora.safetensors", 0.5], ["lora.safetensors", -0.25]]
    single = resize(None, [lora], tmp_path / "one", "rank=2", progress=False)[0]
    with safe_open(single.output, "pt") as f:
        assert "lora_colab.merge" not in f.metadata()


def test_help_has_a_quick_start():
    import lora_colab
    assert "Quick start" in lora_colab.__doc__ and "lora_colab.extract(" in lora_colab.__doc__


@pytest.mark.parametrize("after", [0.3, 0.7])  # torch's import window on this machine
def test_ctrl_c_while_torch_loads_stops_cleanly(tmp_path, after):
    """Ctrl-C during the first second (torch's import) is honoured once the import is done: exit 130 with
    the one 'interrupted' line, never lost and never an abort from inside torch's native import."""
    import signal
    import time
    proc = subprocess.Popen([sys.executable, "-m", "lora_colab", "demo", "-o", str(tmp_path / "demo"), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err[-500:])
    assert "interrupted" in err and "terminate called" not in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("device", ["tpu", "xla", "meta", "mps"])
def test_resize_refuses_an_unusable_device_in_one_line_leaving_nothing(demo, tmp_path, capsys, device):
    base, tuned, lora = demo
    out = tmp_path / "out"
    assert main(["resize", "none", str(lora), "-o", str(out), "-r", "rank=2", "-d", device, "-q"]) == 2
    assert "use cpu, cuda (or cuda:N) or auto" in one_error_line(capsys)
    assert not out.exists()
    from lora_colab import resize
    with pytest.raises(LoraColabError, match=f"device '{device}'"):
        resize(None, [lora], out, "rank=2", device=device, progress=False)
    assert not out.exists()


def test_a_min_diff_above_every_difference_says_so_not_that_the_models_are_identical(demo, tmp_path):
    base, tuned, _ = demo
    report = extract(base, tuned, tmp_path / "x.safetensors", min_diff=0.5, progress=False)
    assert report.identical and report.output is None
    text = str(report)
    assert "identical" not in text
    assert "no layer's difference exceeds min_diff (the largest |difference| is " in text and "lower --min-diff" in text


def test_a_merge_weight_that_is_no_number_is_named(demo, tmp_path, capsys):
    _, _, lora = demo
    assert main(["resize", "none", f"{lora}:x", "-o", str(tmp_path / "o"), "-r", "rank=2", "-q"]) == 2
    line = one_error_line(capsys)
    assert f"{lora}:x: 'x' is not a merge weight; write a number after the colon" in line


def test_a_rank_above_every_layer_is_said_before_the_first_layer_not_after_the_run(demo, tmp_path, capsys):
    base, tuned, _ = demo
    seen = []

    def first(layer):
        if not seen:
            seen.append(capsys.readouterr().err)
    extract(base, tuned, tmp_path / "a.safetensors", rank=100000, progress=True, on_layer=first)
    assert "rank 100000 is above every layer's full rank" in seen[0]


def test_an_output_name_without_the_suffix_gets_it_and_says_so(demo, tmp_path):
    base, tuned, _ = demo
    report = extract(base, tuned, tmp_path / "my_lora", progress=False)
    assert report.output == str(tmp_path / "my_lora.safetensors") and (tmp_path / "my_lora.safetensors").exists()
    assert not (tmp_path / "my_lora").exists()
    assert any("my_lora has no .safetensors suffix" in w and "writing my_lora.safetensors" in w
               for w in report.warnings)


def test_a_second_resize_of_the_same_lora_says_at_the_start_that_another_run_holds_the_journal(demo, tmp_path, capsys):
    import fcntl
    from lora_colab import resize
    _, _, lora = demo
    out = tmp_path / "out"
    out.mkdir()
    journal = out / (lora.name[: -len(".safetensors")] + ".resize.journal")
    seen = []

    def first():
        if not seen:
            seen.append(capsys.readouterr().err)
    with open(journal, "wb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # the first run, still going
        resize(None, [lora], out, "rank=2", progress=True, on_layer=first)
    assert "another run is writing" in seen[0]


def test_the_include_help_is_a_few_lines_not_a_wall(capsys):
    assert main(["extract", "--help"]) == 0
    text = capsys.readouterr().out
    start = text.index("  --include GROUP  ")
    block = text[start:text.index("\n  --", start + 1)]
    assert len(block.splitlines()) <= 4 and "lora-colab inspect BASE" in " ".join(block.split())


def test_the_readme_shows_an_extract_example_before_any_long_table():
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    first = next(i for i, line in enumerate(readme) if line.startswith("lora-colab extract "))
    assert sum(line.startswith("| ") for line in readme[:first]) <= 4  # the notebooks' small table only
    assert "docs/models.md" in "\n".join(readme)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_the_demo_of_each_family_writes_a_lora_of_the_planted_change(tmp_path, capsys, family):
    """`lora-colab demo --family sdxl|flux`: a pair with the real names, detected as that family, and a LoRA
    whose every module (SDXL's bigG q/k/v rows included) is the change planted in its rows."""
    from lora_colab import arch
    from lora_colab.lora.formats import pieces
    from lora_colab.notebook.synthetic import make_demo_pair
    assert main(["demo", "--family", family, "-o", str(tmp_path / "demo"), "-q", "--clamp-quantile", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith({"sdxl": "SDXL", "flux": "Flux.1"}[family]) and "0 skipped" in out
    folder = tmp_path / "demo"
    assert (f"demo pair: base {folder / 'base.safetensors'} (single file), fine-tune {folder / 'tuned.safetensors'}"
            in out)
    _, _, planted = make_demo_pair(family, tmp_path / "again")  # the same seeds: the same planted change
    a = arch.get(family)
    lora = load_file(str(tmp_path / "demo" / "demo_lora.safetensors"))
    with open_checkpoint(tmp_path / "demo" / "base.safetensors") as ckpt:
        targets = a.targets({k: ckpt.shape(k) for k in ckpt.keys()})
    checked = 0
    for target in targets:
        delta = planted.delta(target.key, target.shape).reshape(target.shape[0], -1)
        for piece in pieces(a, "kohya", target):
            down, up = lora[piece.module.name + ".lora_down.weight"], lora[piece.module.name + ".lora_up.weight"]
            alpha = float(lora[piece.module.name + ".alpha"]) / down.shape[0]
            got = alpha * up.float().flatten(1) @ down.float().flatten(1)
            want = delta[piece.rows[0]:piece.rows[1]]
            assert float((got - want).norm() / want.norm()) < 0.05, piece.module.name
            checked += 1
    assert checked == sum(k.endswith(".lora_down.weight") for k in lora)


def test_the_zimage_demo_names_its_diffusers_folder_base(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path / "demo"), "-q"]) == 0
    out = capsys.readouterr().out
    assert f"demo pair: base {tmp_path / 'demo' / 'base'} (diffusers folder)" in out
    assert f"lora-colab resize {tmp_path / 'demo' / 'base'} " in out
