"""Wan-Animate 2 (14B): the released file (each Wan block wrapped in an in-context module, `blocks.N.block.*`,
Wan's native attention names) and diffusers' `WanAnimate2Transformer3DModel` layout (Wan's native names but
for the attention's: `self_attn.to_q`, `cross_attn.add_k_proj`)."""

import re

from .table import Rule, TableArchitecture

_B, _D = "blocks.{i}.block", "blocks.{i}"
_ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "k_img": "add_k_proj", "v_img": "add_v_proj",
         "norm_k_img": "norm_added_k"}
_BLOCK = ("norm3", "ffn.0", "ffn.2", "self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k")


class WanAnimate2(TableArchitecture):
    name = "wan_animate2"
    diffusers_classes = ("WanAnimate2Transformer3DModel",)
    title = "Wan-Animate 2"
    base_model_version = "wan_animate2"
    modelspec_architecture = "wan-animate-2/lora"
    implementation = "https://huggingface.co/docs/diffusers/main/api/pipelines/wan_animate_2"
    metadata_tags = ("wan-animate-2", "wan_animate2", "wananimate2")
    lora_hint = re.compile(r"blocks_\d+_block_(?:self|cross)_attn_|blocks_\d+_(?:self|cross)_attn_to_")
    # diffusers' Wan loader takes its PEFT names as they are (a `diffusion_model.` file it converts as Wan 2.x's);
    # ComfyUI (783545f) has no Wan-Animate 2 model
    auto_format = "diffusers"
    native_probes = ("blocks.0.block.self_attn.q.weight", "blocks.0.block.ffn.0.weight")
    diffusers_probes = ("blocks.0.self_attn.to_q.weight", "blocks.0.ffn.0.weight", "blocks.0.norm3.weight")
    rules = tuple([Rule(f"{_B}.self_attn.{n}", f"{_D}.self_attn.{d}") for n, d in _ATTN.items() if "img" not in n]
                  + [Rule(f"{_B}.cross_attn.{n}", f"{_D}.cross_attn.{d}") for n, d in _ATTN.items()]
                  + [Rule(f"{_B}.{m}", f"{_D}.{m}") for m in _BLOCK] + [Rule(_B, _D)])  # its modulation
    default_targets = tuple([f"{_B}.self_attn.{n}" for n in "qkvo"]
                            + [f"{_B}.cross_attn.{n}" for n in ("q", "k", "v", "o", "k_img", "v_img")]
                            + [f"{_B}.ffn.0", f"{_B}.ffn.2"])
    optional = {
        "embedders": ("text, time and image embedders and the time projection",
                      ["text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
                       "time_projection.1", "img_emb.proj.1", "img_emb.proj.3"]),
        "final": ("head.head", ["head.head"]),
    }

    def format_notes(self, fmt, groups):
        if fmt in ("kohya", "comfy"):
            return ["no client loads Wan-Animate 2 in this spelling yet (ComfyUI has no Wan-Animate 2 model; "
                    "diffusers reads `diffusion_model.` names as Wan 2.x's): use the auto spelling for diffusers"]
        return []
