"""Wan 2.1/2.2 (T2V/I2V-A14B, one expert per file, and TI2V-5B): original (ComfyUI) and diffusers layouts."""

import re

from .table import Rule, TableArchitecture

_B = "blocks.{i}"
_ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "k_img": "add_k_proj", "v_img": "add_v_proj"}


class Wan(TableArchitecture):
    diffusers_reads_comfy = True  # diffusers reads its comfy-format files too, but not every .diff/.diff_b
    name = "wan"
    diffusers_classes = ("WanTransformer3DModel",)  # the class a diffusers folder of this layout names
    title = "Wan"
    base_model_version = "wan"
    modelspec_architecture = "wan/lora"
    implementation = "https://github.com/Wan-Video/Wan2.2"
    metadata_tags = ("wan2", "wan/", "wan_")
    lora_hint = re.compile(r"blocks_\d+_(?:self_attn|cross_attn|attn1|attn2)_|blocks_\d+_ffn_")
    auto_format = "comfy"
    native_probes = ("blocks.0.self_attn.q.weight", "blocks.0.ffn.0.weight")
    diffusers_probes = ("blocks.0.attn1.to_q.weight", "blocks.0.ffn.net.0.proj.weight")
    rules = tuple(
        [Rule(f"{_B}.self_attn.{n}", f"{_B}.attn1.{d}") for n, d in _ATTN.items() if "img" not in n]
        + [Rule(f"{_B}.cross_attn.{n}", f"{_B}.attn2.{d}") for n, d in _ATTN.items()]
        + [Rule(f"{_B}.{a}.norm_{n}", f"{_B}.{d}.norm_{n}") for a, d in (("self_attn", "attn1"),
                                                                             ("cross_attn", "attn2")) for n in "qk"]
        + [Rule(f"{_B}.norm3", f"{_B}.norm2"),  # the cross-attention norm
           Rule(f"{_B}.ffn.0", f"{_B}.ffn.net.0.proj"), Rule(f"{_B}.ffn.2", f"{_B}.ffn.net.2"),
           Rule("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
           Rule("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
           Rule("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
           Rule("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
           Rule("time_projection.1", "condition_embedder.time_proj"), Rule("head.head", "proj_out")])
    default_targets = tuple([f"{_B}.self_attn.{n}" for n in "qkvo"] + [f"{_B}.cross_attn.{n}" for n in _ATTN]
                            + [f"{_B}.ffn.0", f"{_B}.ffn.2"])
    optional = {
        "embedders": ("text and time embedders and the time projection",
                      ["text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
                       "time_projection.1"]),
        "final": ("head.head", ["head.head"]),
    }
