"""Chroma (Chroma1-HD and fine-tunes): Flux.1's layout without per-block modulation weights, with the
distilled guidance layer ("approximator") instead."""

import re

from .common import PEFT_SUFFIXES, LoraModule, Target, find_prefix
from .flux import Flux

_APPROX = re.compile(r"distilled_guidance_layer\.(in_proj|out_proj|layers\.\d+\.(?:in_layer|out_layer))\.weight")
_TO_DIFFUSERS = {"in_layer": "linear_1", "out_layer": "linear_2"}


class Chroma(Flux):
    diffusers_reads_comfy = True  # diffusers reads its comfy-format files too, but not every .diff/.diff_b
    name = "chroma"
    diffusers_classes = ("ChromaTransformer2DModel",)  # the class a diffusers folder of this layout names
    title = "Chroma"
    base_model_version = "chroma"
    modelspec_architecture = "chroma/lora"
    implementation = "https://huggingface.co/lodestones/Chroma1-HD"
    metadata_tags = ("chroma",)
    lora_hint = re.compile(Flux.lora_hint.pattern + r"|distilled_guidance_layer")  # (Flux.1's names, but these)
    optional_groups = {"approximator": "distilled_guidance_layer (in_proj, its layers, out_proj)",
                       "embedders": "img_in and txt_in", "final": "final_layer.linear"}
    kohya_dropped_groups = set()  # (not measured for Chroma's converter: the report claims nothing)

    def detect(self, keys):
        prefix = find_prefix(keys, ["double_blocks.0.img_attn.qkv.weight", "distilled_guidance_layer.in_proj.weight"])
        if prefix is not None:
            return "native", prefix
        prefix = find_prefix(keys, ["transformer_blocks.0.attn.add_q_proj.weight",
                                    "distilled_guidance_layer.in_proj.weight"])
        if prefix is not None:
            return "diffusers", prefix
        return None

    def from_layout(self, native, layout):
        if layout == "diffusers" and native.startswith("distilled_guidance_layer."):
            for old, new in _TO_DIFFUSERS.items():
                native = native.replace(f".{new}.", f".{old}.")
            return native, 0, 1
        return super().from_layout(native, layout)

    def targets(self, shapes, groups=frozenset(), conv=False, text_encoders=True):
        found = super().targets(shapes, groups=set(groups) - {"approximator"})
        if "approximator" in groups:
            found += [Target(key, key[: -len(".weight")], tuple(shape), group="approximator")
                      for key, shape in shapes.items() if _APPROX.fullmatch(key) and len(shape) == 2]
        return found

    def diffusers_modules(self, target):
        if target.group != "approximator":
            return super().diffusers_modules(target)
        module = target.module
        for old, new in _TO_DIFFUSERS.items():
            module = module.replace(f".{old}", f".{new}")
        return [LoraModule("transformer." + module, None, PEFT_SUFFIXES, False)]
