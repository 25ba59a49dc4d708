"""Kandinsky 5.0 (Image Lite and the video models of the same design): one layout, the original names, which
diffusers' `Kandinsky5Transformer3DModel` keeps; text blocks, then visual blocks with self- and
cross-attention."""

import re

from .table import TableArchitecture

_T, _V = "text_transformer_blocks.{i}", "visual_transformer_blocks.{i}"
_ATTN = ("to_query", "to_key", "to_value", "out_layer")


class Kandinsky5(TableArchitecture):
    name = "kandinsky5"
    diffusers_classes = ("Kandinsky5Transformer3DModel",)  # the class a diffusers folder of this layout names
    title = "Kandinsky 5"
    base_model_version = "kandinsky5"
    modelspec_architecture = "kandinsky-5/lora"
    implementation = "https://github.com/kandinskylab/kandinsky-5"
    metadata_tags = ("kandinsky-5", "kandinsky5", "kandinsky_5")
    lora_hint = re.compile(r"visual_transformer_blocks_\d+_(?:self|cross)_attention|text_transformer_blocks_\d+")
    # diffusers' Kandinsky loader converts nothing (PEFT names only, `transformer.` + its module names, which are
    # this file's); ComfyUI's Kandinsky5 model also takes `transformer.` + its own names (comfy/lora.py): the PEFT
    # spelling loads in both (bench/comfy_check.py, ComfyUI 783545f)
    auto_format = "diffusers"
    native_probes = ("visual_transformer_blocks.0.self_attention.to_query.weight",
                     "text_transformer_blocks.0.self_attention.to_query.weight")
    default_targets = tuple([f"{_T}.self_attention.{a}" for a in _ATTN]
                            + [f"{_T}.feed_forward.{m}" for m in ("in_layer", "out_layer")]
                            + [f"{_V}.{kind}.{a}" for kind in ("self_attention", "cross_attention") for a in _ATTN]
                            + [f"{_V}.feed_forward.{m}" for m in ("in_layer", "out_layer")])
    optional = {
        "modulation": ("the text, visual and output modulations",
                       [f"{_T}.text_modulation.out_layer", f"{_V}.visual_modulation.out_layer",
                        "out_layer.modulation.out_layer"]),
        "embedders": ("the time, text, pooled-text and visual embeddings",
                      ["time_embeddings.in_layer", "time_embeddings.out_layer", "text_embeddings.in_layer",
                       "pooled_text_embeddings.in_layer", "visual_embeddings.in_layer"]),
        "final": ("out_layer.out_layer", ["out_layer.out_layer"]),
    }

    def format_notes(self, fmt, groups):
        if fmt == "diffusers":
            return []
        return ["diffusers' Kandinsky 5 loader takes only the PEFT spelling: this file loads in ComfyUI; the "
                "default (--format diffusers) loads in both"]
