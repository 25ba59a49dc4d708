"""HiDream-I1 (Full, Dev, Fast): one layout, the diffusers names (Comfy-Org's single files carry them under
`model.diffusion_model.`); double-stream blocks with split q/k/v per stream, single-stream blocks, and MoE
feed-forwards (a shared expert plus routed experts; the router's gate is never a target)."""

import re

from .table import TableArchitecture, kohya_not_diffusers

_D, _S = "double_stream_blocks.{i}.block", "single_stream_blocks.{i}.block"
_ATTN = ("to_q", "to_k", "to_v", "to_out")
_ATTN_T = ("to_q_t", "to_k_t", "to_v_t", "to_out_t")
_W = ("w1", "w2", "w3")


def _moe(block):
    return ([f"{block}.ff_i.shared_experts.{w}" for w in _W]
            + [f"{block}.ff_i.experts.{{e}}.{w}" for w in _W])


class HiDream(TableArchitecture):
    name = "hidream"
    diffusers_classes = ("HiDreamImageTransformer2DModel",)  # the class a diffusers folder of this layout names
    title = "HiDream-I1"
    base_model_version = "hidream"
    modelspec_architecture = "hidream-i1/lora"
    implementation = "https://github.com/HiDream-ai/HiDream-I1"
    metadata_tags = ("hidream",)
    lora_hint = re.compile(r"double_stream_blocks_\d+_block|single_stream_blocks_\d+_block")
    # diffusers' HiDream loader takes `diffusion_model.` + these names (all keys so prefixed), ComfyUI maps
    # `diffusion_model.<module>`: lora_A/B under that prefix loads in both
    auto_format = "comfy"
    comfy_peft = True
    native_probes = ("double_stream_blocks.0.block.attn1.to_q_t.weight", "double_stream_blocks.0.block.ff_i.gate.weight")
    default_targets = tuple([f"{_D}.attn1.{a}" for a in _ATTN + _ATTN_T] + _moe(_D)
                            + [f"{_D}.ff_t.{w}" for w in _W]
                            + [f"{_S}.attn1.{a}" for a in _ATTN] + _moe(_S))
    optional = {
        "modulation": ("the blocks' and the final layer's adaLN modulation",
                       [f"{_D}.adaLN_modulation.1", f"{_S}.adaLN_modulation.1", "final_layer.adaLN_modulation.1"]),
        "embedders": ("x_embedder, the time and pooled-text embedders and the caption projections",
                      ["x_embedder.proj", "t_embedder.timestep_embedder.linear_1",
                       "t_embedder.timestep_embedder.linear_2", "p_embedder.pooled_embedder.linear_1",
                       "p_embedder.pooled_embedder.linear_2", "caption_projection.{i}.linear"]),
        "final": ("final_layer.linear", ["final_layer.linear"]),
    }

    def format_notes(self, fmt, groups):
        if fmt == "kohya":
            return [kohya_not_diffusers(self.title)]
        return []
