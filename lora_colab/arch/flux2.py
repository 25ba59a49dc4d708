"""FLUX.2 [dev] and [klein] 4B/9B: BFL single file (fused qkv, linear1) and diffusers (which keeps linear1
and the MLP inputs fused too)."""

import re

from .table import Rule, TableArchitecture, fused

_D, _S = "double_blocks.{i}", "single_blocks.{i}"
_TD, _TS = "transformer_blocks.{i}", "single_transformer_blocks.{i}"
_FINAL_MOD = "final_layer.adaLN_modulation.1"


class Flux2(TableArchitecture):
    name = "flux2"
    diffusers_classes = ("Flux2Transformer2DModel",)  # the class a diffusers folder of this layout names
    title = "FLUX.2"
    base_model_version = "flux2"
    modelspec_architecture = "flux-2/lora"
    implementation = "https://github.com/black-forest-labs/flux2"
    metadata_tags = ("flux-2", "flux2", "flux.2")
    lora_hint = re.compile(r"to_qkv_mlp_proj|double_stream_modulation|ff_linear_in")
    native_probes = ("double_blocks.0.img_attn.qkv.weight", "double_stream_modulation_img.lin.weight")
    diffusers_probes = ("single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight",)
    swapped_in_diffusers = (_FINAL_MOD,)  # (shift; scale) -> diffusers' norm_out.linear (scale; shift)
    rules = tuple(
        fused(f"{_D}.img_attn.qkv", [f"{_TD}.attn.to_q", f"{_TD}.attn.to_k", f"{_TD}.attn.to_v"])
        + fused(f"{_D}.txt_attn.qkv", [f"{_TD}.attn.add_q_proj", f"{_TD}.attn.add_k_proj", f"{_TD}.attn.add_v_proj"])
        + [Rule(f"{_D}.img_attn.proj", f"{_TD}.attn.to_out.0"), Rule(f"{_D}.txt_attn.proj", f"{_TD}.attn.to_add_out"),
           Rule(f"{_D}.img_mlp.0", f"{_TD}.ff.linear_in"), Rule(f"{_D}.img_mlp.2", f"{_TD}.ff.linear_out"),
           Rule(f"{_D}.txt_mlp.0", f"{_TD}.ff_context.linear_in"),
           Rule(f"{_D}.txt_mlp.2", f"{_TD}.ff_context.linear_out"),
           Rule(f"{_S}.linear1", f"{_TS}.attn.to_qkv_mlp_proj"), Rule(f"{_S}.linear2", f"{_TS}.attn.to_out"),
           Rule("double_stream_modulation_img.lin", "double_stream_modulation_img.linear"),
           Rule("double_stream_modulation_txt.lin", "double_stream_modulation_txt.linear"),
           Rule("single_stream_modulation.lin", "single_stream_modulation.linear"),
           Rule("img_in", "x_embedder"), Rule("txt_in", "context_embedder"),
           Rule("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1"),
           Rule("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2"),
           Rule("guidance_in.in_layer", "time_guidance_embed.guidance_embedder.linear_1"),
           Rule("guidance_in.out_layer", "time_guidance_embed.guidance_embedder.linear_2"),
           Rule("final_layer.linear", "proj_out"), Rule(_FINAL_MOD, "norm_out.linear")])
    default_targets = tuple([f"{_D}.{s}_{m}" for s in ("img", "txt") for m in ("attn.qkv", "attn.proj", "mlp.0",
                                                                                "mlp.2")]
                            + [f"{_S}.linear1", f"{_S}.linear2"])
    optional = {
        "modulation": ("the shared double/single stream modulation linears",
                       ["double_stream_modulation_img.lin", "double_stream_modulation_txt.lin",
                        "single_stream_modulation.lin"]),
        "embedders": ("img_in, txt_in, time and guidance embedders",
                      ["img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "guidance_in.in_layer",
                       "guidance_in.out_layer"]),
        "final": ("final_layer.linear and its adaLN modulation", ["final_layer.linear", _FINAL_MOD]),
    }

    def format_notes(self, fmt, groups):
        if fmt == "kohya" and set(groups) - {""}:
            return ["diffusers' kohya route for FLUX.2 loads only double/single block layers: the optional groups "
                    "load in ComfyUI; for diffusers extract with --format diffusers"]
        return []
