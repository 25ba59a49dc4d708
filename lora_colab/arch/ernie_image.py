"""ERNIE-Image (and Turbo): one layout, diffusers' names (ComfyUI's single file uses them too, under any
prefix); split q/k/v, a gated MLP, and one adaLN modulation shared by every layer."""

import re

from .table import TableArchitecture, kohya_not_diffusers

_L = "layers.{i}"


class ErnieImage(TableArchitecture):
    name = "ernie_image"
    diffusers_classes = ("ErnieImageTransformer2DModel",)  # the class a diffusers folder of this layout names
    title = "ERNIE-Image"
    base_model_version = "ernie_image"
    modelspec_architecture = "ernie-image/lora"
    implementation = "https://github.com/PaddlePaddle/ERNIE-Image"
    metadata_tags = ("ernie-image", "ernie_image", "ernieimage")
    lora_hint = re.compile(r"layers_\d+_self_attention_to_[qkv]|layers_\d+_mlp_linear_fc2")
    # diffusers' ERNIE-Image loader swaps `diffusion_model.` for `transformer.` (the names are its own) and
    # ComfyUI maps `diffusion_model.<module>`: lora_A/B under that prefix loads in both
    auto_format = "comfy"
    comfy_peft = True
    native_probes = ("layers.0.self_attention.to_q.weight", "layers.0.mlp.linear_fc2.weight")
    default_targets = tuple(f"{_L}.{m}" for m in ("self_attention.to_q", "self_attention.to_k", "self_attention.to_v",
                                                  "self_attention.to_out.0", "mlp.gate_proj", "mlp.up_proj",
                                                  "mlp.linear_fc2"))
    optional = {
        "modulation": ("the adaLN modulation all layers share, and the final norm's", ["adaLN_modulation.1",
                                                                                      "final_norm.linear"]),
        "embedders": ("text_proj and the time embedding", ["text_proj", "time_embedding.linear_1",
                                                           "time_embedding.linear_2"]),
        "final": ("final_linear", ["final_linear"]),
    }

    def format_notes(self, fmt, groups):
        if fmt == "kohya":
            return [kohya_not_diffusers(self.title)]
        return []
