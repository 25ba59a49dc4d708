"""Base-aware rank at extraction: a recipe (the resizer's grammar) chooses each layer's directions from its
top `rank`, relative to the base's own weights, in the one pass; checked against scores computed here
from exact norms, an exact size target, and the bad inputs."""

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import lora_colab.extraction.differences as differences_module
import lora_colab.extraction.run as run_module
from lora_colab import OptionError, arch, extract
from lora_colab.arch.canonical import open_canonical
from lora_colab.cli import main
from lora_colab.configs import ExtractConfig
from lora_colab.lowrank.recipes import RecipeError
from lora_colab.notebook.synthetic import ZImageConfig, make_zimage_pair
from lora_colab.io.safetensors import planned_size

CFG = ZImageConfig(dim=128, n_layers=2, n_refiner_layers=1, n_heads=4, cap_feat_dim=32)
CAP = 12


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    base, tuned, _ = make_zimage_pair(folder, CFG, rank=6, noise=0.004, delta_scale=0.05)
    plain = extract(base, tuned, folder / "plain.safetensors", rank=CAP, clamp_quantile=None, dtype="fp32",
                    progress=False, device="cpu")
    factors = load_file(str(folder / "plain.safetensors"))
    with open_canonical(base) as view:
        weights = {t.key: view.read(t.key) for t in arch.get("zimage").targets(view.shapes())}
    return base, tuned, plain, factors, weights


def kohya(name):
    return "lora_unet_" + name.replace(".", "_")


def plain_directions(pair, layer):
    """σ and unit singular vectors of a layer from the plain rank-CAP extraction (up = U√S, down = √S Vᵀ)."""
    _, _, plain, factors, _ = pair
    found = next(x for x in plain.extracted if x.name == layer.name)
    up, down = factors[kohya(layer.name) + ".lora_up.weight"], factors[kohya(layer.name) + ".lora_down.weight"]
    return torch.tensor(found.singular_values, dtype=torch.float64), up / up.norm(dim=0), (down.T / down.norm(dim=1))


def expected_kept(pair, layer, score_of, thr):
    """Which of the layer's top-CAP directions score at or above `thr`."""
    s, u, v = plain_directions(pair, layer)
    scores = score_of(s, u, v, pair[4][layer.name + ".weight"].double())
    assert not bool(((scores - thr).abs() < 1e-3).any()), "a score too close to the threshold to check"
    return scores >= thr


SCORES = {
    "spn_ckpt": lambda s, u, v, w: torch.log10(s) - torch.log10(torch.linalg.matrix_norm(w, ord=2)),
    "fro_ckpt": lambda s, u, v, w: torch.log10(s) - torch.log10(w.norm()),
    "subspace": lambda s, u, v, w: torch.log10(s) - torch.log10(((u.double().T @ w) * v.double().T).sum(1).abs()),
}


@pytest.mark.parametrize("key", sorted(SCORES))
def test_a_threshold_keeps_the_directions_scoring_above_it_against_exact_base_norms(tmp_path, pair, key):
    base, tuned, plain, factors, _ = pair
    all_scores = torch.cat([SCORES[key](*plain_directions(pair, layer), pair[4][layer.name + ".weight"].double())
                            for layer in plain.extracted])
    thr = float(all_scores.median())
    for _ in range(50):  # nudge off any score
        if not bool(((all_scores - thr).abs() < 1e-3).any()):
            break
        thr += 0.0011
    report = extract(base, tuned, tmp_path / "r.safetensors", rank=CAP, recipe=f"{key}=1,thr={thr}",
                     clamp_quantile=None, dtype="fp32", progress=False, device="cpu")
    out = load_file(str(tmp_path / "r.safetensors"))
    kept_total = 0
    for layer in report.layers:
        mask = expected_kept(pair, layer, SCORES[key], thr)
        want = int(mask.sum())
        assert layer.rank == want or (want == 0 and layer.skipped), (layer.name, layer.rank, want)
        kept_total += want
        if want:  # the kept directions are those of the plain extraction, factors included
            name = kohya(layer.name)
            scale = float(out[name + ".alpha"]) / want  # one alpha per file: the factors carry the rest
            got = scale * out[name + ".lora_up.weight"] @ out[name + ".lora_down.weight"]
            ref = factors[name + ".lora_up.weight"][:, mask] @ factors[name + ".lora_down.weight"][mask]
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))
    assert 0 < kept_total < CAP * len(report.layers)
    assert report.directions == (kept_total, CAP * len(report.layers))
    assert f"recipe {key}=1,thr={thr}: kept {kept_total} of" in str(report)
    assert safe_open(str(tmp_path / "r.safetensors"), "pt").metadata()["lora_colab.recipe"] == f"{key}=1,thr={thr}"
    assert report.bytes_read == plain.bytes_read  # one pass: nothing read twice


def test_kohya_methods_choose_per_layer(tmp_path, pair):
    base, tuned, plain, _, _ = pair
    report = extract(base, tuned, tmp_path / "f.safetensors", rank=CAP, recipe="sv_fro=0.9", progress=False,
                     device="cpu")
    for layer in report.layers:
        s = torch.tensor(next(x for x in plain.extracted if x.name == layer.name).singular_values, dtype=torch.float64)
        frac = torch.cumsum(s ** 2, 0) / layer.diff_norm ** 2  # of the whole difference, not the top CAP
        assert layer.rank == int((frac < 0.81 - 1e-12).sum()) + 1
    fixed = extract(base, tuned, tmp_path / "k.safetensors", recipe="rank=5", progress=False, device="cpu")
    assert {layer.rank for layer in fixed.layers} == {5}


def test_a_size_target_is_met_exactly(tmp_path, pair):
    base, tuned, _, _, _ = pair
    z = arch.get("zimage")
    with open_canonical(base) as view:
        shapes = {t.module: t.shape for t in z.targets(view.shapes())}
    full = extract(base, tuned, tmp_path / "full.safetensors", rank=CAP, progress=False, device="cpu").output_bytes
    for fraction in (0.4, 0.7):
        target_mib = round(fraction * full / 2**20, 4)
        out = tmp_path / f"s{target_mib}.safetensors"
        report = extract(base, tuned, out, rank=CAP, recipe=f"spn_ckpt=1,size={target_mib}", progress=False,
                         device="cpu")
        target = int(target_mib * 2**20)
        assert out.stat().st_size == report.output_bytes <= target
        tensors = load_file(str(out))
        meta = {k: v for k, v in safe_open(str(out), "pt").metadata().items() if not k.startswith("sshs_")}
        specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
        grew = 0
        for layer in report.layers:
            if layer.rank == CAP:
                continue
            grown, name, k = dict(specs), kohya(layer.name), (0 if layer.skipped else layer.rank) + 1
            m, n = shapes[layer.name]
            grown[name + ".lora_down.weight"] = (torch.bfloat16, (k, n))
            grown[name + ".lora_up.weight"] = (torch.bfloat16, (m, k))
            grown[name + ".alpha"] = (torch.float32, ())
            assert planned_size([(x, d, sh) for x, (d, sh) in grown.items()], meta, True) > target, layer.name
            grew += 1
        assert grew  # the target was binding


def test_a_recipe_that_selects_nothing_writes_no_file(tmp_path, pair, capsys):
    base, tuned, _, _, _ = pair
    out = tmp_path / "none.safetensors"
    report = extract(base, tuned, out, rank=4, recipe="spn_ckpt=1,thr=5", progress=False, device="cpu")
    assert report.nothing_selected and not report.output and not out.exists() and not report.identical
    assert "selects no direction of any layer: no LoRA written" in str(report)
    # the report shows what was kept, nothing: no ranks or errors of directions never written
    assert not report.extracted and all(layer.rank == 0 for layer in report.layers)
    assert "ranks" not in str(report) and "worst relative error" not in str(report)
    assert not list(tmp_path.glob("*.tmp"))
    assert main(["extract", str(base), str(tuned), "-o", str(out), "--rank", "4", "--recipe", "spn_ckpt=1,thr=5",
                 "-q"]) == 1
    assert "selects no direction" in capsys.readouterr().out


def test_a_recipe_rank_under_the_cap_keeps_that_rank(tmp_path, pair):
    base, tuned, plain, _, _ = pair
    report = extract(base, tuned, tmp_path / "r.safetensors", rank=CAP, recipe="rank=5", progress=False,
                     device="cpu")
    assert {layer.rank for layer in report.extracted} == {5} and len(report.extracted) == len(plain.extracted)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(recipe="spn_ckpt=1,size=0.0001"), OptionError, r"size=0\.0001 MiB is smaller than the file's header"),
    (dict(recipe="rank=64"), OptionError, r"recipe 'rank=64' keeps up to 64 directions per layer, above the rank "
                                          r"cap \(--rank, 32 by default\): give --rank 64 too"),
    (dict(recipe="rank=16", rank=8), OptionError, r"above the rank cap \(--rank 8\)"),
    (dict(recipe="spn_ckpt=1,size=0.001"), OptionError, r"size=0\.001 MiB is smaller than the smallest LoRA of this "
                                                        r"model \(\d+\.\d KiB: one direction of its smallest module\)"),
    (dict(recipe="spn_ckpt=1,thr=-2", energy=0.9), OptionError, r"energy and recipe .* both choose the ranks"),
    (dict(recipe="rank=4:rank=8"), RecipeError, r"extraction takes one recipe"),
    (dict(recipe="spn_ckpt=1"), RecipeError, r"give exactly one selection"),
])
def test_bad_recipes_are_one_line_and_read_nothing(tmp_path, pair, monkeypatch, kwargs, error, message):
    base, tuned, _, _, _ = pair
    monkeypatch.setattr(run_module, "Differences", None)  # reading anything would fail
    with pytest.raises(error, match=message):
        extract(base, tuned, tmp_path / "x.safetensors", progress=False, device="cpu", **kwargs)
    assert not list(tmp_path.iterdir())


def test_blocked_layers_keep_their_base_from_the_same_reads(tmp_path, pair, monkeypatch):
    base, tuned, _, _, _ = pair
    recipe = "spn_ckpt=1,fro_ckpt=0.5,thr=-2.2"
    whole = extract(base, tuned, tmp_path / "w.safetensors", rank=CAP, recipe=recipe, progress=False, device="cpu")
    monkeypatch.setattr(differences_module, "BLOCKED_BYTES", 1)  # every layer built by row blocks
    blocked = extract(base, tuned, tmp_path / "b.safetensors", rank=CAP, recipe=recipe, progress=False, device="cpu")
    assert [x.rank for x in blocked.layers] == [x.rank for x in whole.layers]
    assert blocked.bytes_read == whole.bytes_read
    assert math.isclose(blocked.threshold, whole.threshold)


def test_cli_and_notebook_take_a_recipe(tmp_path, pair, capsys):
    base, tuned, _, _, _ = pair
    out = tmp_path / "c.safetensors"
    assert main(["extract", str(base), str(tuned), "-o", str(out), "--recipe", "fro_ckpt=1,size=0.2", "-q"]) == 0
    assert "recipe fro_ckpt=1,size=0.2: kept" in capsys.readouterr().out
    assert out.stat().st_size <= 0.2 * 2**20
    assert ExtractConfig(recipe="spn_ckpt=1,size=50").extract_kwargs()["recipe"] == "spn_ckpt=1,size=50"
    assert ExtractConfig().extract_kwargs()["recipe"] is None


def test_the_base_norms_it_computed_serve_a_later_resize(tmp_path, pair, monkeypatch):
    from lora_colab.resizing.base_refs import BaseReferences
    monkeypatch.setenv("LORA_COLAB_CACHE", str(tmp_path / "cache"))
    base, tuned, _, _, weights = pair
    extract(base, tuned, tmp_path / "e.safetensors", rank=CAP, recipe="spn_ckpt=1,thr=-2", progress=False,
            device="cpu")
    with BaseReferences(base) as refs:
        for key, w in weights.items():
            spn, fro = refs.norms(key, None)
            assert spn == pytest.approx(float(torch.linalg.matrix_norm(w, ord=2)), rel=1e-4)
            assert fro == pytest.approx(float(w.norm()), rel=1e-5)
        assert refs.norm_reads == 0


def test_split_modules_are_scored_against_their_own_rows_of_the_base_blocked_or_not(tmp_path, pair, monkeypatch):
    """The diffusers spelling writes Z-Image's fused qkv as to_q/to_k/to_v: each is decomposed on its own and
    scored against the spectral norm of its own rows of the base weight (what a resize of that file does)."""
    from lora_colab.lora.formats import pieces
    base, tuned, _, _, weights = pair
    z = arch.get("zimage")
    with open_canonical(tuned) as view:
        changes = {key: view.read(key) - w for key, w in weights.items()}
    expected = {}  # piece label -> its top-CAP directions' spn_ckpt scores, from an exact SVD of its own change
    for target in z.targets({k: tuple(w.shape) for k, w in weights.items()}):
        for piece in pieces(z, "diffusers", target):
            rows = slice(*piece.rows)
            s = torch.linalg.svdvals(changes[target.key][rows].double())[:CAP]
            expected[piece.label] = torch.log10(s) - torch.log10(
                torch.linalg.matrix_norm(weights[target.key][rows].double(), ord=2))
    assert sum(".to_q" in label for label in expected) == 4
    every = torch.cat(list(expected.values()))
    thr = float(every.median())
    while bool(((every - thr).abs() < 1e-3).any()):
        thr += 0.0011
    runs = {}
    for label, blocked in (("whole", False), ("blocked", True)):
        if blocked:
            monkeypatch.setattr(differences_module, "BLOCKED_BYTES", 1)  # every layer built by row blocks
        runs[label] = extract(base, tuned, tmp_path / f"{label}.safetensors", rank=CAP, format="diffusers",
                              recipe=f"spn_ckpt=1,thr={thr}", clamp_quantile=None, dtype="fp32", progress=False,
                              device="cpu")
        got = {layer.name: layer.rank for layer in runs[label].layers}
        assert got == {name: int((sc >= thr).sum()) for name, sc in expected.items()}, label
    a, b = load_file(str(tmp_path / "whole.safetensors")), load_file(str(tmp_path / "blocked.safetensors"))
    assert a.keys() == b.keys()
    for name in [k for k in a if k.endswith("lora_A.weight")]:
        up = name.replace("lora_A", "lora_B")
        want = a[up] @ a[name]  # blocked layers hold the difference in bf16: agreement to its rounding
        torch.testing.assert_close(b[up] @ b[name], want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
