"""SD1.5/SDXL diffusers pipeline folders (unet/, text_encoder/, text_encoder_2/) as base or tuned, paired
with each other and with LDM single files. The UNet's key map is checked by a round trip through
diffusers' own single-file converter."""

import json
import re

import pytest
import torch

from lora_colab import extract, open_checkpoint
from lora_colab.arch.stable_diffusion import diffusers_to_sgm
from lora_colab.lora.writer import save_file

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

UNETS = {
    "sd15": dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, layers_per_block=2,
                 sample_size=16, attention_head_dim=8, norm_num_groups=8),
    "sdxl": dict(block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                    "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                 layers_per_block=2, sample_size=16, attention_head_dim=8, norm_num_groups=8,
                 transformer_layers_per_block=(1, 2, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=8 * 6 + 32, use_linear_projection=True),
}
CLIP = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16)


def up_attention_levels(keys):
    return {int(m.group(1)) for k in keys for m in [re.match(r"up_blocks\.(\d+)\.attentions", k)] if m}


@pytest.mark.parametrize("name", sorted(UNETS))
def test_the_unet_key_map_round_trips_through_diffusers_own_converter(name):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    unet = diffusers.UNet2DConditionModel(**UNETS[name])
    state = unet.state_dict()
    levels = up_attention_levels(state)
    ldm = {"model.diffusion_model." + diffusers_to_sgm(k, levels): v for k, v in state.items()}
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def pipeline_state(name, seed):
    """{component: state dict} of a tiny pipeline with random weights."""
    torch.manual_seed(seed)
    parts = {"unet": diffusers.UNet2DConditionModel(**UNETS[name]).state_dict(),
             "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP)).state_dict()}
    if name == "sdxl":
        config = transformers.CLIPTextConfig(**{**CLIP, "hidden_size": 32, "projection_dim": 32})
        parts["text_encoder_2"] = transformers.CLIPTextModelWithProjection(config).state_dict()
    return {c: {k: v.clone().contiguous() for k, v in sd.items()} for c, sd in parts.items()}


def tune(state, seed):
    """Plant a rank-2 change on every 2-D weight of each component."""
    gen = torch.Generator().manual_seed(seed)
    tuned = {c: dict(sd) for c, sd in state.items()}
    for sd in tuned.values():
        for key, value in sd.items():
            if key.endswith(".weight") and value.dim() in (2, 4) and min(value.shape[:2]) >= 8:
                flat = value.reshape(value.shape[0], -1)
                change = torch.randn(flat.shape[0], 2, generator=gen) @ torch.randn(2, flat.shape[1], generator=gen)
                sd[key] = (flat + 0.05 * change).reshape(value.shape)
    return tuned


def write_pipeline(folder, state, variant=False):
    (folder / "model_index.json").parent.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    for component, sd in state.items():
        stem = "diffusion_pytorch_model" if component == "unet" else "model"
        name = f"{stem}.fp16.safetensors" if variant else f"{stem}.safetensors"
        (folder / component).mkdir(parents=True, exist_ok=True)
        save_file({k: v.half() if variant else v for k, v in sd.items()}, folder / component / name)
    (folder / "vae").mkdir()
    save_file({"decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}, folder / "vae" / "diffusion_pytorch_model.safetensors")
    return folder


def write_single_file(path, name, state, half=False):
    """The same weights in the LDM/SGM single-file layout."""
    out = {}
    levels = up_attention_levels(state["unet"])
    for key, value in state["unet"].items():
        out["model.diffusion_model." + diffusers_to_sgm(key, levels)] = value
    te = "cond_stage_model.transformer." if name == "sd15" else "conditioner.embedders.0.transformer."
    for key, value in state["text_encoder"].items():
        out[te + key] = value
    if name == "sdxl":
        bigg = "conditioner.embedders.1.model.transformer.resblocks."
        sd = state["text_encoder_2"]
        for layer in range(CLIP["num_hidden_layers"]):
            hf = f"text_model.encoder.layers.{layer}."
            out[f"{bigg}{layer}.attn.in_proj_weight"] = torch.cat([sd[hf + f"self_attn.{p}_proj.weight"] for p in "qkv"])
            out[f"{bigg}{layer}.attn.out_proj.weight"] = sd[hf + "self_attn.out_proj.weight"]
            out[f"{bigg}{layer}.mlp.c_fc.weight"] = sd[hf + "mlp.fc1.weight"]
            out[f"{bigg}{layer}.mlp.c_proj.weight"] = sd[hf + "mlp.fc2.weight"]
    save_file({k: v.half() if half else v for k, v in out.items()}, path)
    return path


def lora(path):
    with open_checkpoint(path) as ckpt:
        return {k: ckpt.read(k) for k in ckpt.keys()}


@pytest.mark.parametrize("name", sorted(UNETS))
def test_pipeline_folders_pair_with_each_other_and_with_single_files(tmp_path, name):
    base, tuned = pipeline_state(name, 0), None
    tuned = tune(base, 1)
    folders = {"base": write_pipeline(tmp_path / "base_pipe", base),
               "tuned": write_pipeline(tmp_path / "tuned_pipe", tuned, variant=True)}  # fp16 variant files only
    files = {"base": write_single_file(tmp_path / "base.safetensors", name, base),
             "tuned": write_single_file(tmp_path / "tuned.safetensors", name, tuned, half=True)}
    runs = {}
    for label, (b, t) in {"files": (files["base"], files["tuned"]), "folders": (folders["base"], folders["tuned"]),
                          "mixed": (folders["base"], files["tuned"])}.items():
        report = extract(b, t, tmp_path / f"{label}.safetensors", rank=4, progress=False, device="cpu")
        runs[label] = (report, lora(tmp_path / f"{label}.safetensors"))
    report, want = runs["files"]
    assert report.architecture.startswith("SDXL" if name == "sdxl" else "SD1.5")
    components = {layer.name.rsplit("[", 1)[-1] for layer in report.extracted if "[" in layer.name}
    assert components == ({"te1]", "te2]"} if name == "sdxl" else {"te]"})
    for label in ("folders", "mixed"):
        other, got = runs[label]
        assert "diffusers" in other.architecture and len(other.extracted) == len(report.extracted)
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), (label, key)
    with open_checkpoint(folders["base"]) as ckpt:
        assert not any(k.startswith("vae.") for k in ckpt.keys()) and any(k.startswith("text_encoder.") for k in ckpt.keys())
