"""HiDream-O1-Image: a pixel-space DiT built on Qwen3-VL-8B (its language model, the vision tower that encodes
reference images, and patch/timestep embedders around them), in ComfyUI's single-file names. diffusers has no
class of it: ComfyUI is its client (`diffusion_model.` + these names, or kohya's flattened `lora_unet_`)."""

import re

from .table import TableArchitecture

_L, _V = "language_model.layers.{i}", "visual.blocks.{i}"


class HiDreamO1(TableArchitecture):
    name = "hidream_o1"
    diffusers_classes = ("HiDreamO1Transformer (none in diffusers)",)
    diffusers_model = False  # `--format diffusers` is refused: no client
    title = "HiDream-O1"
    base_model_version = "hidream_o1"
    modelspec_architecture = "hidream-o1/lora"
    implementation = "https://github.com/HiDream-ai/HiDream-O1-Image"
    metadata_tags = ("hidream-o1", "hidream_o1", "hidreamo1")
    lora_hint = re.compile(r"language_model_layers_\d+_(?:self_attn|mlp)_|t_embedder1|final_layer2")
    auto_format = "comfy"
    native_probes = ("t_embedder1.mlp.0.weight", "x_embedder.proj1.weight",
                     "language_model.layers.0.self_attn.q_proj.weight")
    default_targets = tuple([f"{_L}.self_attn.{p}_proj" for p in "qkvo"]
                            + [f"{_L}.mlp.{p}_proj" for p in ("gate", "up", "down")])
    optional = {
        "embedders": ("the patch and timestep embedders", ["x_embedder.proj1", "x_embedder.proj2",
                                                           "t_embedder1.mlp.0", "t_embedder1.mlp.2"]),
        "final": ("final_layer2.linear", ["final_layer2.linear"]),
        "vision": ("the reference images' vision tower: its blocks' attention and MLP, the merger",
                   [f"{_V}.attn.qkv", f"{_V}.attn.proj", f"{_V}.mlp.linear_fc1", f"{_V}.mlp.linear_fc2",
                    "visual.merger.linear_fc1", "visual.merger.linear_fc2"]),
    }
