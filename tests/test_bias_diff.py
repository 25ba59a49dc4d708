"""Bias and norm changes carried as ComfyUI's `.diff_b`/`.diff` patches: applied by ComfyUI's rules they
reproduce the fine-tune; the default follows what every client of the format loads; diffusers loads the
ones it converts (Wan's block biases)."""

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save_file as st_save_file

from lora_colab import OptionError, arch, extract
from lora_colab.arch.canonical import open_canonical
from lora_colab.cli import build_parser
from lora_colab.configs import ExtractConfig
from lora_colab.notebook.synthetic import ZImageConfig, make_zimage_pair

from comfy_rules import unet_key_map

CFG = ZImageConfig(dim=128, n_layers=1, n_refiner_layers=1, n_heads=4, cap_feat_dim=32)


def zimage_pair(tmp_path, change_matrices):
    """Native single files of a Z-Image base and a fine-tune that changed every bias and 1-D weight (and,
    with `change_matrices`, has a planted rank-4 change on every target)."""
    base, tuned, _ = make_zimage_pair(tmp_path / "made", CFG, rank=4, delta_scale=0.05, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    with open_canonical(base) as b, open_canonical(tuned) as t:
        base_sd = {k: b.read(k) for k in b.keys()}
        tuned_sd = {k: (t.read(k) if change_matrices else b.read(k)) for k in b.keys()}
    for key, value in base_sd.items():
        if value.dim() == 1 and key.endswith((".bias", ".weight")):
            tuned_sd[key] = value + 0.05 * torch.randn(value.shape, generator=gen)
    st_save_file(base_sd, str(tmp_path / "base.safetensors"))
    st_save_file(tuned_sd, str(tmp_path / "tuned.safetensors"))
    return base_sd, tuned_sd


def apply_like_comfyui(lora, model, arch_name):
    """ComfyUI's load_lora + patching: up @ down · alpha/rank, `.diff` onto the weight, `.diff_b` onto the
    bias; returns the patched model and the LoRA keys nothing consumed ("lora key not loaded")."""
    key_map = unet_key_map(arch_name, {k: tuple(v.shape) for k, v in model.items()})
    patched, loaded = dict(model), set()
    for name, value in lora.items():
        for suffix in (".lora_up.weight", ".diff_b", ".diff"):
            if not name.endswith(suffix) or name[: -len(suffix)] not in key_map:
                continue
            module = name[: -len(suffix)]
            weight, piece = key_map[module]
            assert piece is None
            if suffix == ".diff":
                patched[weight] = patched[weight] + value.float()
            elif suffix == ".diff_b":
                bias = weight[: -len(".weight")] + ".bias"
                patched[bias] = patched[bias] + value.float()
            else:
                down = lora[module + ".lora_down.weight"].float()
                alpha = float(lora[module + ".alpha"]) if module + ".alpha" in lora else down.shape[0]
                patched[weight] = patched[weight] + value.float() @ down * (alpha / down.shape[0])
                loaded.update({module + ".lora_down.weight", module + ".alpha"})
            loaded.add(name)
    return patched, set(lora) - loaded


@pytest.mark.parametrize("change_matrices", [False, True])
def test_a_fine_tune_is_reproduced_with_its_bias_and_norm_changes(tmp_path, change_matrices):
    base_sd, tuned_sd = zimage_pair(tmp_path, change_matrices)
    one_d = [k for k, v in base_sd.items() if v.dim() == 1 and k.endswith((".bias", ".weight"))]
    assert len(one_d) >= 20
    report = extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "lora.safetensors",
                     rank=4, clamp_quantile=None, format="comfy", dtype="fp32", progress=False, device="cpu")
    assert not report.identical and report.output
    assert len(report.diffs) == len(one_d)
    assert len(report.extracted) == (15 if change_matrices else 0)
    assert "bias and norm changes" in str(report) and not any("left out" in w for w in report.warnings)
    lora = load_file(str(tmp_path / "lora.safetensors"))
    assert sum(k.endswith(".diff_b") for k in lora) == sum(k.endswith(".bias") for k in one_d)
    patched, not_loaded = apply_like_comfyui(lora, base_sd, "zimage")
    assert not not_loaded
    for key in one_d:
        assert torch.allclose(patched[key], tuned_sd[key], atol=1e-6), key
    carried = one_d + [t.key for t in arch.get("zimage").targets({k: tuple(v.shape) for k, v in base_sd.items()})]
    worst = max(float((patched[k] - tuned_sd[k]).norm() / (tuned_sd[k] - base_sd[k]).norm())
                for k in carried if not torch.equal(tuned_sd[k], base_sd[k]))
    assert worst < 1e-3


def test_kohya_leaves_them_out_with_a_line_and_writes_them_when_asked(tmp_path):
    base_sd, tuned_sd = zimage_pair(tmp_path, change_matrices=True)
    paths = (tmp_path / "base.safetensors", tmp_path / "tuned.safetensors")
    plain = extract(*paths, tmp_path / "plain.safetensors", rank=4, progress=False, device="cpu")
    assert plain.format == "kohya" and not plain.diffs
    n_changed = sum(1 for k, v in base_sd.items() if v.dim() == 1 and not torch.equal(v, tuned_sd[k]))
    assert n_changed >= 20
    assert any(w.startswith(f"bias and norm changes ({n_changed} changed) left out: the kohya format's other "
                            f"clients") and "--format comfy writes them" in w for w in plain.warnings)
    assert not any(k.endswith((".diff", ".diff_b")) for k in load_file(str(tmp_path / "plain.safetensors")))

    forced = extract(*paths, tmp_path / "forced.safetensors", rank=4, progress=False, device="cpu",
                     bias_diff=True, dtype="fp32")
    lora = load_file(str(tmp_path / "forced.safetensors"))
    assert any(k.startswith("lora_unet_layers_0_") and k.endswith(".diff") for k in lora)
    assert any(w.startswith("bias and norm changes written as .diff/.diff_b though") for w in forced.warnings)
    patched, not_loaded = apply_like_comfyui(lora, base_sd, "zimage")
    assert not not_loaded
    assert torch.allclose(patched["x_embedder.bias"], tuned_sd["x_embedder.bias"], atol=1e-6)

    off = extract(*paths, tmp_path / "off.safetensors", rank=4, format="comfy", bias_diff=False, progress=False,
                  device="cpu")
    assert not off.diffs and not any("bias" in w for w in off.warnings)


def test_only_bias_changes_below_min_diff_are_identical(tmp_path):
    zimage_pair(tmp_path, change_matrices=False)
    report = extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "x.safetensors",
                     rank=4, format="comfy", min_diff=10.0, progress=False, device="cpu")
    assert report.identical and not report.output and not (tmp_path / "x.safetensors").exists()


def test_the_diffusers_format_refuses_them_in_one_line(tmp_path):
    zimage_pair(tmp_path, change_matrices=True)
    with pytest.raises(OptionError, match=r"^--bias-diff: the diffusers \(PEFT\) format has no place"):
        extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "x.safetensors",
                format="diffusers", bias_diff=True, progress=False, device="cpu")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("name, fmt, default", [
    ("zimage", "comfy", True), ("flux", "comfy", True), ("sdxl", "comfy", True), ("flux2", "comfy", True),
    ("qwen_image_2_1", "comfy", True), ("wan", "comfy", False), ("qwen_image", "comfy", False),
    ("krea2", "comfy", False), ("ltx2", "comfy", False), ("chroma", "comfy", False),
    ("zimage", "kohya", False), ("sdxl", "kohya", False), ("flux", "diffusers", False)])
def test_default_is_on_only_where_every_client_of_the_format_loads_them(name, fmt, default):
    from lora_colab.extraction.bias_diff import policy
    assert policy(arch.get(name), fmt)[0] is default


def test_sd_carries_the_unets_and_not_the_text_encoders():
    sd = arch.get("sd15")
    assert sd.diff_module("model.diffusion_model.input_blocks.1.1.norm") == "input_blocks.1.1.norm"
    assert sd.diff_module("cond_stage_model.transformer.text_model.final_layer_norm") is None


def test_cli_and_notebook_switches():
    parser = build_parser()
    args = [["extract", "a", "b", "-o", "x.safetensors"] + extra for extra in ([], ["--bias-diff"],
                                                                             ["--no-bias-diff"])]
    assert [parser.parse_args(a).bias_diff for a in args] == [None, True, False]
    assert ExtractConfig().extract_kwargs()["bias_diff"] is None
    assert ExtractConfig(bias_diff=False).extract_kwargs()["bias_diff"] is False


def test_wan_block_biases_load_through_diffusers(tmp_path):
    """diffusers turns Wan's `.diff_b` of LoRA'd block modules into PEFT lora_B biases: the layers' outputs
    match the fine-tune's."""
    from test_new_architectures import linear_outputs, load_into, planted_pair, tiny, to_diffusers

    gen = torch.Generator().manual_seed(4)
    base_model = tiny("wan")
    a, base, tuned = planted_pair(base_model, gen)
    targets = {t.module for t in a.targets({k: tuple(v.shape) for k, v in base.items()})}
    changed = 0
    for key, value in base.items():
        if key.endswith(".bias") and key[: -len(".bias")] in targets:
            tuned[key] = value + 0.05 * torch.randn(value.shape, generator=gen)
            changed += 1
    assert changed >= 8
    st_save_file({k: v.contiguous() for k, v in base.items()}, str(tmp_path / "base.safetensors"))
    st_save_file({k: v.contiguous() for k, v in tuned.items()}, str(tmp_path / "tuned.safetensors"))
    report = extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "x.safetensors",
                     rank=4, format="comfy", bias_diff=True, progress=False, device="cpu")
    assert len(report.diffs) == changed
    keys = {k: tuple(v.shape) for k, v in base_model.state_dict().items()}
    tuned_model = tiny("wan")
    tuned_model.load_state_dict(to_diffusers(a, tuned, keys))
    want, was = linear_outputs(tuned_model, gen), linear_outputs(base_model, gen)
    got = linear_outputs(load_into("wan", tiny("wan"), tmp_path, "x.safetensors"), gen)
    change = sum(float((want[k] - was[k]).norm() ** 2) for k in want) ** 0.5
    gap = sum(float((got[k] - want[k]).norm() ** 2) for k in want) ** 0.5
    assert gap <= 0.05 * change, gap / change
    without = extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "y.safetensors",
                      rank=4, format="comfy", progress=False, device="cpu")
    got = linear_outputs(load_into("wan", tiny("wan"), tmp_path, "y.safetensors"), gen)
    assert sum(float((got[k] - want[k]).norm() ** 2) for k in want) ** 0.5 > 2 * gap  # the biases mattered
    assert not without.diffs


def test_resizing_keeps_the_patches_whole_and_weights_them_in_merges(tmp_path):
    from lora_colab import resize
    zimage_pair(tmp_path, change_matrices=True)
    base = tmp_path / "base.safetensors"
    report = extract(base, tmp_path / "tuned.safetensors", tmp_path / "lora.safetensors", rank=8, format="comfy",
                     progress=False, device="cpu")
    source = load_file(str(tmp_path / "lora.safetensors"))
    patches = {k: v for k, v in source.items() if k.endswith((".diff", ".diff_b"))}
    assert len(patches) == len(report.diffs) >= 20
    lora = tmp_path / "lora.safetensors"
    (single,) = resize(base, [lora], tmp_path / "one", "rank=4", verbose=0, device="cpu")
    out = load_file(single.output)
    assert all(torch.equal(out[k], v) for k, v in patches.items())
    assert not any("diff" in w and "rebuilt" in w for w in single.warnings)
    resize(base, [f"{lora}:0.5,{lora}:0.25"], tmp_path / "merged", "rank=4", verbose=0, device="cpu")
    merged = load_file(str(next((tmp_path / "merged").glob("*.safetensors"))))
    for key, value in patches.items():
        torch.testing.assert_close(merged[key].float(), 0.75 * value.float(), rtol=1e-2, atol=1e-4)


def test_no_note_about_bias_changes_when_no_bias_changed(tmp_path):
    """The demo and every fine-tune that changed only matrices: no line about bias and norm changes."""
    from lora_colab.notebook.synthetic import ZImageConfig, make_zimage_pair
    base, tuned, _ = make_zimage_pair(tmp_path, ZImageConfig(dim=64, n_layers=1, n_refiner_layers=1, n_heads=2,
                                                             cap_feat_dim=32), rank=2)
    report = extract(base, tuned, tmp_path / "l.safetensors", rank=2, format="kohya", progress=False)
    assert not report.diffs and not any("bias and norm" in w for w in report.warnings)
