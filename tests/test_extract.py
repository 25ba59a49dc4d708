import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save_file as st_save_file

from lora_colab import CheckpointError, arch
from lora_colab.arch.canonical import open_canonical
from lora_colab.cli import main
from lora_colab.extraction.extractor import extract
from lora_colab.notebook.synthetic import ZImageConfig, make_zimage_pair

Z = ZImageConfig(dim=128, n_layers=2, n_refiner_layers=1, n_heads=4, cap_feat_dim=32)


def lora_products(path, architecture, targets, fmt="kohya"):
    """{target key: alpha/rank · up @ down} read back from a written LoRA file (2-D, float64)."""
    tensors = load_file(str(path))
    products = {}
    for t in targets:
        parts = []
        for module in architecture.lora_modules(t, fmt):
            down_s, up_s = module.factor_suffixes
            if module.name + down_s not in tensors:
                break
            down = tensors[module.name + down_s].double().reshape(tensors[module.name + down_s].shape[0], -1)
            up = tensors[module.name + up_s].double().reshape(tensors[module.name + up_s].shape[0], -1)
            alpha = tensors[module.name + ".alpha"].item() if module.alpha else down.shape[0]
            parts.append(alpha / down.shape[0] * up @ down)
        if parts:
            products[t.key] = torch.cat(parts)
    return products


def true_differences(base, tuned):
    with open_canonical(base) as b, open_canonical(tuned) as t:
        targets = b.arch.targets(b.shapes())
        return b.arch, targets, {x.key: (t.read(x.key) - b.read(x.key)).double().reshape(x.shape[0], -1)
                                 for x in targets}


def optimal_residual(delta, r):
    s = torch.linalg.svdvals(delta)
    return float(s[r:].pow(2).sum().sqrt())


def test_residual_within_2_percent_of_optimal_on_planted_low_rank_plus_noise(tmp_path):
    base, tuned, _ = make_zimage_pair(tmp_path, Z, rank=6, noise=0.002, dtype=torch.float32)
    report = extract(base, tuned, tmp_path / "lora.safetensors", rank=8, clamp_quantile=None,
                     dtype="fp32", progress=False)
    architecture, targets, deltas = true_differences(base, tuned)
    products = lora_products(tmp_path / "lora.safetensors", architecture, targets)
    assert set(products) == set(deltas) and len(deltas) == 20
    for key, delta in deltas.items():
        ours = float((delta - products[key]).norm())
        best = optimal_residual(delta, 8)
        assert ours <= 1.02 * best, (key, ours, best)
        layer = next(x for x in report.layers if x.name == key[: -len(".weight")])
        assert layer.rel_error == pytest.approx(ours / float(delta.norm()), rel=1e-3)
        assert layer.energy == pytest.approx(float(products[key].norm() ** 2 / delta.norm() ** 2), rel=1e-3)


def test_exact_low_rank_is_recovered_after_bf16_rounding(tmp_path):
    base, tuned, _ = make_zimage_pair(tmp_path, Z, rank=6, noise=0.0, dtype=torch.float32)
    extract(base, tuned, tmp_path / "lora.safetensors", rank=8, clamp_quantile=None, progress=False)
    with safe_open(str(tmp_path / "lora.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if not k.endswith(".alpha")} == {torch.bfloat16}
    architecture, targets, deltas = true_differences(base, tuned)
    products = lora_products(tmp_path / "lora.safetensors", architecture, targets)
    for key, delta in deltas.items():
        assert float((delta - products[key]).norm() / delta.norm()) < 1e-2, key


@pytest.mark.parametrize("bf16", ["1", "0"])
def test_a_bf16_pair_is_factored_from_its_bf16_difference_or_in_float32_alike(tmp_path, monkeypatch, bf16):
    """A bf16 pair takes the bf16 difference and sketch where the CPU's bf16 products are fast (forced here
    both ways): each layer within 1.02x of the optimal residual of the exact difference, and the report's
    relative error is that residual."""
    import lora_colab.extraction.layer as layer_module
    monkeypatch.setenv("LORA_COLAB_BF16_SKETCH", bf16)
    seen = []
    real = layer_module.decompose_layer
    monkeypatch.setattr(layer_module, "decompose_layer", lambda d, *a: seen.append(d.dtype) or real(d, *a))
    base, tuned, _ = make_zimage_pair(tmp_path, ZImageConfig(dim=256, n_layers=1, n_refiner_layers=1, n_heads=4,
                                                             cap_feat_dim=32), rank=6, noise=0.002)
    report = extract(base, tuned, tmp_path / "lora.safetensors", rank=8, clamp_quantile=None, dtype="fp32",
                     progress=False, device="cpu")
    assert set(seen) == {torch.bfloat16 if bf16 == "1" else torch.float32}
    architecture, targets, deltas = true_differences(base, tuned)
    products = lora_products(tmp_path / "lora.safetensors", architecture, targets)
    for key, delta in deltas.items():
        ours = float((delta - products[key]).norm())
        assert ours <= 1.02 * optimal_residual(delta, 8), key
        layer = next(x for x in report.layers if x.name == key[: -len(".weight")])
        assert layer.rel_error == pytest.approx(ours / float(delta.norm()), rel=1e-3)


def test_alpha_and_scale_semantics_and_metadata(tmp_path):
    base, tuned, _ = make_zimage_pair(tmp_path, Z, rank=4, dtype=torch.float32)
    a = extract(base, tuned, tmp_path / "a.safetensors", rank=8, alpha=4, clamp_quantile=None, dtype="fp32",
                progress=False)
    extract(base, tuned, tmp_path / "b.safetensors", rank=8, clamp_quantile=None, dtype="fp32",
                scale=0.5, progress=False)
    architecture, targets, deltas = true_differences(base, tuned)
    pa = lora_products(tmp_path / "a.safetensors", architecture, targets)
    pb = lora_products(tmp_path / "b.safetensors", architecture, targets)
    for key, delta in deltas.items():
        torch.testing.assert_close(pa[key], delta, rtol=0, atol=1e-4 * float(delta.abs().max()))
        torch.testing.assert_close(pb[key], 0.5 * delta, rtol=0, atol=1e-4 * float(delta.abs().max()))
    tensors = load_file(str(tmp_path / "a.safetensors"))
    alphas = {k: v for k, v in tensors.items() if k.endswith(".alpha")}
    assert len(alphas) == 20 and all(v.dtype == torch.float32 and v.shape == () and v.item() == 4 for v in
                                     alphas.values())
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "4"
    assert meta["modelspec.architecture"] == "Z-Image/lora" and meta["ss_output_name"] == "a"
    assert len(meta["sshs_model_hash"]) == 64
    assert a.output_bytes == (tmp_path / "a.safetensors").stat().st_size


def test_arch_reads_both_as_the_family_named_or_says_what_they_are(tmp_path):
    base, tuned, _ = make_zimage_pair(tmp_path, Z, rank=4, dtype=torch.float32)
    report = extract(base, tuned, tmp_path / "a.safetensors", rank=4, arch="zimage", dtype="fp32",
                     clamp_quantile=None, progress=False)
    architecture, targets, deltas = true_differences(base, tuned)
    products = lora_products(tmp_path / "a.safetensors", architecture, targets)
    assert report.architecture.startswith("Z-Image") and products.keys() == deltas.keys()
    for key, delta in deltas.items():
        assert float((products[key] - delta).norm() / delta.norm()) < 0.01
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors: is Z-Image.*, not Flux\.1"):
        extract(base, tuned, tmp_path / "b.safetensors", arch="flux", progress=False)
    assert not (tmp_path / "b.safetensors").exists()


def test_energy_picks_per_layer_ranks(tmp_path):
    base, tuned, _ = make_zimage_pair(tmp_path, Z, rank=3, noise=0.0002, dtype=torch.float32)
    report = extract(base, tuned, tmp_path / "e.safetensors", rank=16, energy=0.98, clamp_quantile=None,
                     progress=False)
    ranks = [layer.rank for layer in report.extracted]
    assert all(r <= 4 for r in ranks) and all(layer.energy >= 0.98 for layer in report.extracted)
    tensors = load_file(str(tmp_path / "e.safetensors"))
    for layer in report.extracted:
        down = "lora_unet_" + layer.name.replace(".", "_") + ".lora_down.weight"
        assert tensors[down].shape[0] == layer.rank


def _generic_pair(tmp_path, deltas, base_scale=0.02, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(d.shape, generator=gen) * base_scale for k, d in deltas.items()}
    tuned = {k: base[k] + d for k, d in deltas.items()}
    st_save_file(base, str(tmp_path / "base.safetensors"))
    st_save_file(tuned, str(tmp_path / "tuned.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"


def _low_rank(rows, cols, r, noise, gen):
    d = torch.randn(rows, r, generator=gen) @ torch.randn(r, cols, generator=gen) / math.sqrt(r)
    return (d + noise * torch.randn(rows, cols, generator=gen)) * 0.01


def test_clamp_barely_moves_a_difference_without_outliers_and_cuts_spikes(tmp_path):
    gen = torch.Generator().manual_seed(5)
    clean = _low_rank(1024, 768, 32, 0.3, gen)
    spiky = _low_rank(1024, 768, 32, 0.3, gen)
    spiky[17, 300] += 200 * float(spiky.abs().max())
    base, tuned = _generic_pair(tmp_path, {"blocks.0.proj.weight": clean, "blocks.1.proj.weight": spiky})
    report = extract(base, tuned, tmp_path / "c.safetensors", rank=32, clamp_quantile=0.99, dtype="fp32",
                     progress=False)
    layers = {layer.name: layer for layer in report.layers}
    assert 0 < layers["blocks.0.proj"].clamp_change < 0.02
    generic = arch.get("generic")
    targets = generic.targets({"blocks.0.proj.weight": (1024, 768), "blocks.1.proj.weight": (1024, 768)})
    products = lora_products(tmp_path / "c.safetensors", generic, targets, "comfy")
    spike = float(spiky[17, 300])
    assert float(products["blocks.1.proj.weight"].abs().max()) < 0.2 * spike
    assert layers["blocks.1.proj"].clamp_change > 0.1
    unclamped = extract(base, tuned, tmp_path / "u.safetensors", rank=32, clamp_quantile=None, dtype="fp32",
                        progress=False)
    products_u = lora_products(tmp_path / "u.safetensors", generic, targets, "comfy")
    assert float(products_u["blocks.1.proj.weight"].abs().max()) > 0.5 * spike
    assert all(layer.clamp_change == 0 for layer in unclamped.layers)


def test_conv_layers_get_4d_factors(tmp_path):
    gen = torch.Generator().manual_seed(2)
    conv = (torch.randn(64, 4, generator=gen) @ torch.randn(4, 32 * 9, generator=gen)).reshape(64, 32, 3, 3) * 0.01
    base, tuned = _generic_pair(tmp_path, {"net.conv.weight": conv, "net.fc.weight": _low_rank(96, 80, 4, 0, gen)})
    report = extract(base, tuned, tmp_path / "l.safetensors", rank=8, conv_rank=4, conv_alpha=2,
                     clamp_quantile=None, dtype="fp32", progress=False)
    tensors = load_file(str(tmp_path / "l.safetensors"))
    assert tensors["diffusion_model.net.conv.lora_down.weight"].shape == (4, 32, 3, 3)
    assert tensors["diffusion_model.net.conv.lora_up.weight"].shape == (64, 4, 1, 1)
    assert tensors["diffusion_model.net.conv.alpha"].item() == 2
    down = tensors["diffusion_model.net.conv.lora_down.weight"].reshape(4, -1)
    up = tensors["diffusion_model.net.conv.lora_up.weight"].reshape(64, 4)
    torch.testing.assert_close((2 / 4 * up @ down).reshape(conv.shape), conv, rtol=0, atol=1e-5)  # CUDA: 1.2e-6
    assert {layer.name: layer.rank for layer in report.layers} == {"net.conv": 4, "net.fc": 8}
    meta = safe_open(str(tmp_path / "l.safetensors"), "pt").metadata()
    assert meta["ss_network_dim"] == "8" and meta["ss_network_args"] == '{"conv_dim": "4", "conv_alpha": "2"}'


def test_unchanged_layers_are_skipped_and_identical_models_write_nothing(tmp_path):
    gen = torch.Generator().manual_seed(3)
    base, tuned = _generic_pair(tmp_path, {"a.fc.weight": _low_rank(64, 48, 2, 0, gen),
                                           "b.fc.weight": torch.zeros(64, 48)})
    report = extract(base, tuned, tmp_path / "s.safetensors", rank=4, progress=False)
    assert [layer.name for layer in report.skipped] == ["b.fc"]
    assert "min_diff" in report.skipped[0].skipped and "skipped: b.fc" in str(report)
    assert not any(k.startswith("diffusion_model.b.") for k in load_file(str(tmp_path / "s.safetensors")))

    same = extract(base, base, tmp_path / "same.safetensors", rank=4, progress=False)
    assert same.identical and same.output is None and not (tmp_path / "same.safetensors").exists()
    assert "the models are identical" in str(same)
    assert not list(tmp_path.glob("*.tmp"))


def test_nan_in_a_checkpoint_names_file_and_tensor_and_stops_or_skips(tmp_path):
    gen = torch.Generator().manual_seed(4)
    base, tuned = _generic_pair(tmp_path, {"a.fc.weight": _low_rank(32, 32, 2, 0, gen),
                                           "b.fc.weight": _low_rank(32, 32, 2, 0, gen)})
    broken = load_file(str(tuned))
    broken["a.fc.weight"][3, 3] = float("nan")
    st_save_file(broken, str(tuned))
    with pytest.raises(CheckpointError, match=r"tuned\.safetensors \[a\.fc\.weight\]: has NaN or Inf values"):
        extract(base, tuned, tmp_path / "n.safetensors", progress=False)
    assert not (tmp_path / "n.safetensors").exists() and not list(tmp_path.glob("*.tmp"))
    report = extract(base, tuned, tmp_path / "n.safetensors", progress=False, on_nonfinite="skip")
    assert [layer.name for layer in report.skipped] == ["a.fc"] and "NaN" in report.skipped[0].skipped
    assert set(load_file(str(tmp_path / "n.safetensors"))) == {"diffusion_model.b.fc.lora_down.weight",
                                                               "diffusion_model.b.fc.lora_up.weight",
                                                               "diffusion_model.b.fc.alpha"}


def test_refuses_to_overwrite_an_input(tmp_path):
    gen = torch.Generator().manual_seed(4)
    base, tuned = _generic_pair(tmp_path, {"a.fc.weight": _low_rank(32, 32, 2, 0, gen)})
    before = tuned.read_bytes()
    with pytest.raises(CheckpointError, match="output path is one of the inputs"):
        extract(base, tuned, tuned, progress=False)
    assert tuned.read_bytes() == before


def test_diffusers_format_extraction_splits_fused_qkv(tmp_path):
    base, tuned, _ = make_zimage_pair(tmp_path, Z, rank=4, dtype=torch.float32)
    extract(base, tuned, tmp_path / "d.safetensors", rank=8, format="diffusers", progress=False)
    keys = set(load_file(str(tmp_path / "d.safetensors")))
    assert "transformer.layers.0.attention.to_k.lora_A.weight" in keys
    assert not any(k.endswith(".alpha") or ".qkv." in k for k in keys)


def test_cli_extract_and_demo(tmp_path, capsys):
    base, tuned, _ = make_zimage_pair(tmp_path, Z, rank=4)
    out = tmp_path / "cli.safetensors"
    assert main(["extract", str(base), str(tuned), "-o", str(out), "--rank", "8", "--alpha", "4", "-q"]) == 0
    text = capsys.readouterr().out
    assert "20 layers extracted" in text and f"wrote {out}" in text
    assert main(["demo", "-o", str(tmp_path / "demo"), "-q", "--json"]) == 0
    assert '"identical": false' in capsys.readouterr().out
    assert (tmp_path / "demo" / "demo_lora.safetensors").exists()
    assert main(["extract", str(base), str(base), "-o", str(tmp_path / "x.safetensors"), "-q"]) == 1
    assert "identical" in capsys.readouterr().out


def test_subtract_matches_float_subtraction_for_every_input_dtype():
    from lora_colab.extraction.differences import subtract_
    gen = torch.Generator().manual_seed(9)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        a, b = torch.randn(300, 70, generator=gen), torch.randn(300, 70, generator=gen).to(dtype)
        assert torch.equal(subtract_(a.clone(), b, chunk_bytes=1000), a - b.float())
    conv = torch.randn(8, 4, 3, 3, generator=gen)
    other = torch.randn(8, 4, 3, 3, generator=gen).bfloat16()
    assert torch.equal(subtract_(conv.clone(), other, chunk_bytes=100), conv - other.float())


def test_two_runs_writing_one_output_at_once_leave_one_complete_file(tmp_path):
    """Each run's temporary files are its own: two extractions (rank 8 and rank 4) on one output, interleaved
    layer by layer, both finish; the file left is one run's, whole: one rank throughout, reproducing the
    planted change, and no temporary file remains."""
    import threading
    base, tuned, _ = make_zimage_pair(tmp_path, Z, rank=4, dtype=torch.float32)
    out = tmp_path / "same.safetensors"
    turn = threading.Barrier(2)

    def step(layer):
        try:
            turn.wait(timeout=10)  # the two runs advance together, layer by layer
        except threading.BrokenBarrierError:
            pass

    reports, errors = {}, []

    def run(rank):
        try:
            reports[rank] = extract(base, tuned, out, rank=rank, clamp_quantile=None, dtype="fp32", progress=False,
                                    on_layer=step, device="cpu")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(r,)) for r in (8, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and set(reports) == {8, 4}
    lora = load_file(str(out))
    ranks = {v.shape[0] for k, v in lora.items() if k.endswith("lora_down.weight")}
    assert len(ranks) == 1 and ranks <= {8, 4}
    architecture, targets, deltas = true_differences(base, tuned)
    products = lora_products(out, architecture, targets)
    for key, delta in deltas.items():
        assert float((delta - products[key]).norm() / delta.norm()) < 1e-4, key
    assert not list(tmp_path.glob("*.tmp"))


def test_an_unknown_single_file_says_which_clients_load_its_lora(tmp_path):
    gen = torch.Generator().manual_seed(4)
    base, tuned = _generic_pair(tmp_path, {"a.fc.weight": _low_rank(32, 32, 2, 0, gen)})
    report = extract(base, tuned, tmp_path / "g.safetensors", rank=2, progress=False, device="cpu")
    assert report.format == "comfy" and set(load_file(str(tmp_path / "g.safetensors"))) >= {
        "diffusion_model.a.fc.lora_down.weight", "diffusion_model.a.fc.lora_up.weight"}
    note = next(w for w in report.warnings if w.startswith("architecture not recognised"))
    assert "ComfyUI's generic rule loads" in note and "diffusers and kohya's tools do not know it" in note



@pytest.mark.parametrize("capability,bf16", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_a_gpu_multiplies_in_bf16_only_where_it_has_bf16_units(monkeypatch, capability, bf16):
    """Colab's T4 (compute capability 7.5) has no bf16 matrix units: its products stay float32, even where
    the CPU's bf16 choice is forced on; Ampere and later (8.0+) factor a bf16 pair's bf16 difference."""
    from lora_colab.lowrank.factor import bf16_products_fast
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setenv("LORA_COLAB_BF16_SKETCH", "1")
    assert bf16_products_fast(torch.device("cuda")) is bf16
    assert bf16_products_fast("cuda:0") is bf16
    monkeypatch.setenv("LORA_COLAB_GPU_BF16", "0")  # the float32 path on any GPU (what the bench times as a T4's)
    assert bf16_products_fast("cuda") is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("capability", [(7, 5), (8, 0)])
def test_cuda_extraction_follows_the_gpus_capability_within_bounded_vram(tmp_path, monkeypatch, capability):
    """On a GPU forced to a T4's capability the factorisation never multiplies in bf16, on one of 8.0 it does
    (a bf16 pair's bf16 difference); both give the planted change, and the GPU holds about the largest
    layer's difference and its factors, not the model."""
    import lora_colab.lowrank.factor as factor
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    calls, real = [], factor.low_rank_bf16
    monkeypatch.setattr(factor, "low_rank_bf16", lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
    base, tuned, _ = make_zimage_pair(tmp_path, ZImageConfig(dim=512, n_layers=2, n_refiner_layers=1, n_heads=4,
                                                             cap_feat_dim=64), rank=4, noise=0.0)
    torch.cuda.reset_peak_memory_stats()
    report = extract(base, tuned, tmp_path / "lora.safetensors", rank=8, clamp_quantile=None, dtype="fp32",
                     device="cuda", progress=False)
    assert report.device.startswith("cuda") and bool(calls) == (capability >= (8, 0))
    architecture, targets, deltas = true_differences(base, tuned)
    products = lora_products(tmp_path / "lora.safetensors", architecture, targets)
    for key, delta in deltas.items():
        assert float((products[key] - delta).norm() / delta.norm()) < 0.01, key
    largest = max(math.prod(t.shape) for t in targets) * 4
    assert torch.cuda.max_memory_allocated() < 6 * largest + (64 << 20)
