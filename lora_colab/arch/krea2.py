"""Krea 2 (Raw and Turbo): Krea's original single file and diffusers layout."""

import re

from .table import Rule, TableArchitecture

_ATTN = {"wq": "to_q", "wk": "to_k", "wv": "to_v", "gate": "to_gate", "wo": "to_out.0"}
_MLP = ("gate", "up", "down")
_STREAMS = (("blocks.{i}", "transformer_blocks.{i}"),
            ("txtfusion.layerwise_blocks.{i}", "text_fusion.layerwise_blocks.{i}"),
            ("txtfusion.refiner_blocks.{i}", "text_fusion.refiner_blocks.{i}"))


class Krea2(TableArchitecture):
    diffusers_reads_comfy = True  # diffusers reads its comfy-format files too, but not every .diff/.diff_b
    name = "krea2"
    diffusers_classes = ("Krea2Transformer2DModel",)  # the class a diffusers folder of this layout names
    title = "Krea 2"
    base_model_version = "krea2"
    modelspec_architecture = "krea-2/lora"
    implementation = "https://github.com/krea-ai/krea-2"
    metadata_tags = ("krea-2", "krea2", "krea_2")
    lora_hint = re.compile(r"(?:^|_)blocks_\d+_attn_w[qkvo]|txtfusion_|text_fusion_|attn_to_gate")
    auto_format = "comfy"
    comfy_peft = True  # diffusers refuses lora_down/up and kohya names for Krea 2; both clients load lora_A/B
    native_probes = ("blocks.0.attn.wq.weight", "blocks.0.mlp.gate.weight")
    diffusers_probes = ("transformer_blocks.0.attn.to_gate.weight", "transformer_blocks.0.ff.gate.weight")
    rules = tuple([Rule(f"{n}.attn.{a}", f"{d}.attn.{b}") for n, d in _STREAMS for a, b in _ATTN.items()]
                  + [Rule(f"{n}.mlp.{m}", f"{d}.ff.{m}") for n, d in _STREAMS for m in _MLP]
                  + [Rule("first", "img_in"), Rule("tmlp.0", "time_embed.linear_1"),
                     Rule("tmlp.2", "time_embed.linear_2"), Rule("tproj.1", "time_mod_proj"),
                     Rule("txtmlp.1", "txt_in.linear_1"), Rule("txtmlp.3", "txt_in.linear_2"),
                     Rule("txtfusion.projector", "text_fusion.projector"),
                     Rule("last.linear", "final_layer.linear")])
    default_targets = tuple([f"{n}.attn.{a}" for n, _ in _STREAMS for a in _ATTN]
                            + [f"{n}.mlp.{m}" for n, _ in _STREAMS for m in _MLP])
    optional = {
        "modulation": ("tproj.1, the time-modulation projection", ["tproj.1"]),
        "embedders": ("first (image input), tmlp, txtmlp and the text fusion's projector",
                      ["first", "tmlp.0", "tmlp.2", "txtmlp.1", "txtmlp.3", "txtfusion.projector"]),
        "final": ("last.linear", ["last.linear"]),
    }
