"""Cosmos Predict 2.5 (2B, 14B): NVIDIA's released DiT (`net.` prefix, Cosmos-Predict2's MiniTrainDIT names, and
the projection of the Qwen2.5-VL text features, `crossattn_proj`) and diffusers' `CosmosTransformer3DModel`
layout. The DiT is Anima's (Cosmos Predict 2 2B), so the table is Anima's without its LLM adapter."""

import re

from .anima import Anima


class CosmosPredict25(Anima):
    name = "cosmos_predict2_5"
    diffusers_classes = ("CosmosTransformer3DModel",)
    diffusers_pipelines = ("Cosmos2_5_PredictBasePipeline",)
    title = "Cosmos Predict 2.5"
    base_model_version = "cosmos_predict2_5"
    modelspec_architecture = "cosmos-predict2.5/lora"
    implementation = "https://github.com/nvidia-cosmos/cosmos-predict2.5"
    metadata_tags = ("cosmos-predict2.5", "cosmos_predict2_5", "cosmos2_5")
    lora_hint = re.compile(r"crossattn_proj")
    # diffusers' Cosmos loader takes its own PEFT names only; ComfyUI (783545f) has no Predict 2.5 model: it reads
    # the DiT as Predict 2's, without crossattn_proj (its key map takes `diffusion_model.<module>` for the rest)
    auto_format = "diffusers"
    native_probes = Anima.native_probes + ("crossattn_proj.0.weight",)
    diffusers_probes = Anima.diffusers_probes + ("crossattn_proj.0.weight",)
    optional = {**{k: v for k, v in Anima.optional.items() if k != "llm_adapter"},
                "embedders": ("x_embedder, t_embedder and the text features' projection (crossattn_proj)",
                              ["x_embedder.proj.1", "t_embedder.1.linear_1", "t_embedder.1.linear_2",
                               "crossattn_proj.0"])}

    def format_notes(self, fmt, groups):
        if fmt in ("kohya", "comfy"):
            return ["diffusers' Cosmos loader takes its own PEFT names only (the auto spelling); these names are "
                    "what ComfyUI's Cosmos Predict 2 key map takes, but ComfyUI has no Predict 2.5 model yet"]
        return []
