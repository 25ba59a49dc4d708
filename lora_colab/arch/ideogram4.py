"""Ideogram 4: the original single file (fused q/k/v `attention.qkv`, `attention.o`; the names
musubi-tuner and ComfyUI load) and diffusers' `Ideogram4Transformer2DModel` layout (split to_q/to_k/to_v,
to_out.0); every other name is shared."""

import re

from .table import Rule, TableArchitecture, fused

_L = "layers.{i}"


class Ideogram4(TableArchitecture):
    name = "ideogram4"
    diffusers_classes = ("Ideogram4Transformer2DModel",)  # the class a diffusers folder of this layout names
    title = "Ideogram 4"
    base_model_version = "ideogram4"
    modelspec_architecture = "ideogram-4/lora"
    implementation = "https://github.com/kohya-ss/musubi-tuner"
    metadata_tags = ("ideogram-4", "ideogram4", "ideogram_4")
    lora_hint = re.compile(r"layers_\d+_attention_o$|layers_\d+_adaln_modulation")
    # diffusers' Ideogram 4 converter takes `diffusion_model.` + native names with lora_down/up and alpha (it
    # splits the fused qkv itself), ComfyUI maps `diffusion_model.<module>`: that spelling loads in both
    auto_format = "comfy"
    native_probes = ("layers.0.attention.qkv.weight", "layers.0.attention.o.weight")
    diffusers_probes = ("layers.0.attention.to_q.weight", "layers.0.adaln_modulation.weight")
    rules = tuple(fused(f"{_L}.attention.qkv", [f"{_L}.attention.to_q", f"{_L}.attention.to_k", f"{_L}.attention.to_v"])
                  + [Rule(f"{_L}.attention.o", f"{_L}.attention.to_out.0")])
    default_targets = tuple(f"{_L}.{m}" for m in ("attention.qkv", "attention.o", "feed_forward.w1", "feed_forward.w2",
                                                  "feed_forward.w3"))
    optional = {
        "modulation": ("each layer's adaln_modulation", [f"{_L}.adaln_modulation"]),
        "embedders": ("input_proj, llm_cond_proj, the time embedding and adaln_proj",
                      ["input_proj", "llm_cond_proj", "t_embedding.mlp_in", "t_embedding.mlp_out", "adaln_proj"]),
        "final": ("final_layer.linear and its adaln_modulation", ["final_layer.linear", "final_layer.adaln_modulation"]),
    }

    def format_notes(self, fmt, groups):
        if fmt == "kohya":
            return ["diffusers' Ideogram 4 converter takes `diffusion_model.` names, not kohya's lora_unet_ ones: "
                    "this file loads in ComfyUI; --format comfy (the auto spelling) loads in both"]
        if fmt == "comfy" and set(groups) - {"", "modulation"}:
            return ["diffusers' Ideogram 4 converter refuses modules outside the layers: with these groups this file "
                    "loads in ComfyUI; for diffusers extract with --format diffusers"]
        return []
