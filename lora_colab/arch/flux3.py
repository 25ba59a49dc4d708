"""FLUX.3 (image [klein] base and its step-distilled flow-map variant): BFL's single file (per-mode blocks
with split q/k/v and a fused SwiGLU `mlp_in`) and diffusers' `Flux3Transformer2DModel` layout, which keeps
the same fusions: the two differ in names only."""

import re

from .table import Rule, TableArchitecture, kohya_not_diffusers

_STREAMS = (("content_mode_blocks.image.{i}", "mode_blocks.image.{i}"),
            ("content_mode_blocks.image_cond.{i}", "mode_blocks.image_cond.{i}"),
            ("txt_mode_blocks.{i}", "txt_mode_blocks.{i}"),
            ("single_blocks.{i}", "single_transformer_blocks.{i}"))
_BLOCK = {"q_proj": "attn.to_q", "k_proj": "attn.to_k", "v_proj": "attn.to_v", "attn_out": "attn.to_out.0",
          "mlp_in": "ff.linear_in", "mlp_out": "ff.linear_out"}
_MODULATIONS = [f"{when}_stream_modulations.{mode}" for when in ("early", "single")
                for mode in ("image", "image_cond", "txt")]
_EMBEDDERS = {"emb_in.image": "x_embedders.image", "emb_in.image_cond": "x_embedders.image_cond",
              "txt_in": "context_embedder", "time_in.in_layer": "timestep_embedder.linear_1",
              "time_in.out_layer": "timestep_embedder.linear_2",
              "ref_time_in.in_layer": "target_timestep_embedder.linear_1",  # the distilled (flow-map) variant
              "ref_time_in.out_layer": "target_timestep_embedder.linear_2"}
_FINAL_MOD = "final_layer.image.adaLN_modulation.1"


class Flux3(TableArchitecture):
    name = "flux3"
    diffusers_classes = ("Flux3Transformer2DModel",)  # the class a diffusers folder of this layout names
    title = "FLUX.3"
    base_model_version = "flux3"
    modelspec_architecture = "flux-3/lora"
    implementation = "https://github.com/black-forest-labs/flux3"
    metadata_tags = ("flux-3", "flux3", "flux.3")
    lora_hint = re.compile(r"content_mode_blocks|mode_blocks_image|txt_mode_blocks|early_stream_modulations")
    # diffusers' FLUX.3 converter takes `diffusion_model.` + native names (it renames block layers only), and
    # ComfyUI maps `diffusion_model.<native module>`: lora_A/B under that prefix loads in both
    auto_format = "comfy"
    comfy_peft = True
    native_probes = ("content_mode_blocks.image.0.q_proj.weight", "early_stream_modulations.image.lin.weight")
    diffusers_probes = ("mode_blocks.image.0.attn.to_q.weight", "early_stream_modulations.image.linear.weight")
    swapped_in_diffusers = (_FINAL_MOD,)  # (shift; scale) -> diffusers' norm_out.linear (scale; shift)
    rules = tuple([Rule(f"{n}.{a}", f"{d}.{b}") for n, d in _STREAMS for a, b in _BLOCK.items()]
                  + [Rule(f"{m}.lin", f"{m}.linear") for m in _MODULATIONS]
                  + [Rule(n, d) for n, d in _EMBEDDERS.items()]
                  + [Rule("final_layer.image.linear", "proj_out"), Rule(_FINAL_MOD, "norm_out.linear")])
    default_targets = tuple(f"{n}.{a}" for n, _ in _STREAMS for a in _BLOCK)
    optional = {
        "modulation": ("the early and single stream modulation linears of each mode",
                       [f"{m}.lin" for m in _MODULATIONS]),
        "embedders": ("emb_in, txt_in, the time embedders (ref_time_in too, on the distilled model)",
                      list(_EMBEDDERS)),
        "final": ("final_layer.image.linear and its adaLN modulation", ["final_layer.image.linear", _FINAL_MOD]),
    }

    def format_notes(self, fmt, groups):
        if fmt in ("kohya", "comfy") and set(groups) - {""}:
            return ["diffusers' FLUX.3 converter renames block layers only: the optional groups in this spelling "
                    "load in ComfyUI; for diffusers extract with --format diffusers"]
        if fmt == "kohya":
            return [kohya_not_diffusers(self.title)]
        return []
