import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save_file as st_save_file

from lora_colab import LoraColabError, arch
from lora_colab.cli import main
from lora_colab.lowrank.recipes import RecipeError, parse_recipes
from lora_colab.resizing.inputs import LoraInput, LoraSource
from lora_colab.resizing.resizer import kohya_rank, qr_core, resize
from lora_colab.notebook.synthetic import ZImageConfig, write_checkpoint, zimage_specs
from lora_colab.io.safetensors import planned_size

Z = ZImageConfig(dim=64, n_layers=2, n_refiner_layers=1, n_heads=4, cap_feat_dim=32)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_COLAB_CACHE", str(tmp_path / "cache"))


def orthonormal(n, k, gen):
    return torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0].float()


def known_layer(n, m, sigmas, gen, alpha=None):
    """(down, up, alpha) whose alpha/rank · up @ down has exactly the singular values `sigmas`."""
    r = len(sigmas)
    u, v = orthonormal(n, r, gen), orthonormal(m, r, gen)
    s = torch.tensor(sigmas)
    alpha = float(r) if alpha is None else alpha
    c = math.sqrt(r / alpha)
    return (s.sqrt()[:, None] * v.T) * c, (u * s.sqrt()) * c, alpha, (u * s) @ v.T


def zimage_base(tmp_path):
    gen = torch.Generator().manual_seed(0)
    return write_checkpoint(tmp_path / "base.safetensors", zimage_specs(Z),
                            lambda k, s: torch.randn(s, generator=gen) * 0.05, torch.float32)


def zimage_lora(tmp_path, spectra, name="lora.safetensors", alpha=None, dtype=torch.float32):
    """A kohya Z-Image LoRA: {target key: sigmas}; returns path and {key: ΔW}."""
    z = arch.get("zimage")
    targets = {t.key: t for t in z.targets(dict(zimage_specs(Z)))}
    gen = torch.Generator().manual_seed(len(spectra))
    tensors, deltas = {}, {}
    for key, sigmas in spectra.items():
        t = targets[key]
        down, up, a, delta = known_layer(t.shape[0], t.shape[1], sigmas, gen, alpha)
        name_ = "lora_unet_" + t.module.replace(".", "_")
        tensors.update({name_ + ".lora_down.weight": down.to(dtype).contiguous(),
                        name_ + ".lora_up.weight": up.to(dtype).contiguous(),
                        name_ + ".alpha": torch.tensor(a)})
        deltas[key] = delta
    st_save_file(tensors, str(tmp_path / name), metadata={"ss_network_dim": "8", "ss_output_name": "x"})
    return tmp_path / name, deltas


def kept_ranks(path):
    return {k[: -len(".lora_down.weight")]: v.shape[0] for k, v in load_file(str(path)).items()
            if k.endswith(".lora_down.weight")}


def test_qr_core_is_exact():
    gen = torch.Generator().manual_seed(1)
    up, down = torch.randn(300, 16, generator=gen), torch.randn(16, 200, generator=gen)
    u, s, v = qr_core(up, down)
    torch.testing.assert_close((u * s) @ v.T, up @ down, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, torch.linalg.svdvals(up @ down)[:16], rtol=1e-4, atol=1e-5)


def test_kohya_methods_match_their_definitions():
    s = torch.tensor([10.0, 6.0, 3.0, 2.5, 1.0, 0.5, 0.1])
    recipe = lambda text: parse_recipes(text)[0]  # noqa: E731
    assert kohya_rank(s, recipe("sv_ratio=5")) == sum(1 for x in s.tolist() if x > 10.0 / 5) == 4
    total_sq = float((s ** 2).sum())
    k_fro = next(k for k in range(1, 8) if float((s[:k] ** 2).sum()) >= 0.9 ** 2 * total_sq)
    assert kohya_rank(s, recipe("sv_fro=0.9")) == k_fro
    k_cum = next(k for k in range(1, 8) if float(s[:k].sum()) >= 0.9 * float(s.sum()))
    assert kohya_rank(s, recipe("sv_cumulative=0.9")) == k_cum
    assert kohya_rank(s, recipe("rank=2")) == 2 and kohya_rank(s, recipe("sv_cumulative=0.99,rank=3")) == 3


def test_spn_lora_threshold_equals_a_correct_sv_ratio(tmp_path):
    spectra = {"layers.0.attention.qkv.weight": [8.0, 4.0, 1.5, 1.0, 0.5, 0.1],
               "layers.1.feed_forward.w2.weight": [3.0, 2.9, 1.0, 0.55, 0.2, 0.1],
               "context_refiner.0.attention.out.weight": [1.0, 0.3, 0.25, 0.21, 0.05, 0.01]}
    lora, _ = zimage_lora(tmp_path, spectra)
    a = resize(None, [lora], tmp_path / "a", "spn_lora=1,thr=-0.7")[0]
    b = resize(None, [lora], tmp_path / "b", "sv_ratio=5")[0]
    ranks_a, ranks_b = kept_ranks(a.output), kept_ranks(b.output)
    expected = {k: sum(1 for x in v if x > v[0] / 5) for k, v in spectra.items()}
    assert sorted(ranks_a.values()) == sorted(ranks_b.values()) == sorted(expected.values()) == [2, 3, 4]
    assert ranks_a == ranks_b


def test_resized_layers_are_the_truncated_delta_with_alpha_over_rank_kept(tmp_path):
    lora, deltas = zimage_lora(tmp_path, {"layers.0.attention.qkv.weight": [5.0, 2.0, 1.0, 0.5]}, alpha=2.0)
    report = resize(None, [lora], tmp_path / "o", "rank=2")[0]
    t = load_file(report.output)
    name = "lora_unet_layers_0_attention_qkv"
    alpha, down, up = t[name + ".alpha"].item(), t[name + ".lora_down.weight"], t[name + ".lora_up.weight"]
    assert down.shape[0] == 2 and alpha == pytest.approx(2.0 / 4 * 2)  # alpha/rank unchanged
    delta = deltas["layers.0.attention.qkv.weight"]
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    torch.testing.assert_close(alpha / 2 * up @ down, (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-4, atol=1e-5)
    assert report.layers[0].retained == pytest.approx((25 + 4) / (25 + 4 + 1 + 0.25), rel=1e-5)
    meta = safe_open(report.output, "pt").metadata()
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "1"
    assert meta["ss_training_comment"].startswith("resized by lora_colab from rank 4 with recipe rank=2")
    assert len(meta["sshs_model_hash"]) == 64 and meta["ss_output_name"] == "x"


def test_base_aware_recipes_match_a_direct_computation(tmp_path):
    base = zimage_base(tmp_path)
    spectra = {"layers.0.attention.qkv.weight": [2.0, 0.9, 0.3, 0.05],
               "layers.0.feed_forward.w1.weight": [1.5, 0.2, 0.1, 0.02],
               "noise_refiner.0.attention.out.weight": [0.7, 0.35, 0.02, 0.01]}
    lora, deltas = zimage_lora(tmp_path, spectra)
    weights = load_file(str(base))
    for text, ref in (("spn_ckpt=1,thr=-0.6", lambda w: torch.linalg.matrix_norm(w, ord=2)),
                      ("fro_ckpt=1,thr=-1.2", lambda w: w.norm())):
        report = resize(base, [lora], tmp_path / text.split("=")[0], text)[0]
        ranks = kept_ranks(report.output)
        thr = float(text.split("thr=")[1])
        for key, sig in spectra.items():
            expected = sum(1 for x in sig if math.log10(x / float(ref(weights[key]))) >= thr)
            name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
            assert ranks.get(name, 0) == expected, (text, key)
    report = resize(base, [lora], tmp_path / "sub", "subspace=1,thr=0.5")[0]
    ranks = kept_ranks(report.output)
    for key, sig in spectra.items():
        u, s, vh = torch.linalg.svd(deltas[key], full_matrices=False)
        sub = ((u[:, :4].T @ weights[key]) * vh[:4]).sum(dim=1).abs()
        expected = int((torch.log10(s[:4] / sub) >= 0.5).sum())
        assert ranks.get("lora_unet_" + key[: -len(".weight")].replace(".", "_"), 0) == expected


def test_sdxl_te2_q_and_k_use_their_own_rows_of_in_proj(tmp_path):
    gen = torch.Generator().manual_seed(4)
    in_proj = torch.cat([torch.randn(32, 32, generator=gen) * f for f in (1.0, 10.0, 100.0)])
    prefix = "conditioner.embedders.1.model.transformer.resblocks.0"
    st_save_file({"model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 4),
                  f"{prefix}.attn.in_proj_weight": in_proj}, str(tmp_path / "sdxl.safetensors"))
    tensors = {}
    for proj in "qkv":
        down, up, a, _ = known_layer(32, 32, [1.0], gen)
        name = f"lora_te2_text_model_encoder_layers_0_self_attn_{proj}_proj"
        tensors.update({name + ".lora_down.weight": down.contiguous(), name + ".lora_up.weight": up.contiguous(),
                        name + ".alpha": torch.tensor(a)})
    st_save_file(tensors, str(tmp_path / "te2.safetensors"))
    # q's rows have spectral norm ~10x smaller than k's: only q survives a threshold between them
    q_norm = float(torch.linalg.matrix_norm(in_proj[:32], ord=2))
    report = resize(tmp_path / "sdxl.safetensors", [tmp_path / "te2.safetensors"], tmp_path / "o",
                    f"spn_ckpt=1,thr={math.log10(1.0 / q_norm) - 0.5}")[0]
    assert set(kept_ranks(report.output)) == {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj"}


def test_size_target_is_met_exactly(tmp_path):
    spectra = {k: [4.0 / (i + 1) ** 1.3 for i in range(12)] for k in (
        "layers.0.attention.qkv.weight", "layers.1.feed_forward.w1.weight", "layers.1.feed_forward.w2.weight",
        "noise_refiner.0.attention.out.weight", "context_refiner.0.feed_forward.w3.weight")}
    lora, _ = zimage_lora(tmp_path, spectra, dtype=torch.float16)
    for target_mib in (0.008, 0.012, 0.02):
        report = resize(None, [lora], tmp_path / f"s{target_mib}", f"fro_lora=1,params=0.5,size={target_mib}")[0]
        target = int(target_mib * 2**20)
        size = (tmp_path / f"s{target_mib}" / report.output.split("/")[-1]).stat().st_size
        assert size == report.size_bytes <= target
        ranks = {c.name: c.new_rank for c in report.layers}
        assert 0 < sum(ranks.values()) < 60
        # no further direction would fit: one more direction in any layer pushes the file past the target
        t = load_file(report.output)
        meta = {k: v for k, v in safe_open(report.output, "pt").metadata().items() if not k.startswith("sshs_")}
        specs = {k: (v.dtype, tuple(v.shape)) for k, v in t.items()}
        z = arch.get("zimage")
        shapes = {tg.module: tg.shape for tg in z.targets(dict(zimage_specs(Z)))}
        for change in report.layers:
            if change.new_rank == 12:
                continue
            grown = dict(specs)
            n, m = shapes[change.name[len("lora_unet_"):].replace("_", ".").replace("context.refiner", "context_refiner")
                          .replace("noise.refiner", "noise_refiner").replace("feed.forward", "feed_forward")]
            k = change.new_rank + 1
            grown[change.name + ".lora_down.weight"] = (torch.float16, (k, m))
            grown[change.name + ".lora_up.weight"] = (torch.float16, (n, k))
            grown[change.name + ".alpha"] = (torch.float32, ())
            assert planned_size([(name, d, sh) for name, (d, sh) in grown.items()], meta, True) > target, change


def test_pass_through_dora_and_rebuilt_layers(tmp_path):
    gen = torch.Generator().manual_seed(7)
    down, up, a, delta = known_layer(40, 30, [3.0, 1.0, 0.2], gen)
    w1a, w1b = torch.randn(40, 2, generator=gen), torch.randn(2, 30, generator=gen)
    w2a, w2b = torch.randn(40, 2, generator=gen), torch.randn(2, 30, generator=gen)
    full = torch.randn(40, 30, generator=gen)
    st_save_file({"lora_unet_a.lora_down.weight": down.contiguous(), "lora_unet_a.lora_up.weight": up.contiguous(),
                  "lora_unet_a.alpha": torch.tensor(a), "lora_unet_a.dora_scale": torch.ones(1, 30),
                  "lora_unet_b.hada_w1_a": w1a, "lora_unet_b.hada_w1_b": w1b, "lora_unet_b.hada_w2_a": w2a,
                  "lora_unet_b.hada_w2_b": w2b, "lora_unet_b.alpha": torch.tensor(1.0),
                  "lora_unet_c.diff": full, "something.else": torch.arange(5)}, str(tmp_path / "mix.safetensors"))
    report = resize(None, [tmp_path / "mix.safetensors"], tmp_path / "o", "rank=3")[0]
    t = load_file(report.output)
    assert torch.equal(t["something.else"], torch.arange(5)) and torch.equal(t["lora_unet_a.dora_scale"],
                                                                             torch.ones(1, 30))
    assert any("something.else" in w for w in report.warnings) and any("DoRA" in w for w in report.warnings)
    loha = (w1a @ w1b) * (w2a @ w2b) * (1.0 / 2)
    for name, ref in (("lora_unet_b", loha), ("lora_unet_c", full)):
        got = t[name + ".alpha"].item() / 3 * t[name + ".lora_up.weight"] @ t[name + ".lora_down.weight"]
        u, s, vh = torch.linalg.svd(ref, full_matrices=False)
        torch.testing.assert_close(got, (u[:, :3] * s[:3]) @ vh[:3], rtol=1e-4, atol=1e-4)


def test_weighted_merge_and_windows_paths(tmp_path):
    assert LoraInput.parse(r"C:\loras\a.safetensors:0.7,b.safetensors:0.3").sources == (
        LoraSource(r"C:\loras\a.safetensors", 0.7), LoraSource("b.safetensors", 0.3))
    assert LoraInput.parse(r"D:\x\a.safetensors").sources == (LoraSource(r"D:\x\a.safetensors", 1.0),)
    a, da = zimage_lora(tmp_path, {"layers.0.attention.out.weight": [2.0, 1.0]}, name="a.safetensors")
    b, db = zimage_lora(tmp_path, {"layers.0.attention.out.weight": [3.0, 0.5, 0.1]}, name="b.safetensors")
    report = resize(None, [f"{a}:0.7,{b}:0.3"], tmp_path / "m", "rank=5")[0]
    t = load_file(report.output)
    name = "lora_unet_layers_0_attention_out"
    got = t[name + ".alpha"].item() / t[name + ".lora_down.weight"].shape[0] * \
        t[name + ".lora_up.weight"] @ t[name + ".lora_down.weight"]
    key = "layers.0.attention.out.weight"
    torch.testing.assert_close(got, 0.7 * da[key] + 0.3 * db[key], rtol=1e-4, atol=1e-5)
    assert report.output.endswith("merged_rank5.safetensors")


def test_norm_cache_is_keyed_by_content_and_reused(tmp_path):
    base = zimage_base(tmp_path)
    lora, _ = zimage_lora(tmp_path, {"layers.0.attention.qkv.weight": [1.0, 0.1]})
    from lora_colab.resizing.base_refs import BaseReferences
    with BaseReferences(base) as refs:
        refs.norms("layers.0.attention.qkv.weight", None)
        assert refs.norm_reads == 1
    copy = tmp_path / "elsewhere.safetensors"
    copy.write_bytes(base.read_bytes())
    with BaseReferences(copy) as refs:
        assert refs.norms("layers.0.attention.qkv.weight", None) and refs.norm_reads == 0
    assert len(list((tmp_path / "cache").glob("norms_*.json"))) == 1


def test_many_recipes_reuse_one_decomposition(tmp_path, monkeypatch):
    import lora_colab.resizing.resizer as resize_module
    calls = []
    real = resize_module.decompose
    monkeypatch.setattr(resize_module, "decompose", lambda *a: calls.append(1) or real(*a))
    lora, _ = zimage_lora(tmp_path, {"layers.0.attention.qkv.weight": [1.0, 0.5, 0.1],
                                     "layers.1.attention.out.weight": [2.0, 0.1, 0.05]})
    reports = resize(None, [lora], tmp_path / "o", "rank=1:sv_fro=0.9:fro_lora=1,thr=-0.5")
    assert len(calls) == 2 and len(reports) == 3
    assert len({r.output for r in reports}) == 3 and all((tmp_path / "o").joinpath(r.output.split("/")[-1]).exists()
                                                         for r in reports)


@pytest.mark.parametrize("text,message", [
    ("spn_ckpt=1", "give exactly one selection"), ("spn_ckpt=1,thr=-1,size=3", "exactly one selection"),
    ("bogus=1,thr=0", "unknown key 'bogus'"), ("spn_ckpt=1,sv_fro=0.9", "do not mix"),
    ("thr=-1", "thr/size need score weights"), ("sv_fro=1.5", "must be in (0, 1]"), ("rank=2.5", "positive integer"),
    ("spn_ckpt=x,thr=1", "is not a number"), ("spn_ckpt=0,thr=1", "sum to 0")])
def test_bad_recipes_quote_the_recipe(text, message):
    with pytest.raises(RecipeError, match=r"recipe '" + text.replace(".", r"\.").replace("(", r"\(")
                                             .replace(")", r"\)") + "'"):
        parse_recipes(text)
    with pytest.raises(RecipeError) as info:
        parse_recipes(text)
    assert message in str(info.value)


def test_base_recipes_without_checkpoint_are_refused(tmp_path):
    lora, _ = zimage_lora(tmp_path, {"layers.0.attention.qkv.weight": [1.0]})
    with pytest.raises(LoraColabError, match="give the base checkpoint"):
        resize(None, [lora], tmp_path, "spn_ckpt=1,thr=-1")


def test_cli_resize(tmp_path, capsys):
    base = zimage_base(tmp_path)
    lora, _ = zimage_lora(tmp_path, {"layers.0.attention.qkv.weight": [1.0, 0.5, 0.01]})
    assert main(["resize", str(base), str(lora), "-o", str(tmp_path / "o"), "-r",
                 "spn_ckpt=1,thr=-1.2:rank=1", "-vv", "-t", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "lora_spn_ckpt1_th-1.2.safetensors" in out and "lora_rank1.safetensors" in out
    assert "layers_0_attention_qkv: 3 ->" in out and "total rank 3 ->" in out
    t = load_file(str(tmp_path / "o" / "lora_rank1.safetensors"))
    assert t["lora_unet_layers_0_attention_qkv.lora_down.weight"].dtype == torch.bfloat16


@pytest.fixture(scope="module")
def three_spellings(tmp_path_factory):
    """One Z-Image pair extracted three times: kohya, ComfyUI and diffusers (PEFT, split qkv) spellings. The
    pair is float32, so each spelling holds the planted rank-4 change exactly (the fused qkv at rank 4, each of
    its q/k/v slices at rank 4 on its own) and the three agree to float32 rounding."""
    from lora_colab import extract
    from lora_colab.notebook.synthetic import make_zimage_pair
    folder = tmp_path_factory.mktemp("spellings")
    base, tuned, planted = make_zimage_pair(folder, Z, rank=4, dtype=torch.float32)
    paths = {}
    for fmt in ("kohya", "comfy", "diffusers"):
        paths[fmt] = folder / f"{fmt}.safetensors"
        extract(base, tuned, paths[fmt], rank=4, format=fmt, clamp_quantile=None, progress=False, dtype="fp32")
    return base, paths, planted


def _deltas(path, base):
    """{canonical key: ΔW} of a LoRA file in any spelling, assembled over split modules."""
    from lora_colab.resizing.base_refs import BaseReferences
    from lora_colab.lora.files import LoraFile
    out = {}
    with BaseReferences(base) as refs, LoraFile(path) as lora:
        for layer in lora.layers.values():
            key, rows = refs.locate(layer.name)
            delta, _ = lora.delta(layer)
            full = out.setdefault(key, torch.zeros(refs.view.shape(key)[0], delta.shape[1]))
            start, stop = rows or (0, full.shape[0])
            full[start:stop] += delta
    return out


def test_every_spelling_holds_the_planted_change(three_spellings):
    base, paths, planted = three_spellings
    for fmt, path in paths.items():
        got = _deltas(path, base)
        assert got
        for key, delta in got.items():
            want = planted.delta(key, tuple(delta.shape))
            torch.testing.assert_close(delta, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()),
                                       msg=lambda m: f"{fmt} {key}: {m}")


@pytest.mark.parametrize("second", ["comfy", "diffusers"])
def test_merging_one_model_in_different_spellings_combines_layers(tmp_path, three_spellings, second):
    base, paths, _ = three_spellings
    kohya_keys = set(load_file(str(paths["kohya"])))
    report = resize(base, [f"{paths['kohya']}:0.5,{paths[second]}:0.5"], tmp_path, "rank=64")[0]
    merged = load_file(report.output)
    assert set(merged) == kohya_keys  # one spelling: the first LoRA's, one module per layer
    got, want = _deltas(report.output, base), _deltas(paths["kohya"], base)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=1e-5)


def test_merge_spelled_as_the_first_lora_even_when_it_is_diffusers(tmp_path, three_spellings):
    base, paths, _ = three_spellings
    report = resize(base, [f"{paths['diffusers']}:1,{paths['comfy']}:-1"], tmp_path, "rank=64")[0]
    # the two cancel: nothing remains, and no file is written
    assert report.nothing_kept and report.output is None and report.total_rank == 0
    report = resize(base, [f"{paths['diffusers']}:0.25,{paths['comfy']}:0.75"], tmp_path, "rank=64")[0]
    assert set(load_file(report.output)) == set(load_file(str(paths["diffusers"])))
    got, want = _deltas(report.output, base), _deltas(paths["comfy"], base)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=1e-5)


def test_single_lora_weight_scales_it(tmp_path, three_spellings):
    base, paths, _ = three_spellings
    report = resize(None, [f"{paths['kohya']}:0.5"], tmp_path, "rank=64")[0]
    got, want = _deltas(report.output, base), _deltas(paths["kohya"], base)
    for key in want:
        torch.testing.assert_close(got[key], 0.5 * want[key], rtol=1e-3, atol=1e-5)


def test_base_of_another_architecture_is_one_line_naming_both(tmp_path, three_spellings, capsys):
    from lora_colab.notebook.synthetic import write_checkpoint
    _, paths, _ = three_spellings
    flux = [("double_blocks.0.img_attn.qkv.weight", (96, 32)), ("double_blocks.0.img_attn.proj.weight", (32, 32))]
    other = write_checkpoint(tmp_path / "flux.safetensors", flux, lambda k, s: torch.randn(s))
    assert main(["resize", str(other), str(paths["kohya"]), "-o", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "Flux.1" in err and "looks like a Z-Image LoRA" in err and "none of its" in err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_base_covering_some_layers_says_how_many_and_which_terms(tmp_path, three_spellings):
    base, paths, _ = three_spellings
    tensors = load_file(str(paths["kohya"]))
    tensors.update({"lora_unet_not_a_layer.lora_down.weight": torch.randn(2, 8),
                    "lora_unet_not_a_layer.lora_up.weight": torch.randn(8, 2),
                    "lora_unet_not_a_layer.alpha": torch.tensor(2.0)})
    extra = tmp_path / "extra.safetensors"
    st_save_file(tensors, str(extra))
    report = resize(base, [extra], tmp_path / "o", "spn_ckpt=1,fro_ckpt=1,thr=-9")[0]
    notes = [w for w in report.warnings if "patch no weight of the base" in w]
    assert len(notes) == 1 and notes[0].startswith("1 of ") and "fro_ckpt, spn_ckpt could not be computed" in notes[0]
    assert kept_ranks(report.output)["lora_unet_not_a_layer"] == 2


def _split_lora(path, targets, seed, rank=4):
    """A diffusers-spelled Z-Image LoRA whose to_q/to_k/to_v each carry their own rank-`rank` change (own down
    factors); returns {module name: ΔW}."""
    from lora_colab.lora.formats import piece_tensors, pieces
    z = arch.get("zimage")
    gen = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for t in targets:
        for piece in pieces(z, "diffusers", t):
            down = torch.randn(rank, t.shape[1], generator=gen) / 8
            up = torch.randn(piece.shape[0], rank, generator=gen) * torch.logspace(0, -1, rank)
            tensors.update(piece_tensors(piece, down, up, float(rank), torch.float32))
            deltas[piece.module.name] = up @ down
    st_save_file(tensors, str(path))
    return deltas


def _module_deltas(path):
    lora = load_file(str(path))
    return {name[: -len(".lora_A.weight")]: lora[name[: -len("A.weight")] + "B.weight"] @ lora[name]
            for name in lora if name.endswith(".lora_A.weight")}


def test_split_modules_are_resized_and_merged_each_on_its_own(tmp_path):
    """A LoRA whose modules are row slices of one base weight (Z-Image's to_q/to_k/to_v of the fused qkv):
    each written module is the best rank-k approximation of its own change, resized alone or merged."""
    targets = arch.get("zimage").targets(dict(zimage_specs(Z)))
    a = _split_lora(tmp_path / "a.safetensors", targets, 1)
    b = _split_lora(tmp_path / "b.safetensors", targets, 2)
    assert sum(name.endswith(".to_q") for name in a) == 4
    one = resize(None, [tmp_path / "a.safetensors"], tmp_path / "one", "rank=2", dtype="32")[0]
    base = zimage_base(tmp_path)
    merged = resize(base, ["%s:1,%s:-0.5" % (tmp_path / "a.safetensors", tmp_path / "b.safetensors")],
                    tmp_path / "merged", "rank=3", dtype="32")[0]
    for report, want, k in ((one, a, 2), (merged, {n: a[n] - 0.5 * b[n] for n in a}, 3)):
        got = _module_deltas(report.output)
        assert got.keys() == want.keys()
        for name, delta in want.items():
            u, s, vh = torch.linalg.svd(delta.double())
            best = (u[:, :k] * s[:k]) @ vh[:k]
            torch.testing.assert_close(got[name].double(), best, rtol=1e-4, atol=1e-6 * float(s[0]))


def test_a_recipe_that_keeps_nothing_writes_nothing_and_exits_1(tmp_path, capsys):
    base = zimage_base(tmp_path)
    path, _ = zimage_lora(tmp_path, {"layers.0.attention.qkv.weight": [1e-3, 5e-4]})
    report = resize(base, [path], tmp_path / "out", "spn_ckpt=1,thr=10:rank=1")
    assert report[0].nothing_kept and report[0].output is None and report[0].total_rank == 0
    assert "keeps no direction of any layer; no file written" in str(report[0])
    assert not report[1].nothing_kept and report[1].total_rank == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [Path(report[1].output).name]
    assert main(["resize", str(base), str(path), "-r", "spn_ckpt=1,thr=10", "-o", str(tmp_path / "o2")]) == 1
    assert "no file written" in capsys.readouterr().out
    assert not (tmp_path / "o2").exists() or not list((tmp_path / "o2").iterdir())


def test_a_merge_weight_of_zero_is_refused_before_reading(tmp_path, capsys):
    path, _ = zimage_lora(tmp_path, {"layers.0.attention.qkv.weight": [1.0]})
    with pytest.raises(LoraColabError, match=r"lora\.safetensors:0: a merge weight of 0 adds nothing"):
        resize(None, [f"{path}:0,{path}:1"], tmp_path / "out", "rank=1")
    assert main(["resize", "none", f"{path}:0", "-r", "rank=1", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "merge weight of 0" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_a_lora_as_the_base_says_what_resize_needs_and_a_rerun_says_it_replaced_the_output(tmp_path, capsys):
    path, _ = zimage_lora(tmp_path, {"layers.0.attention.qkv.weight": [1.0, 0.5]})
    with pytest.raises(LoraColabError, match="is a LoRA file, not a model checkpoint: give the base model the LoRA "
                                             "was trained on as the checkpoint"):
        resize(path, [path], tmp_path / "o", "spn_ckpt=1,thr=-9", progress=False)
    first = resize(None, [path], tmp_path / "o", "rank=1", progress=False)[0]
    assert not [w for w in first.warnings if "replaced" in w]
    again = resize(None, [path], tmp_path / "o", "rank=1", progress=False)[0]
    assert f"replaced the existing {Path(again.output).name}" in str(again)


@pytest.mark.parametrize("recipe", ["spn_ckpt=1,thr=99", "fro_lora=1,size=0.000001", "wrong base"])
def test_a_resize_that_writes_nothing_leaves_no_empty_folder(tmp_path, recipe):
    """Nothing kept, a size no file fits, a LoRA of another model than the base: the folders the run made
    for its outputs are gone again."""
    lora, _ = zimage_lora(tmp_path, {"layers.0.attention.qkv.weight": [1.0, 0.5]})
    out = tmp_path / "out" / "nested"
    if recipe == "wrong base":
        other = tmp_path / "flux.safetensors"
        st_save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(48, 16),
                      "double_blocks.0.img_attn.proj.weight": torch.zeros(16, 16)}, str(other))
        with pytest.raises(LoraColabError):
            resize(other, [lora], out, "spn_ckpt=1,thr=-1", progress=False)
    elif "size" in recipe:
        with pytest.raises(LoraColabError, match="even an empty LoRA"):
            resize(None, [lora], out, recipe, progress=False)
    else:
        assert resize(zimage_base(tmp_path), [lora], out, recipe, progress=False)[0].nothing_kept
    assert not (tmp_path / "out").exists()
