"""Stable Diffusion 3.5 Large, Large Turbo and Medium (MMDiT, MMDiT-X): Stability's single file (fused q/k/v
per stream, the second x-stream attention `attn2` of Medium's first blocks) and diffusers'
`SD3Transformer2DModel` layout (split q/k/v)."""

import re

from .table import Rule, TableArchitecture, fused

_J, _T = "joint_blocks.{i}", "transformer_blocks.{i}"
_X, _C = f"{_J}.x_block", f"{_J}.context_block"
_FINAL_MOD = "final_layer.adaLN_modulation.1"


class SD3(TableArchitecture):
    name = "sd3"
    diffusers_classes = ("SD3Transformer2DModel",)  # the class a diffusers folder of this layout names
    title = "SD3.5"
    base_model_version = "sd3"
    modelspec_architecture = "stable-diffusion-v3-medium/lora"
    implementation = "https://github.com/Stability-AI/sd3.5"
    metadata_tags = ("stable-diffusion-v3", "sd3", "sd3.5", "sd35")
    lora_hint = re.compile(r"joint_blocks_\d+_(?:x|context)_block|transformer_blocks_\d+_attn_add_[qkv]_proj")
    # diffusers' SD3 loader takes only the PEFT spelling, and ComfyUI maps `transformer.` + diffusers names
    # (its mmdit_to_diffusers, fused q/k/v as slices): that spelling loads in both
    auto_format = "diffusers"
    native_probes = ("joint_blocks.0.x_block.attn.qkv.weight", "joint_blocks.0.context_block.attn.qkv.weight")
    diffusers_probes = ("transformer_blocks.0.attn.add_q_proj.weight", "transformer_blocks.0.norm1_context.linear.weight")
    swapped_in_diffusers = (_FINAL_MOD,)  # (shift; scale) -> diffusers' norm_out.linear (scale; shift)
    rules = tuple(
        fused(f"{_X}.attn.qkv", [f"{_T}.attn.to_q", f"{_T}.attn.to_k", f"{_T}.attn.to_v"])
        + fused(f"{_C}.attn.qkv", [f"{_T}.attn.add_q_proj", f"{_T}.attn.add_k_proj", f"{_T}.attn.add_v_proj"])
        + fused(f"{_X}.attn2.qkv", [f"{_T}.attn2.to_q", f"{_T}.attn2.to_k", f"{_T}.attn2.to_v"])
        + [Rule(f"{_X}.attn.proj", f"{_T}.attn.to_out.0"), Rule(f"{_C}.attn.proj", f"{_T}.attn.to_add_out"),
           Rule(f"{_X}.attn2.proj", f"{_T}.attn2.to_out.0"),
           Rule(f"{_X}.mlp.fc1", f"{_T}.ff.net.0.proj"), Rule(f"{_X}.mlp.fc2", f"{_T}.ff.net.2"),
           Rule(f"{_C}.mlp.fc1", f"{_T}.ff_context.net.0.proj"), Rule(f"{_C}.mlp.fc2", f"{_T}.ff_context.net.2"),
           Rule(f"{_X}.attn.ln_q", f"{_T}.attn.norm_q"), Rule(f"{_X}.attn.ln_k", f"{_T}.attn.norm_k"),
           Rule(f"{_C}.attn.ln_q", f"{_T}.attn.norm_added_q"), Rule(f"{_C}.attn.ln_k", f"{_T}.attn.norm_added_k"),
           Rule(f"{_X}.attn2.ln_q", f"{_T}.attn2.norm_q"), Rule(f"{_X}.attn2.ln_k", f"{_T}.attn2.norm_k"),
           # the image stream's modulation keeps its row order; the context stream's is swapped in the last
           # (pre-only) block, so it is left unmapped and never a target
           Rule(f"{_X}.adaLN_modulation.1", f"{_T}.norm1.linear"),
           Rule("x_embedder.proj", "pos_embed.proj"),
           Rule("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
           Rule("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
           Rule("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
           Rule("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
           Rule("final_layer.linear", "proj_out"), Rule(_FINAL_MOD, "norm_out.linear")])
    default_targets = (f"{_X}.attn.qkv", f"{_C}.attn.qkv", f"{_X}.attn2.qkv", f"{_X}.attn.proj", f"{_C}.attn.proj",
                       f"{_X}.attn2.proj", f"{_X}.mlp.fc1", f"{_X}.mlp.fc2", f"{_C}.mlp.fc1", f"{_C}.mlp.fc2")
    optional = {
        "modulation": ("the image stream's adaLN modulation (the context stream's differs between layouts in the "
                       "last block)", [f"{_X}.adaLN_modulation.1"]),
        "embedders": ("t_embedder, y_embedder and context_embedder",
                      ["t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.mlp.0", "y_embedder.mlp.2",
                       "context_embedder"]),
        "final": ("final_layer.linear and its adaLN modulation", ["final_layer.linear", _FINAL_MOD]),
    }

    def format_notes(self, fmt, groups):
        if fmt in ("kohya", "comfy"):
            return ["diffusers' SD3 loader takes only the PEFT spelling: this file loads in ComfyUI; --format "
                    "diffusers (the auto spelling) loads in both"]
        return []
