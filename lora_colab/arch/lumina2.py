"""Lumina-Image 2.0 (NextDiT): Alpha-VLLM's single file (fused grouped-query qkv: q rows, then k and v of the
fewer kv heads) and diffusers' `Lumina2Transformer2DModel` layout (split to_q/to_k/to_v). Z-Image shares the
native block names; the `adaLN_modulation.1` index and diffusers' `attn.` names tell the two apart."""

import re

from .table import Rule, TableArchitecture, fused

_BLOCKS = ("noise_refiner.{i}", "context_refiner.{i}", "layers.{i}")
_MODULATED = ("noise_refiner.{i}", "layers.{i}")


class Lumina2(TableArchitecture):
    name = "lumina2"
    diffusers_classes = ("Lumina2Transformer2DModel",)  # the class a diffusers folder of this layout names
    title = "Lumina 2"
    unloaded_norms = ("norm_final",)  # ComfyUI's final LayerNorm is not elementwise-affine: no weight to patch
    base_model_version = "lumina2"
    modelspec_architecture = "lumina-2/lora"
    implementation = "https://github.com/Alpha-VLLM/Lumina-Image-2.0"
    metadata_tags = ("lumina-2", "lumina2", "lumina_2")
    lora_hint = re.compile(r"(?:^|_)(?:layers|noise_refiner)_\d+_adaLN_modulation_1|_attn_to_[qkv]$")
    # ComfyUI maps `diffusion_model.<native module>`; diffusers' Lumina 2 converter takes that spelling with
    # lora_A/B only, and only when every modulated block carries its adaLN_modulation.1: it is a default target
    auto_format = "comfy"
    comfy_peft = True
    native_probes = ("layers.0.attention.qkv.weight", "layers.0.adaLN_modulation.1.weight")
    diffusers_probes = ("layers.0.attn.to_q.weight", "layers.0.norm1.linear.weight")
    rules = tuple(
        [r for b in _BLOCKS for r in fused(f"{b}.attention.qkv", [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"])]
        + [Rule(f"{b}.attention.out", f"{b}.attn.to_out.0") for b in _BLOCKS]
        + [Rule(f"{b}.attention.q_norm", f"{b}.attn.norm_q") for b in _BLOCKS]
        + [Rule(f"{b}.attention.k_norm", f"{b}.attn.norm_k") for b in _BLOCKS]
        + [Rule(f"{b}.feed_forward.w{n}", f"{b}.feed_forward.linear_{n}") for b in _BLOCKS for n in (1, 2, 3)]
        + [Rule(f"{b}.adaLN_modulation.1", f"{b}.norm1.linear") for b in _MODULATED]
        + [Rule(f"{b}.attention_norm1", f"{b}.norm1.norm") for b in _MODULATED]
        + [Rule("context_refiner.{i}.attention_norm1", "context_refiner.{i}.norm1")]
        + [Rule(f"{b}.attention_norm2", f"{b}.norm2") for b in _BLOCKS]
        + [Rule("t_embedder.mlp.0", "time_caption_embed.timestep_embedder.linear_1"),
           Rule("t_embedder.mlp.2", "time_caption_embed.timestep_embedder.linear_2"),
           Rule("cap_embedder.0", "time_caption_embed.caption_embedder.0"),
           Rule("cap_embedder.1", "time_caption_embed.caption_embedder.1"),
           Rule("final_layer.adaLN_modulation.1", "norm_out.linear_1"), Rule("final_layer.linear", "norm_out.linear_2")])
    default_targets = tuple([f"{b}.{m}" for b in _BLOCKS for m in ("attention.qkv", "attention.out", "feed_forward.w1",
                                                                     "feed_forward.w2", "feed_forward.w3")]
                            + [f"{b}.adaLN_modulation.1" for b in _MODULATED])
    optional = {
        "embedders": ("x_embedder, t_embedder and the caption embedder's linear",
                      ["x_embedder", "t_embedder.mlp.0", "t_embedder.mlp.2", "cap_embedder.1"]),
        "final": ("final_layer.linear and its adaLN modulation", ["final_layer.linear", "final_layer.adaLN_modulation.1"]),
    }

    def _part_heights(self, module, shape, n):
        if module.endswith(".attention.qkv"):  # grouped-query: q has the model's width, k and v the rest
            q = shape[1]
            return [q, (shape[0] - q) // 2, (shape[0] - q) // 2]
        return super()._part_heights(module, shape, n)

    def format_notes(self, fmt, groups):
        if fmt == "kohya":
            return ["diffusers' Lumina 2 loader takes only `diffusion_model.` lora_A/B names: this file loads in "
                    "ComfyUI; --format comfy (the auto spelling) loads in both"]
        if fmt == "comfy" and set(groups) - {""}:
            return ["diffusers' Lumina 2 converter refuses any module beyond the blocks: with optional groups this "
                    "file loads in ComfyUI; for diffusers extract with --format diffusers"]
        if fmt == "diffusers":
            return ["ComfyUI maps Lumina 2's diffusers names only in Z-Image's spelling: this file loads in diffusers; "
                    "--format comfy (the auto spelling) loads in both"]
        return []
