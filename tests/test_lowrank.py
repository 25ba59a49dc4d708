import math
import pytest
import torch

from lora_colab.lowrank.factor import (clamp_outliers, clamped_residual_sq, low_rank, low_rank_bf16, norm_sq,
                               product_change, quantile)


def test_randomized_svd_matches_exact_on_a_decaying_spectrum():
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(600, 200, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(300, 200, generator=gen))
    s = torch.arange(1, 201, dtype=torch.float32) ** -1.0
    a = (u * s) @ v.T
    uu, ss, vv = low_rank(a, 16, niter=4, oversample=8)
    assert uu.shape == (600, 16) and vv.shape == (300, 16)
    torch.testing.assert_close(ss, s[:16], rtol=2e-3, atol=0)
    best = float(s[16:].pow(2).sum().sqrt())
    ours = float((a - (uu * ss) @ vv.T).norm())
    assert ours <= 1.01 * best


@pytest.mark.parametrize("decay,rank", [(0.8, 16), (1.8, 16), (2.5, 32)])
def test_bf16_sketch_is_as_accurate_as_float32(decay, rank):
    """A bf16 pair's difference, factored by low_rank_bf16 (bf16 sketch, float32 last range product and
    projection), against the exact SVD of the exact (float32) difference: within 1.01x of the optimal
    residual, as torch.svd_lowrank on the float32 difference; ‖Δ‖² exact too."""
    gen = torch.Generator().manual_seed(3)
    m, n = 700, 500
    u, _ = torch.linalg.qr(torch.randn(m, n, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    change = (u * torch.arange(1, n + 1, dtype=torch.float32) ** -decay) @ v.T
    base = (torch.randn(m, n, generator=gen) * 0.02).bfloat16()
    tuned = (base.float() + change * (0.002 / float(change.pow(2).mean().sqrt()))).bfloat16()
    exact = tuned.float() - base.float()
    difference = tuned - base
    assert difference.dtype == torch.bfloat16
    s = torch.linalg.svdvals(exact.double())
    best = float(s[rank:].pow(2).sum().sqrt())
    for uu, ss, vv in (low_rank_bf16(difference, rank), low_rank(difference, rank)):
        assert uu.dtype == torch.float32 and uu.shape == (m, rank)
        assert float((exact - (uu * ss) @ vv.T).double().norm()) <= 1.01 * best
    fp32 = low_rank(exact, rank)
    assert float((exact - (fp32[0] * fp32[1]) @ fp32[2].T).double().norm()) <= 1.01 * best
    assert norm_sq(difference) == pytest.approx(float(exact.double().pow(2).sum()), rel=2e-3)


def test_small_matrices_take_the_exact_path():
    a = torch.randn(50, 40, generator=torch.Generator().manual_seed(1))
    uu, ss, vv = low_rank(a, 10)
    torch.testing.assert_close(ss, torch.linalg.svdvals(a)[:10])


def test_quantile_has_no_size_limit_and_is_exact():
    x = torch.arange(1, 20_000_001, dtype=torch.float32)  # over torch.quantile's 2^24 limit
    assert quantile(x, 0.99) == 19_800_000.0


def test_clamp_change_and_residual_formulas_match_brute_force():
    gen = torch.Generator().manual_seed(2)
    delta = torch.randn(300, 8, generator=gen) @ torch.randn(8, 200, generator=gen) + 0.3 * torch.randn(300, 200,
                                                                                                      generator=gen)
    delta[5, 7] += 80.0
    delta[:, 11] += 10.0
    u, s, v = low_rank(delta, 12)
    up, down = u * s.sqrt(), s.sqrt()[:, None] * v.T
    up_c, down_c, clamp = clamp_outliers(up, down, 0.95)
    assert 0 < clamp.cut_fraction < 0.1
    p, p_c = up @ down, up_c @ down_c
    assert float(p_c.abs().max()) <= float(up_c.norm(dim=1).max() * down_c.norm(dim=0).max()) + 1e-4
    assert abs(product_change(up, down, clamp) - float((p - p_c).norm() / p.norm())) < 1e-5
    brute = float((delta.double() - p_c.double()).norm() ** 2)
    assert abs(clamped_residual_sq(delta, u, s, v, clamp) - brute) < 1e-6 * float(delta.double().norm() ** 2)


def test_norm_sq_is_accurate_enough_for_residual_cancellation():
    from lora_colab.lowrank.factor import norm_sq
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4000, 3000, generator=gen) + 5.0  # large mean: a naive float32 sum drifts
    exact = float(x.double().pow(2).sum())
    assert abs(norm_sq(x) - exact) < 1e-8 * exact


@pytest.mark.parametrize("top", [
    [3.0] + [2.94] * 3,                 # σ₂/σ₁ = 0.98: power iteration stopped 0.3-2% low here
    [1.0, 0.995, 0.99, 0.985, 0.98],    # a clustered top
    [2.0, 2.0, 2.0],                    # equal top values
    [3.0, 1.0],                         # a clear gap
])
def test_spectral_norm_has_a_bounded_error_on_clustered_spectra(top):
    from lora_colab.lowrank.factor import spectral_norm
    gen = torch.Generator().manual_seed(5)
    u, _ = torch.linalg.qr(torch.randn(700, 300, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(500, 300, generator=gen))
    s = torch.cat([torch.tensor(top), torch.rand(300 - len(top), generator=gen) * 0.95 * min(top)])
    w = (u * s) @ v.T
    exact = float(torch.linalg.matrix_norm(w, ord=2))
    assert abs(spectral_norm(w) / exact - 1) < 1e-4  # its residual test's bound
    assert spectral_norm(w) <= exact * (1 + 1e-6)   # a Ritz value never exceeds σ₁
    flat = torch.randn(400, 300, generator=gen)     # no gap at all
    assert abs(spectral_norm(flat) / float(torch.linalg.matrix_norm(flat, ord=2)) - 1) < 1e-4


def test_blocked_delta_factors_like_the_full_difference(monkeypatch):
    """A difference built by row blocks into bf16 gives the same top singular values as the float32 one
    (to bf16 storage precision), with exact float32 norms, and the extractor takes that path for big layers."""
    from lora_colab.lowrank.factor import BlockedDelta, clamped_residual_sq, clamp_outliers, low_rank
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(300, 120, generator=gen)
    planted = (torch.randn(300, 6, generator=gen) * torch.logspace(0, -1, 6)) @ torch.randn(6, 120, generator=gen)
    tuned = base + 0.1 * planted + 1e-4 * torch.randn(300, 120, generator=gen)
    delta = tuned - base
    blocked = BlockedDelta.build(lambda a, b: tuned[a:b].clone(), lambda a, b: base[a:b].clone(), (300, 120),
                                 block_bytes=120 * 4 * 7)
    assert blocked.data.dtype == torch.bfloat16 and blocked.shape == (300, 120)
    assert blocked.norm_sq == pytest.approx(float(blocked.data.double().pow(2).sum()), rel=1e-6)
    assert blocked.norm_sq == pytest.approx(float(delta.double().pow(2).sum()), rel=1e-4)
    assert blocked.max_abs == pytest.approx(float(delta.abs().max()), rel=1e-6)
    spoiled = tuned.clone()
    spoiled[17, 3] = float("nan")  # in the third of several blocks: the NaN must survive the running max
    nan_blocked = BlockedDelta.build(lambda a, b: spoiled[a:b].clone(), lambda a, b: base[a:b].clone(), (300, 120),
                                     block_bytes=120 * 4 * 7)
    assert math.isnan(nan_blocked.max_abs)
    _, s_ref, _ = torch.linalg.svd(delta)
    u, s, v = low_rank(blocked, 6, niter=4, oversample=8)
    torch.testing.assert_close(s, s_ref[:6], rtol=5e-3, atol=0)
    residual = float((delta - (u * s) @ v.T).norm() / delta.norm())
    optimal = float(s_ref[6:].norm() / s_ref.norm())
    assert residual <= 1.01 * optimal + 2e-3
    up, down, clamp = clamp_outliers(u * s.sqrt(), s.sqrt()[:, None] * v.T, 0.9)
    exact = float((delta - up @ down).double().pow(2).sum())
    assert clamped_residual_sq(blocked, u, s, v, clamp, blocked.norm_sq) == pytest.approx(exact, rel=2e-2)


def test_extractor_takes_the_blocked_path_for_big_layers_with_the_same_result(tmp_path, monkeypatch):
    import lora_colab.extraction.differences as differences
    import lora_colab.extraction.extractor as extractor
    from safetensors.torch import load_file
    from lora_colab.notebook.synthetic import ZImageConfig, make_zimage_pair
    cfg = ZImageConfig(dim=64, n_layers=1, n_refiner_layers=1, n_heads=4, cap_feat_dim=32)
    base, tuned, _ = make_zimage_pair(tmp_path, cfg, rank=4, noise=1e-4)
    plain = extractor.extract(base, tuned, tmp_path / "plain.safetensors", rank=8, dtype="fp32", progress=False,
                              device="cpu")  # the blocked path is the CPU one
    built = []
    from lora_colab.lowrank.factor import BlockedDelta
    real = BlockedDelta.build
    monkeypatch.setattr(differences, "BLOCKED_BYTES", 0)
    monkeypatch.setattr(BlockedDelta, "build", classmethod(lambda cls, *a, **k: built.append(1) or
                                                                      real(*a, **k)))
    blocked = extractor.extract(base, tuned, tmp_path / "blocked.safetensors", rank=8, dtype="fp32", progress=False,
                                device="cpu")
    assert len(built) == len(plain.layers) == len(blocked.layers)
    a, b = load_file(str(tmp_path / "plain.safetensors")), load_file(str(tmp_path / "blocked.safetensors"))
    for key in [k for k in a if k.endswith("lora_down.weight")]:
        up = key.replace("lora_down", "lora_up")
        pa, pb = a[up] @ a[key], b[up] @ b[key]
        assert float((pa - pb).norm() / pa.norm()) < 1e-2, key
    from lora_colab.arch.canonical import open_canonical
    with open_canonical(base) as b_view, open_canonical(tuned) as t_view:
        truth = {t.module: float((t_view.read(t.key) - b_view.read(t.key)).abs().max())
                 for t in b_view.arch.targets(b_view.shapes())}
    for la, lb in zip(plain.layers, blocked.layers):
        assert lb.rel_error == pytest.approx(la.rel_error, abs=2e-3)
        # the blocked path's max is the float32 difference's; a bf16 pair's plain path may hold it in bf16
        assert lb.max_abs_diff == pytest.approx(truth[lb.name], rel=1e-6)
        assert la.max_abs_diff == pytest.approx(truth[la.name], rel=2 ** -8)
