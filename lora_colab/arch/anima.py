"""Anima (a Cosmos-Predict2 2B DiT with an LLM adapter): the released single file (`net.` prefix; the adapter
as `net.llm_adapter.*`, which diffusers loads as the separate AnimaTextConditioner) and diffusers'
`CosmosTransformer3DModel` layout of the DiT."""

import re

from .common import PEFT_SUFFIXES, LoraModule
from .table import Rule, TableArchitecture

_B, _T = "blocks.{i}", "transformer_blocks.{i}"
_ATTN = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "output_proj": "to_out.0",
         "q_norm": "norm_q", "k_norm": "norm_k"}
_MODULATION = {"adaln_modulation_self_attn": "norm1", "adaln_modulation_cross_attn": "norm2",
               "adaln_modulation_mlp": "norm3"}
_ADAPTER = "llm_adapter.blocks.{i}"


class Anima(TableArchitecture):
    name = "anima"
    # diffusers has no class of Anima's own: CosmosTransformer3DModel serves Cosmos Predict too (2.5 has a table of
    # its own, arch/cosmos.py; Predict 2's folders go through the PEFT fallback); this table reads the single files
    diffusers_classes = ("AnimaTransformer (none in diffusers)",)
    # diffusers keeps Anima's DiT as a CosmosTransformer3DModel (Cosmos Predict 2's class, the same keys): an
    # Anima pipeline's folder says what it is, a Cosmos one goes to the fallback
    diffusers_pipelines = ("AnimaPipeline", "AnimaModularPipeline")
    title = "Anima"
    base_model_version = "anima"
    modelspec_architecture = "anima/lora"
    implementation = "https://huggingface.co/circlestone-labs/Anima"
    metadata_tags = ("anima",)
    lora_hint = re.compile(r"blocks_\d+_(?:self|cross)_attn_(?:q|k|v|output)_proj|llm_adapter_blocks")
    # diffusers' Anima converter takes `diffusion_model.` + native names (llm_adapter. -> its text conditioner)
    # and ComfyUI maps `diffusion_model.<module>`: lora_A/B under that prefix loads in both
    auto_format = "comfy"
    comfy_peft = True
    own_prefixes = ("net.",)  # the released file's (the model is Cosmos' MiniTrainDIT `net`)
    native_probes = ("blocks.0.self_attn.q_proj.weight", "blocks.0.adaln_modulation_mlp.1.weight")
    diffusers_probes = ("transformer_blocks.0.attn1.to_q.weight", "transformer_blocks.0.norm3.linear_1.weight")
    rules = tuple([Rule(f"{_B}.{a}.{n}", f"{_T}.{d}.{m}") for a, d in (("self_attn", "attn1"), ("cross_attn", "attn2"))
                   for n, m in _ATTN.items()]
                  + [Rule(f"{_B}.mlp.layer1", f"{_T}.ff.net.0.proj"), Rule(f"{_B}.mlp.layer2", f"{_T}.ff.net.2")]
                  + [Rule(f"{_B}.{n}.{k}", f"{_T}.{d}.linear_{k}") for n, d in _MODULATION.items() for k in (1, 2)]
                  + [Rule("x_embedder.proj.1", "patch_embed.proj"),
                     Rule("t_embedder.1.linear_1", "time_embed.t_embedder.linear_1"),
                     Rule("t_embedder.1.linear_2", "time_embed.t_embedder.linear_2"),
                     Rule("t_embedding_norm", "time_embed.norm"),
                     Rule("final_layer.adaln_modulation.1", "norm_out.linear_1"),
                     Rule("final_layer.adaln_modulation.2", "norm_out.linear_2"),
                     Rule("final_layer.linear", "proj_out")])
    default_targets = tuple([f"{_B}.{a}.{n}" for a in ("self_attn", "cross_attn")
                             for n in ("q_proj", "k_proj", "v_proj", "output_proj")]
                            + [f"{_B}.mlp.layer1", f"{_B}.mlp.layer2"])
    optional = {
        "modulation": ("the blocks' and final layer's adaLN-LoRA modulation",
                       [f"{_B}.{n}.{k}" for n in _MODULATION for k in (1, 2)]
                       + ["final_layer.adaln_modulation.1", "final_layer.adaln_modulation.2"]),
        "embedders": ("x_embedder and t_embedder", ["x_embedder.proj.1", "t_embedder.1.linear_1", "t_embedder.1.linear_2"]),
        "final": ("final_layer.linear", ["final_layer.linear"]),
        "llm_adapter": ("the LLM adapter (diffusers' text conditioner): attention, MLP, out_proj",
                        [f"{_ADAPTER}.{a}.{p}" for a in ("self_attn", "cross_attn")
                         for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
                        + [f"{_ADAPTER}.mlp.0", f"{_ADAPTER}.mlp.2", "llm_adapter.out_proj"]),
    }

    def diffusers_modules(self, target):
        if target.module.startswith("llm_adapter."):  # diffusers loads the adapter as its text conditioner
            return [LoraModule("text_conditioner." + target.module[len("llm_adapter."):], None, PEFT_SUFFIXES,
                               False)]
        return super().diffusers_modules(target)
