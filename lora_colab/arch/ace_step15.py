"""ACE-Step 1.5 (music): the released model (`AceStepConditionGenerationModel`: the DiT as `decoder.*` beside its
condition encoder, audio tokenizer and detokenizer; ComfyUI's single file too) and diffusers'
`AceStepTransformer1DModel`, which is the decoder alone (attention `to_q`/`to_out.0`, convolutions renamed).

Its trainer's own LoRA spelling, `base_model.model.<decoder module>.lora_A/B` with q_proj/k_proj names, is the one
both clients take: ComfyUI maps it for ACE-Step 1.5 and diffusers' loader converts it; `comfy` writes it."""

import re

from .common import PEFT_SUFFIXES, LoraModule
from .table import Rule, TableArchitecture

_DECODER = "decoder."
_L, _D = "decoder.layers.{i}", "layers.{i}"
_ATTN = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "o_proj": "to_out.0", "q_norm": "norm_q",
         "k_norm": "norm_k"}
_TIME = ("time_embed", "time_embed_r")


class AceStep15(TableArchitecture):
    name = "ace_step15"
    diffusers_classes = ("AceStepTransformer1DModel",)
    title = "ACE-Step 1.5"
    base_model_version = "ace_step_1.5"
    modelspec_architecture = "ace-step-1.5/lora"
    implementation = "https://github.com/ace-step/ACE-Step-1.5"
    metadata_tags = ("ace-step", "ace_step", "acestep")
    lora_hint = re.compile(r"layers_\d+_(?:self|cross)_attn_[qkvo]_proj|layers_\d+_cross_attn_to_")
    auto_format = "comfy"
    diffusers_reads_comfy = True  # (its trainer's spelling, which diffusers' loader converts)
    native_probes = ("decoder.layers.0.self_attn.q_proj.weight", "decoder.layers.0.cross_attn.q_proj.weight",
                     "decoder.condition_embedder.weight")
    diffusers_probes = ("layers.0.self_attn.to_q.weight", "layers.0.cross_attn.to_q.weight",
                        "condition_embedder.weight")
    rules = tuple([Rule(f"{_L}.{a}.{n}", f"{_D}.{a}.{d}") for a in ("self_attn", "cross_attn")
                   for n, d in _ATTN.items()]
                  + [Rule("decoder.proj_in.1", "proj_in_conv"), Rule("decoder.proj_out.1", "proj_out_conv")])
    default_targets = tuple([f"{_L}.{a}.{n}" for a in ("self_attn", "cross_attn")
                             for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
                            + [f"{_L}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")])
    optional = {
        "modulation": ("the time embedders' modulation projections", [f"decoder.{t}.time_proj" for t in _TIME]),
        "embedders": ("the time embedders' MLPs and the condition embedder",
                      [f"decoder.{t}.{p}" for t in _TIME for p in ("linear_1", "linear_2")]
                      + ["decoder.condition_embedder"]),
    }

    def from_layout(self, native, layout):
        if layout != "diffusers":
            return native, 0, 1
        key, part, parts = self.by_rules(self.rules, native)
        return (key if key != native else _DECODER + native), part, parts  # the rest: the decoder's own names

    def _diffusers_parts(self, module):
        return [part.removeprefix(_DECODER) for part in super()._diffusers_parts(module)]  # (renamed or not)

    def lora_modules(self, target, fmt):
        if fmt == "comfy" and target.module.startswith(_DECODER):
            return [LoraModule("base_model.model." + target.module[len(_DECODER):], None, PEFT_SUFFIXES, False)]
        return super().lora_modules(target, fmt)

    def format_notes(self, fmt, groups):
        if fmt == "kohya":
            return ["diffusers' ACE-Step loader takes PEFT names only: this file loads in ComfyUI; --format comfy "
                    "(the auto spelling, its trainer's own) loads in both"]
        if fmt == "diffusers":
            return ["this file names diffusers' modules: it loads in diffusers; ComfyUI takes --format comfy "
                    "(the auto spelling, its trainer's own)"]
        return []
