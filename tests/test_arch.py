import re

import pytest
import torch
from safetensors.torch import save_file as st_save_file

from lora_colab import CheckpointError, arch
from lora_colab.arch.canonical import CanonicalCheckpoint, open_canonical, pair
from lora_colab.io.opener import open_checkpoint
from lora_colab.lora.formats import build_metadata, module_specs, module_tensors
from lora_colab.notebook.synthetic import ZImageConfig, write_checkpoint, zimage_specs

from comfy_rules import clip_key_map, unet_key_map
from conftest import load_layout

SMALL_Z = ZImageConfig(dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=16)


class KeysOnly:
    """Just enough of a checkpoint for CanonicalCheckpoint: key names and shapes, no data."""

    def __init__(self, entries):
        self._shapes = {k: tuple(s) for k, s, *_ in entries}
        self.path = "<layout>"

    def keys(self):
        return list(self._shapes)

    def shape(self, key):
        return self._shapes[key]

    def st_dtype(self, key):
        return "BF16"


def canonical_of(layout_name, prefix=""):
    return CanonicalCheckpoint(KeysOnly([(prefix + k, s) for k, s, _ in load_layout(layout_name)]))


@pytest.mark.parametrize("layout,arch_name,layout_kind,prefix", [
    ("zimage-single-file", "zimage", "single-file", ""),
    ("zimage-diffusers", "zimage", "diffusers", ""),
    ("flux1-dev-bfl", "flux", "bfl", ""),
    ("flux1-dev-diffusers", "flux", "diffusers", ""),
    ("sdxl-single-file", "sdxl", "single-file", "model.diffusion_model."),
])
def test_detects_every_real_layout(layout, arch_name, layout_kind, prefix):
    found = arch.detect([k for k, _, _ in load_layout(layout)])
    assert (found.arch.name, found.layout, found.prefix) == (arch_name, layout_kind, prefix)


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model.", "transformer."])
def test_strips_checkpoint_prefixes(prefix):
    z = canonical_of("zimage-single-file", prefix)
    assert z.detected.prefix == prefix and "layers.0.attention.qkv.weight" in z
    f = canonical_of("flux1-dev-bfl", prefix)
    assert f.detected.prefix == prefix and "single_blocks.37.linear1.weight" in f


def test_zimage_layouts_share_canonical_targets():
    single, diffusers = canonical_of("zimage-single-file"), canonical_of("zimage-diffusers")
    t_single = single.arch.targets(single.shapes())
    t_diff = diffusers.arch.targets(diffusers.shapes())
    assert len(t_single) == 170
    assert {(t.key, t.shape) for t in t_single} == {(t.key, t.shape) for t in t_diff}
    assert diffusers.sources("layers.3.attention.qkv.weight") == [
        "layers.3.attention.to_q.weight", "layers.3.attention.to_k.weight", "layers.3.attention.to_v.weight"]
    assert diffusers.shape("layers.3.attention.qkv.weight") == (11520, 3840)
    assert len(single.arch.targets(single.shapes(), groups={"adaln"})) == 170 + 32


def test_flux_layouts_share_canonical_targets():
    bfl, diffusers = canonical_of("flux1-dev-bfl"), canonical_of("flux1-dev-diffusers")
    t_bfl = bfl.arch.targets(bfl.shapes())
    assert len(t_bfl) == 19 * 8 + 38 * 2
    assert {(t.key, t.shape) for t in t_bfl} == {(t.key, t.shape) for t in diffusers.arch.targets(diffusers.shapes())}
    with_mod = bfl.arch.targets(bfl.shapes(), groups={"modulation"})
    assert len(with_mod) == 19 * 10 + 38 * 3
    assert diffusers.sources("single_blocks.5.linear1.weight") == [
        "single_transformer_blocks.5.attn.to_q.weight", "single_transformer_blocks.5.attn.to_k.weight",
        "single_transformer_blocks.5.attn.to_v.weight", "single_transformer_blocks.5.proj_mlp.weight"]


def test_sdxl_targets_match_kohya_counts_and_names():
    sdxl = canonical_of("sdxl-single-file")
    targets = sdxl.arch.targets(sdxl.shapes())
    by_component = {c: [t for t in targets if t.component == c] for c in ("model", "te1", "te2")}
    assert len(by_component["model"]) == 722
    assert len(by_component["te1"]) == 72
    names = [m.name for t in targets for m in sdxl.arch.lora_modules(t, "kohya")]
    assert len(names) == len(set(names)) == 722 + 72 + 192
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_te1_text_model_encoder_layers_11_mlp_fc2" in names
    assert "lora_te2_text_model_encoder_layers_31_self_attn_v_proj" in names
    assert not sdxl.arch.targets(sdxl.shapes(), text_encoders=False)[-1].component.startswith("te")
    conv = sdxl.arch.targets(sdxl.shapes(), conv=True)
    assert len(conv) > len(targets)
    kxk = [t for t in conv if t.kind == "conv"]
    assert kxk and all(len(t.shape) == 4 and t.shape[2:] == (3, 3) for t in kxk)


def test_norms_embeddings_and_biases_are_never_targets():
    for layout in ("zimage-single-file", "flux1-dev-bfl", "sdxl-single-file"):
        c = canonical_of(layout)
        for t in c.arch.targets(c.shapes(), groups=set(c.arch.optional_groups), conv=True):
            assert t.key.endswith((".weight", "in_proj_weight")), t.key
            assert not re.search(r"norm|embed|\.bias", t.module), t.key


def _emitted(c, fmt, **opts):
    targets = c.arch.targets(c.shapes(), **opts)
    return targets, [(t, m) for t in targets for m in c.arch.lora_modules(t, fmt)]


@pytest.mark.parametrize("layout,fmt", [
    (layout, fmt) for layout in ("zimage-single-file", "zimage-diffusers", "flux1-dev-bfl", "sdxl-single-file")
    for fmt in ("kohya", "comfy")] + [("zimage-single-file", "diffusers"), ("flux1-dev-bfl", "diffusers")])
def test_every_emitted_name_patches_exactly_its_weight_in_comfyui(layout, fmt):
    c = canonical_of(layout)
    opts = {"groups": set(c.arch.optional_groups), "conv": True}
    targets, emitted = _emitted(c, fmt, **opts)
    model = {k[len("model.diffusion_model."):] if c.arch.name == "sdxl" else k: s
             for k, s in c.shapes().items() if c.arch.name != "sdxl" or k.startswith("model.diffusion_model.")}
    key_map = unet_key_map(c.arch.name, model)
    if c.arch.name == "sdxl":
        key_map.update(clip_key_map("lora_te1", 12))
        key_map.update(clip_key_map("lora_te2", 32))
    patched = set()
    for target, module in emitted:
        assert module.name in key_map, module.name
        weight, piece = key_map[module.name]
        if target.component == "model":
            local = target.key[len("model.diffusion_model."):] if c.arch.name == "sdxl" else target.key
            assert weight == local, (module.name, weight)
            rows = module.rows or (0, target.shape[0])
            assert piece in (None, (rows[0], rows[1] - rows[0])), module.name
            if piece is None:
                assert module.rows is None
        assert (weight, piece) not in patched, module.name
        patched.add((weight, piece))
    assert len(patched) == len(emitted)


def test_zimage_formats_name_what_each_client_expects():
    c = canonical_of("zimage-single-file")
    qkv = next(t for t in c.arch.targets(c.shapes()) if t.key == "layers.0.attention.qkv.weight")
    out = next(t for t in c.arch.targets(c.shapes()) if t.key == "layers.0.attention.out.weight")
    assert [m.name for m in c.arch.lora_modules(qkv, "kohya")] == ["lora_unet_layers_0_attention_qkv"]
    assert [m.name for m in c.arch.lora_modules(qkv, "comfy")] == ["diffusion_model.layers.0.attention.qkv"]
    diff = c.arch.lora_modules(qkv, "diffusers")
    assert [(m.name, m.rows) for m in diff] == [
        ("transformer.layers.0.attention.to_q", (0, 3840)), ("transformer.layers.0.attention.to_k", (3840, 7680)),
        ("transformer.layers.0.attention.to_v", (7680, 11520))]
    assert c.arch.lora_modules(out, "diffusers")[0].name == "transformer.layers.0.attention.to_out.0"
    assert arch.resolve_format(c.arch, "auto") == "kohya"


def test_split_factors_reassemble_the_fused_delta():
    c = canonical_of("zimage-single-file")
    target = next(t for t in c.arch.targets(c.shapes()) if t.key == "layers.0.attention.qkv.weight")
    small = type(target)(target.key, target.module, (96, 32), splits=(("to_q", 0, 32), ("to_k", 32, 64),
                                                                     ("to_v", 64, 96)))
    gen = torch.Generator().manual_seed(1)
    down, up = torch.randn(4, 32, generator=gen), torch.randn(96, 4, generator=gen)
    for fmt in ("kohya", "diffusers"):
        tensors = module_tensors(c.arch, fmt, small, down, up, alpha=2.0, dtype=torch.float32)
        specs = module_specs(c.arch, fmt, small, 4, torch.float32)
        assert {n: (tuple(s), d) for n, d, s in specs} == {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}
        delta = 0.5 * up @ down
        if fmt == "kohya":
            got = 2.0 / 4 * tensors["lora_unet_layers_0_attention_qkv.lora_up.weight"] @ \
                tensors["lora_unet_layers_0_attention_qkv.lora_down.weight"]
            assert tensors["lora_unet_layers_0_attention_qkv.alpha"].shape == ()
        else:
            got = torch.cat([tensors[f"transformer.layers.0.attention.to_{p}.lora_B.weight"]
                             @ tensors[f"transformer.layers.0.attention.to_{p}.lora_A.weight"] for p in "qkv"])
            assert not any(n.endswith(".alpha") for n in tensors)
        torch.testing.assert_close(got, delta, rtol=1e-5, atol=1e-6)


def test_metadata_says_dynamic_when_ranks_differ():
    a = arch.get("sdxl")
    meta = build_metadata(a, "kohya", [8, 8], [4, 4], "my_lora")
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "4"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", meta["modelspec.date"])
    dyn = build_metadata(a, "kohya", [8, 4], [4, 4], "x", conv_ranks=[2], conv_alphas=[1])
    assert dyn["ss_network_dim"] == dyn["ss_network_alpha"] == "Dynamic"
    assert dyn["ss_network_args"] == '{"conv_dim": "2", "conv_alpha": "1"}'


def test_metadata_date_is_source_date_epoch_where_set(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1796601600")
    assert build_metadata(arch.get("flux"), "comfy", [4], [4], "x")["modelspec.date"] == "2026-12-07T00:00:00+00:00"


# --- reading across layouts, fused parts and quantisation -------------------------------------

def _gaussian(seed):
    gen = torch.Generator().manual_seed(seed)
    return lambda key, shape: torch.randn(shape, generator=gen)


def test_cross_layout_reads_are_identical_and_read_only_needed_rows(tmp_path):
    single = write_checkpoint(tmp_path / "z.safetensors", zimage_specs(SMALL_Z), _gaussian(0))
    with open_checkpoint(single) as ckpt:
        tensors = {k: ckpt.read(k) for k in ckpt.keys()}
    diffusers = {}
    for key, shape in zimage_specs(SMALL_Z, "diffusers"):
        native = key.replace("all_x_embedder.2-1", "x_embedder").replace("all_final_layer.2-1", "final_layer")
        native = native.replace("to_out.0", "out").replace("norm_q", "q_norm").replace("norm_k", "k_norm")
        hit = re.fullmatch(r"(.*)\.to_([qkv])\.weight", key)
        if hit:
            i = "qkv".index(hit.group(2))
            diffusers[key] = tensors[hit.group(1) + ".qkv.weight"][i * 32:(i + 1) * 32].clone()
        else:
            diffusers[key] = tensors[native].clone()
    folder = tmp_path / "diffusers" / "transformer"
    folder.mkdir(parents=True)
    st_save_file(diffusers, str(folder / "diffusion_pytorch_model.safetensors"))
    with open_canonical(single) as a, open_canonical(tmp_path / "diffusers") as b:
        assert b.detected.layout == "diffusers"
        targets = a.arch.targets(a.shapes())
        pair(a, b, targets)
        for t in targets:
            assert torch.equal(a.read(t.key), b.read(t.key)), t.key
        before = b.ckpt.bytes_read
        k_rows = b.read("layers.1.attention.qkv.weight", rows=(32, 64))
        assert b.ckpt.bytes_read - before == 32 * 32 * 2  # only to_k was read
        assert torch.equal(k_rows, a.read("layers.1.attention.qkv.weight")[32:64])
        before = a.ckpt.bytes_read
        a.read("layers.1.attention.qkv.weight", rows=(40, 50))
        assert a.ckpt.bytes_read - before == 10 * 32 * 2


def test_pairing_errors_name_the_tensor(tmp_path):
    base = write_checkpoint(tmp_path / "a.safetensors", zimage_specs(SMALL_Z), _gaussian(0))
    wider = ZImageConfig(dim=48, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=16)
    other = write_checkpoint(tmp_path / "b.safetensors", zimage_specs(wider), _gaussian(0))
    fewer = ZImageConfig(dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, cap_feat_dim=16)
    short = write_checkpoint(tmp_path / "c.safetensors", zimage_specs(fewer), _gaussian(0))
    flux = tmp_path / "f.safetensors"
    st_save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}, str(flux))
    with open_canonical(base) as a:
        targets = a.arch.targets(a.shapes())
        with open_canonical(other) as b, pytest.raises(CheckpointError, match=(
                r"b\.safetensors: is Z-Image \(single-file\), width 48, 20 target layers but the base \S*a\.safetensors "
                r"is Z-Image \(single-file\), width 32, 20 target layers: another variant of the model \(20 layers "
                r"differ in shape, first noise_refiner\.0\.attention\.qkv\.weight \[144, 48\] vs \[96, 32\]\)")):
            pair(a, b, targets)
        with open_canonical(short) as c, pytest.raises(CheckpointError, match=r"\[layers\.1\.attention\.qkv\.weight"
                                                                              r"\]: missing"):
            pair(a, c, targets)
        with open_canonical(flux) as f, pytest.raises(CheckpointError, match=r"is Flux\.1 \(bfl\) but the base"):
            pair(a, f, targets)


def test_fp8_scaled_and_comfy_quant_are_dequantised(tmp_path):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(8, 4, generator=gen)
    fp8 = w.to(torch.float8_e4m3fn)
    quant_json = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
    st_save_file({"layers.0.attention.qkv.weight": fp8, "layers.0.attention.out.weight": fp8.clone(),
                  "layers.0.attention.out.scale_weight": torch.tensor(0.5),
                  "layers.0.feed_forward.w1.weight": fp8.clone(),
                  "layers.0.feed_forward.w1.comfy_quant": quant_json,
                  "layers.0.feed_forward.w1.weight_scale": torch.tensor(0.25),
                  "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, str(tmp_path / "q.safetensors"))
    with open_canonical(tmp_path / "q.safetensors") as c:
        assert c.arch.name == "zimage"
        assert torch.equal(c.read("layers.0.attention.qkv.weight"), fp8.float())
        assert torch.equal(c.read("layers.0.attention.out.weight"), fp8.float() * 0.5)
        assert torch.equal(c.read("layers.0.attention.out.weight", rows=(2, 5)), fp8.float()[2:5] * 0.5)
        assert torch.equal(c.read("layers.0.feed_forward.w1.weight"), fp8.float() * 0.25)
        assert not any("scale" in k or "quant" in k for k in c.keys())
        assert c.dequant.is_quantized("layers.0.attention.out.weight")


@pytest.mark.parametrize("extra,message", [
    ({"layers.0.attention.qkv.absmax": torch.zeros(2)}, "unsupported quantization: bitsandbytes NF4/FP4"),
    ({"layers.0.attention.qkv.weight_scale_2": torch.zeros(1)}, "unsupported quantization: NVFP4"),
    ({"layers.0.attention.qkv.qweight": torch.zeros(2, dtype=torch.int32), "layers.0.attention.qkv.wscales":
      torch.zeros(2)}, "unsupported quantization: SVDQuant"),
    ({"layers.0.attention.qkv.smooth_factor": torch.zeros(2)}, "a Nunchaku checkpoint; give the bf16, fp8 or GGUF"),
    ({"layers.0.attention.qkv.comfy_quant": torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)},
     "NVFP4 weight without layers.0.attention.qkv.weight_scale"),
    ({"layers.0.attention.qkv.comfy_quant": torch.tensor(list(b'{"format": "int4_awq"}'), dtype=torch.uint8)},
     "unsupported quantization: comfy_quant format 'int4_awq'"),
    ({"layers.0.attention.qkv.comfy_quant": torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8),
      "layers.0.attention.qkv.weight_scale": torch.ones(2, 2)},
     "unsupported quantization: a scale of 4 values does not divide the weight's 6 rows"),
])
def test_other_quantisations_are_refused_by_name(tmp_path, extra, message):
    tensors = {"layers.0.attention.qkv.weight": torch.zeros(6, 2).to(torch.float8_e4m3fn), **extra}
    st_save_file(tensors, str(tmp_path / "q.safetensors"))
    with pytest.raises(CheckpointError, match=re.escape(message)):
        open_canonical(tmp_path / "q.safetensors")


def test_a_gguf_too_short_for_its_header_is_one_line(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="m.gguf: is 4 bytes, too short for a GGUF header"):
        open_canonical(tmp_path / "m.gguf")
    (tmp_path / "n.gguf").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="n.gguf: is not a GGUF file"):
        open_canonical(tmp_path / "n.gguf")


def test_sdxl_clip_l_with_and_without_text_model_level_give_the_same_targets():
    """shared/layouts' SDXL file spells CLIP-L `...transformer.text_model.encoder...` as real files do;
    some older files drop `text_model.`. Both map to the same canonical targets and kohya names."""
    entries = {k: tuple(s) for k, s, _ in load_layout("sdxl-single-file")}
    with_level = [k for k in entries if k.startswith("conditioner.embedders.0.transformer.text_model.")]
    assert len(with_level) > 190
    without = {k.replace("conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.0.transformer."): s
               for k, s in entries.items()}
    results = []
    for shapes in (entries, without):
        sdxl = arch.detect(set(shapes))
        cmap = sdxl.arch.canonical_map(list(shapes), sdxl.layout, sdxl.prefix)
        canonical = {key: shapes[sources[0]] for key, sources in cmap.sources.items()}
        targets = sdxl.arch.targets(canonical)
        results.append(sorted((t.key, t.shape, m.name) for t in targets if t.component == "te1"
                              for m in sdxl.arch.lora_modules(t, "kohya")))
    assert results[0] == results[1] and len(results[0]) == 72
