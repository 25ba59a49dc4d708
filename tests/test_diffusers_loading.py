"""LoRA files we write, loaded by diffusers' own LoRA loaders into small models built from config."""

import logging

import pytest
import torch

from lora_colab.arch.common import row_index
from lora_colab import arch, save_file
from lora_colab.lora.formats import module_tensors
from lora_colab.notebook.synthetic import ZImageConfig, zimage_specs

from conftest import load_layout

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from peft.tuners.lora import LoraLayer  # noqa: E402

RANK, ALPHA = 4, 2.0


class WarningCatcher(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def diffusers_warnings():
    catcher = WarningCatcher()
    loggers = [logging.getLogger("diffusers"), logging.getLogger("peft")]
    for lg in loggers:
        lg.addHandler(catcher)
    yield catcher.messages
    for lg in loggers:
        lg.removeHandler(catcher)


class LowRank:
    """An expected delta kept as factors (scale · up @ down), so full-width models need no full matrices."""

    def __init__(self, up, down, scale, shape):
        self.up, self.down, self.scale, self.shape = up, down, scale, shape

    def full(self):
        return (self.scale * self.up @ self.down).reshape(self.shape)

    def probe(self, x):
        return self.scale * self.up @ (self.down @ x)


def write_lora(tmp_path, architecture, fmt, targets, seed=0):
    """A LoRA file with random factors for `targets`; returns path and {diffusers module: expected LowRank}."""
    gen = torch.Generator().manual_seed(seed)
    tensors, expected = {}, {}
    for target in targets:
        out_features = target.shape[0]
        in_features = 1
        for d in target.shape[1:]:
            in_features *= d
        down = torch.randn(RANK, in_features, generator=gen) / in_features ** 0.5
        up = torch.randn(out_features, RANK, generator=gen) / RANK ** 0.5
        tensors.update(module_tensors(architecture, fmt, target, down, up, ALPHA, torch.float32))
        for module in architecture.lora_modules(target, "diffusers"):
            index = row_index(module.located_rows, out_features)  # its rows, in its own order
            component, _, name = module.name.partition(".")
            expected[(component, name)] = LowRank(up[index], down, ALPHA / RANK,
                                                  (index.numel(),) + tuple(target.shape[1:]))
    path = tmp_path / f"lora_{fmt}.safetensors"
    save_file(tensors, path)
    return path, expected


def lora_deltas(model, adapter):
    return {name: module.get_delta_weight(adapter) for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and adapter in module.lora_A}


def lora_probes(model, adapter, x_of):
    """{module: scaling · B @ (A @ X)} from each patched module's own LoRA factors (no full delta)."""
    got = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            a = module.lora_A[adapter].weight.float().flatten(1)
            b = module.lora_B[adapter].weight.float().flatten(1)
            got[name] = module.scaling[adapter] * b @ (a @ x_of(a.shape[1]))
    return got


def assert_deltas(model, adapter, expected):
    """Every expected module is patched, nothing else is, and each delta equals the expected one on a
    random probe (8 vectors: a different delta passes with probability 0)."""
    gen = torch.Generator().manual_seed(1)
    probes = {}

    def x_of(n):
        return probes.setdefault(n, torch.randn(n, 8, generator=gen))

    got = lora_probes(model, adapter, x_of)
    assert set(got) == set(expected), (sorted(set(expected) - set(got))[:5], sorted(set(got) - set(expected))[:5])
    for name, delta in expected.items():
        want = delta.probe(x_of(delta.down.shape[1]))
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-5 * float(want.abs().max()),
                                   msg=lambda m: f"{name}: {m}")


# --- Z-Image -----------------------------------------------------------------------------------

Z_CFG = ZImageConfig(dim=64, n_layers=2, n_refiner_layers=1, n_heads=4, cap_feat_dim=32)


def zimage_model():
    torch.manual_seed(0)
    return diffusers.ZImageTransformer2DModel(dim=64, n_layers=2, n_refiner_layers=1, n_heads=4, n_kv_heads=4,
                                              cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32])


def test_synthetic_zimage_layout_matches_the_diffusers_model():
    model_shapes = {k: tuple(v.shape) for k, v in zimage_model().state_dict().items()}
    assert dict(zimage_specs(Z_CFG, "diffusers")) == model_shapes


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_zimage_lora_loads_fully_in_diffusers(tmp_path, fmt, diffusers_warnings):
    z = arch.get("zimage")
    targets = z.targets(dict(zimage_specs(Z_CFG)), groups={"adaln"})
    path, expected = write_lora(tmp_path, z, fmt, targets)
    model = zimage_model()
    state_dict = diffusers.ZImagePipeline.lora_state_dict(str(tmp_path), weight_name=path.name)
    diffusers.ZImagePipeline.load_lora_into_transformer(state_dict, transformer=model, adapter_name="x")
    assert_deltas(model, "x", {name: d for (component, name), d in expected.items()})
    assert len(expected) == 4 * 7 + 3  # 4 blocks x (q,k,v,out,w1,w2,w3) + 3 adaLN (not context_refiner)
    assert not [m for m in diffusers_warnings if "unexpected" in m.lower() or "missing" in m.lower()]


# --- SDXL --------------------------------------------------------------------------------------

def sdxl_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 2, 4), cross_attention_dim=64,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        use_linear_projection=True)


def clip(layers, projection=False):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                         num_attention_heads=4, vocab_size=64, max_position_embeddings=16,
                                         projection_dim=32)
    torch.manual_seed(0)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config)


def sdxl_targets(unet, te1, te2, conv):
    """SDXL targets named as the real single file names them, shaped like the small models."""
    sdxl = arch.get("sdxl")
    unet_shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    # transformers 5's CLIPTextModel drops the `text_model.` level; real checkpoints and kohya names keep it
    te1_shapes = {k if k.startswith("text_model.") else "text_model." + k: tuple(v.shape)
                  for k, v in te1.state_dict().items()}
    te2_shapes = {k: tuple(v.shape) for k, v in te2.state_dict().items()}
    shapes = {}
    for key, _, _ in load_layout("sdxl-single-file"):
        if key.startswith("model.diffusion_model."):
            local = key[len("model.diffusion_model."):-len(".weight")]
            try:
                name = arch.sgm_to_diffusers(local) + ".weight"
            except ValueError:
                continue
            if name in unet_shapes:
                shapes[key] = unet_shapes[name]
    for layer in range(12):
        for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                       "mlp.fc1", "mlp.fc2"):
            name = f"text_model.encoder.layers.{layer}.{module}.weight"
            shapes[f"conditioner.embedders.0.transformer.{name}"] = te1_shapes[name]
    for layer in range(32):
        base = f"text_model.encoder.layers.{layer}"
        q = te2_shapes[f"{base}.self_attn.q_proj.weight"]
        prefix = f"conditioner.embedders.1.model.transformer.resblocks.{layer}"
        shapes[f"{prefix}.attn.in_proj_weight"] = (3 * q[0], q[1])
        shapes[f"{prefix}.attn.out_proj.weight"] = te2_shapes[f"{base}.self_attn.out_proj.weight"]
        shapes[f"{prefix}.mlp.c_fc.weight"] = te2_shapes[f"{base}.mlp.fc1.weight"]
        shapes[f"{prefix}.mlp.c_proj.weight"] = te2_shapes[f"{base}.mlp.fc2.weight"]
    return sdxl, sdxl.targets(shapes, conv=conv)


def test_every_sdxl_sgm_target_maps_to_a_diffusers_module():
    unet = sdxl_unet()
    names = {k for k, _ in unet.named_modules()}
    sdxl = arch.get("sdxl")
    layout = {k: tuple(s) for k, s, _ in load_layout("sdxl-single-file")}
    targets = [t for t in sdxl.targets(layout, conv=True) if t.component == "model"]
    assert len(targets) > 722
    for t in targets:
        assert arch.sgm_to_diffusers(t.module) in names, t.module


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_sdxl_lora_loads_fully_in_diffusers(tmp_path, fmt, diffusers_warnings):
    unet, te1, te2 = sdxl_unet(), clip(12), clip(32, projection=True)
    sdxl, targets = sdxl_targets(unet, te1, te2, conv=True)
    path, expected = write_lora(tmp_path, sdxl, fmt, targets)
    loader = diffusers.StableDiffusionXLPipeline
    state_dict, alphas = loader.lora_state_dict(str(tmp_path), weight_name=path.name, unet_config=unet.config)
    loader.load_lora_into_unet(state_dict, alphas, unet=unet, adapter_name="x")
    loader.load_lora_into_text_encoder(state_dict, alphas, text_encoder=te1, prefix="text_encoder",
                                       adapter_name="x")
    loader.load_lora_into_text_encoder(state_dict, alphas, text_encoder=te2, prefix="text_encoder_2",
                                       adapter_name="x")
    for component, model in (("unet", unet), ("text_encoder", te1), ("text_encoder_2", te2)):
        flat = not hasattr(model, "text_model")  # transformers 5's CLIPTextModel has no `text_model.` level
        assert_deltas(model, "x", {name.removeprefix("text_model.") if flat else name: d
                                   for (c, name), d in expected.items() if c == component})
    assert sum(1 for c, _ in expected if c == "text_encoder_2") == 32 * 6
    assert not [m for m in diffusers_warnings if "unexpected" in m.lower() or "missing" in m.lower()]


# --- Flux (kohya conversion in diffusers assumes Flux.1's real 3072 width) -----------------------

@pytest.fixture(scope="module")
def flux_one_block():
    from accelerate import init_empty_weights
    with init_empty_weights():  # the real width; to_empty leaves the weights' pages untouched (not resident)
        model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=32,
                                            pooled_projection_dim=32, guidance_embeds=True,
                                            axes_dims_rope=(16, 56, 56))
    return model.to_empty(device="cpu")


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_flux_lora_loads_fully_in_diffusers(tmp_path, fmt, flux_one_block, diffusers_warnings):
    flux = arch.get("flux")
    layout = {k: tuple(s) for k, s, _ in load_layout("flux1-dev-bfl")
              if k.startswith(("double_blocks.0.", "single_blocks.0."))}
    targets = flux.targets(layout, groups={"modulation"})
    assert len(targets) == 13
    path, expected = write_lora(tmp_path, flux, fmt, targets)
    model = flux_one_block
    adapter = f"x_{fmt}"
    state_dict = diffusers.FluxPipeline.lora_state_dict(str(tmp_path), weight_name=path.name)
    if isinstance(state_dict, tuple):
        state_dict = state_dict[0]
    diffusers.FluxPipeline.load_lora_into_transformer(state_dict, None, transformer=model, adapter_name=adapter)
    assert_deltas(model, adapter, {name: d for (component, name), d in expected.items()})
    assert not [m for m in diffusers_warnings if "unexpected" in m.lower() or "missing" in m.lower()]


def test_flux_embedders_and_final_layer_load_fully_in_diffusers(tmp_path, flux_one_block, diffusers_warnings):
    """The embedders and final groups on top of the blocks, in the diffusers spelling: every module loads, each
    delta as written (the final adaLN modulation in diffusers' (scale; shift) order). diffusers' kohya converter
    drops these groups without a word, so the report says so for that spelling."""
    flux = arch.get("flux")
    model = flux_one_block
    stored = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    cmap = flux.canonical_map(stored, "diffusers", "")
    shapes = {k: (sum(stored[s][0] for s in src),) + stored[src[0]][1:] for k, src in cmap.sources.items()
              if None not in src}
    targets = flux.targets(shapes, groups={"embedders", "final"})
    assert {t.module for t in targets if t.group} == {
        "img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
        "guidance_in.in_layer", "guidance_in.out_layer", "final_layer.linear", "final_layer.adaLN_modulation.1"}
    path, expected = write_lora(tmp_path, flux, "diffusers", targets, seed=3)
    state_dict = diffusers.FluxPipeline.lora_state_dict(str(tmp_path), weight_name=path.name)
    if isinstance(state_dict, tuple):
        state_dict = state_dict[0]
    diffusers.FluxPipeline.load_lora_into_transformer(state_dict, None, transformer=model, adapter_name="groups")
    assert ("transformer", "norm_out.linear") in expected
    assert_deltas(model, "groups", {name: d for (component, name), d in expected.items()})
    assert not [m for m in diffusers_warnings if "unexpected" in m.lower() or "missing" in m.lower()]
    assert flux.format_notes("kohya", ["final"]) and not flux.format_notes("diffusers", ["final", "embedders"])


# --- SD1.5 (kohya names SD1 UNet modules diffusers-style) --------------------------------------

def sd15_ldm_modules():
    """LDM module paths of SD1's UNet targets (attention, resnets, samplers), as the single file names them."""
    attn_levels, modules = {0, 1, 2}, []

    def resnet(block, skip):
        modules.extend(f"{block}.{m}" for m in ("in_layers.2", "out_layers.3", "emb_layers.1"))
        if skip:
            modules.append(f"{block}.skip_connection")

    def attention(block):
        modules.extend(f"{block}.{m}" for m in ("proj_in", "proj_out"))
        modules.extend(f"{block}.transformer_blocks.0.{a}.{p}" for a in ("attn1", "attn2")
                       for p in ("to_q", "to_k", "to_v", "to_out.0"))
        modules.extend(f"{block}.transformer_blocks.0.{m}" for m in ("ff.net.0.proj", "ff.net.2"))

    for level in range(4):
        for j in range(2):
            idx = 3 * level + j + 1
            resnet(f"input_blocks.{idx}.0", skip=level in (1, 2) and j == 0)
            if level in attn_levels:
                attention(f"input_blocks.{idx}.1")
        if level < 3:
            modules.append(f"input_blocks.{3 * level + 3}.0.op")
    resnet("middle_block.0", False)
    attention("middle_block.1")
    resnet("middle_block.2", False)
    for level in range(4):
        has_attn = (3 - level) in attn_levels
        for j in range(3):
            idx = 3 * level + j
            resnet(f"output_blocks.{idx}.0", skip=True)
            if has_attn:
                attention(f"output_blocks.{idx}.1")
            if j == 2 and level < 3:
                modules.append(f"output_blocks.{idx}.{2 if has_attn else 1}.conv")
    return modules


def sd15_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64, 128, 128), layers_per_block=2, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=2)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_sd15_lora_loads_fully_in_diffusers(tmp_path, fmt, diffusers_warnings):
    unet, te = sd15_unet(), clip(12)
    unet_shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    shapes = {f"model.diffusion_model.{m}.weight": unet_shapes[arch.sgm_to_diffusers(m) + ".weight"]
              for m in sd15_ldm_modules()}
    te_shapes = {k.removeprefix("text_model."): tuple(v.shape) for k, v in te.state_dict().items()}
    for key, shape in te_shapes.items():
        shapes[f"cond_stage_model.transformer.text_model.{key}"] = shape
    sd15 = arch.get("sd15")
    targets = sd15.targets(shapes, conv=True)
    assert any(t.conv1x1 for t in targets) and any(t.kind == "conv" for t in targets)
    path, expected = write_lora(tmp_path, sd15, fmt, targets)
    names = {n for t in targets for m in sd15.lora_modules(t, fmt) for n in [m.name]}
    if fmt == "kohya":
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    loader = diffusers.StableDiffusionPipeline
    state_dict, alphas = loader.lora_state_dict(str(tmp_path), weight_name=path.name, unet_config=unet.config)
    loader.load_lora_into_unet(state_dict, alphas, unet=unet, adapter_name="x")
    loader.load_lora_into_text_encoder(state_dict, alphas, text_encoder=te, prefix="text_encoder", adapter_name="x")
    flat = not hasattr(te, "text_model")
    assert_deltas(unet, "x", {name: d for (c, name), d in expected.items() if c == "unet"})
    assert_deltas(te, "x", {name.removeprefix("text_model.") if flat else name: d
                            for (c, name), d in expected.items() if c == "text_encoder"})
    assert not [m for m in diffusers_warnings if "unexpected" in m.lower() or "missing" in m.lower()]


# --- resized LoRAs still load -------------------------------------------------------------------

def truncated(delta, k):
    u, s, vh = torch.linalg.svd(delta.reshape(delta.shape[0], -1), full_matrices=False)
    return ((u[:, :k] * s[:k]) @ vh[:k]).reshape(delta.shape)


def test_resized_zimage_and_sdxl_loras_load_fully_in_diffusers(tmp_path, diffusers_warnings, monkeypatch):
    from lora_colab.resizing.resizer import resize
    monkeypatch.setenv("LORA_COLAB_CACHE", str(tmp_path / "cache"))
    z = arch.get("zimage")
    path, expected = write_lora(tmp_path, z, "kohya", z.targets(dict(zimage_specs(Z_CFG))))
    report = resize(None, [path], tmp_path / "z", "rank=2")[0]
    model = zimage_model()
    state_dict = diffusers.ZImagePipeline.lora_state_dict(str(tmp_path / "z"), weight_name=report.output.split("/")[-1])
    diffusers.ZImagePipeline.load_lora_into_transformer(state_dict, transformer=model, adapter_name="x")
    # the fused qkv was truncated as one matrix: compare per fused target, on its rows
    got = lora_deltas(model, "x")
    for name in [n for (_, n) in expected if n.endswith("to_q")]:
        block = name[: -len(".to_q")]
        fused = torch.cat([expected[("transformer", f"{block}.to_{p}")].full() for p in "qkv"])
        ours = torch.cat([got[f"{block}.to_{p}"] for p in "qkv"])
        torch.testing.assert_close(ours, truncated(fused, 2), rtol=1e-3, atol=1e-5)
    assert len(got) == len(expected)

    unet, te1, te2 = sdxl_unet(), clip(12), clip(32, projection=True)
    sdxl, targets = sdxl_targets(unet, te1, te2, conv=True)
    (tmp_path / "sdxl").mkdir()
    path, expected = write_lora(tmp_path / "sdxl", sdxl, "kohya", targets)
    report = resize(None, [path], tmp_path / "s", "rank=2", dtype="32")[0]
    loader = diffusers.StableDiffusionXLPipeline
    state_dict, alphas = loader.lora_state_dict(str(tmp_path / "s"), weight_name=report.output.split("/")[-1],
                                                unet_config=unet.config)
    loader.load_lora_into_unet(state_dict, alphas, unet=unet, adapter_name="x")
    got = lora_deltas(unet, "x")
    unet_expected = {n: d for (c, n), d in expected.items() if c == "unet"}
    assert set(got) == set(unet_expected)
    for name, delta in unet_expected.items():
        torch.testing.assert_close(got[name].reshape(delta.shape), truncated(delta.full(), 2), rtol=1e-3, atol=1e-5)
    assert not [m for m in diffusers_warnings if "unexpected" in m.lower() or "missing" in m.lower()]
