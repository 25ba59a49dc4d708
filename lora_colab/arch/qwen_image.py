"""Qwen-Image (20B; 2512 and Edit share it) and Qwen-Image 2.1 (7B, its native file fuses img_mlp.gate_up)."""

import re

from .table import Rule, TableArchitecture, fused

_BLOCK = "transformer_blocks.{i}"
_EMBEDDERS = ["img_in", "txt_in", "time_text_embed.timestep_embedder.linear_1",
              "time_text_embed.timestep_embedder.linear_2"]
_FINAL = ["norm_out.linear", "proj_out"]


class QwenImage(TableArchitecture):
    """Native (ComfyUI) names are diffusers' names: one layout, with or without a prefix."""
    diffusers_reads_comfy = True  # diffusers reads its comfy-format files too, but not every .diff/.diff_b

    name = "qwen_image"
    diffusers_classes = ("QwenImageTransformer2DModel",)  # the class a diffusers folder of this layout names
    title = "Qwen-Image"
    base_model_version = "qwen_image"
    modelspec_architecture = "qwen-image/lora"
    implementation = "https://github.com/QwenLM/Qwen-Image"
    metadata_tags = ("qwen-image/", "qwen_image", "qwen-image-edit")
    lora_hint = re.compile(r"transformer_blocks_\d+_(?:img|txt)_mlp_net|transformer_blocks_\d+_attn_add_q_proj")
    native_probes = ("transformer_blocks.0.img_mod.1.weight", "transformer_blocks.0.txt_mlp.net.0.proj.weight")
    default_targets = tuple(f"{_BLOCK}.{m}" for m in (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
        "txt_mlp.net.2"))
    optional = {
        "modulation": ("img_mod.1/txt_mod.1 of each block", [f"{_BLOCK}.img_mod.1", f"{_BLOCK}.txt_mod.1"]),
        "embedders": ("img_in, txt_in and the timestep embedder", _EMBEDDERS),
        "final": ("norm_out.linear and proj_out", _FINAL),
    }


class QwenImage21(TableArchitecture):
    name = "qwen_image_2_1"
    diffusers_classes = ("QwenImage21Transformer2DModel",)  # the class a diffusers folder of this layout names
    title = "Qwen-Image 2.1"
    base_model_version = "qwen_image_2_1"
    modelspec_architecture = "qwen-image-2.1/lora"
    implementation = "https://github.com/QwenLM/Qwen-Image"
    metadata_tags = ("qwen-image-2.1", "qwen_image_2_1", "qwen-image-2_1")
    lora_hint = re.compile(r"img_mlp_(?:gate_up|gate_layer)")
    native_probes = ("transformer_blocks.0.img_mlp.gate_up.weight",)
    diffusers_probes = ("transformer_blocks.0.img_mlp.gate_layer.weight", "transformer_blocks.0.img_mlp.proj.weight")
    rules = tuple(fused(f"{_BLOCK}.img_mlp.gate_up", [f"{_BLOCK}.img_mlp.gate_layer", f"{_BLOCK}.img_mlp.proj"]))
    default_targets = tuple(f"{_BLOCK}.{m}" for m in (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.gate_up", "img_mlp.out"))
    optional = {
        "modulation": ("the shared modulation.N linears", ["modulation.{i}"]),
        "embedders": ("img_in, txt_in and the timestep embedder",
                      ["img_in", "txt_in.in_layer", "txt_in.out_layer", "time_text_embed.timestep_embedder.linear_1",
                       "time_text_embed.timestep_embedder.linear_2"]),
        "final": ("norm_out.linear and proj_out", _FINAL),
    }

    def format_notes(self, fmt, groups):
        if fmt == "diffusers":
            return []
        return ["diffusers does not split the fused img_mlp.gate_up of this spelling (it loads 4 of 6 modules per "
                "block): ComfyUI loads it fully; for diffusers extract with --format diffusers"]


__all__ = ["QwenImage", "QwenImage21", "Rule"]
