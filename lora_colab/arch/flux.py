"""Flux.1: BFL single file (fused qkv and linear1) and diffusers layout."""

import re

from .common import PEFT_SUFFIXES, LoraModule, NativeArchitecture, Target, find_prefix
from .table import swapped_halves

_DOUBLE = re.compile(r"double_blocks\.(\d+)\.(img|txt)_(attn\.qkv|attn\.proj|mlp\.0|mlp\.2|mod\.lin)\.weight")
_SINGLE = re.compile(r"single_blocks\.(\d+)\.(linear1|linear2|modulation\.lin)\.weight")
_MODULATION = ("mod.lin", "modulation.lin")
_FINAL_MOD = "final_layer.adaLN_modulation.1"  # (shift; scale); diffusers' norm_out.linear holds (scale; shift)
# optional targets outside the blocks: BFL module -> group
_GLOBAL_GROUPS = {**{m: "embedders" for m in ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer",
                                               "vector_in.in_layer", "vector_in.out_layer", "guidance_in.in_layer",
                                               "guidance_in.out_layer")},
                  "final_layer.linear": "final", _FINAL_MOD: "final"}

# diffusers name (after the block index) -> BFL name, per block kind
_DIFF_DOUBLE = {
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
    "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
}
_DIFF_DOUBLE_FUSED = {"attn.to_q": ("img_attn.qkv", 0, 3), "attn.to_k": ("img_attn.qkv", 1, 3),
                      "attn.to_v": ("img_attn.qkv", 2, 3), "attn.add_q_proj": ("txt_attn.qkv", 0, 3),
                      "attn.add_k_proj": ("txt_attn.qkv", 1, 3), "attn.add_v_proj": ("txt_attn.qkv", 2, 3)}
_DIFF_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin",
                "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
_DIFF_SINGLE_FUSED = {"attn.to_q": ("linear1", 0, 4), "attn.to_k": ("linear1", 1, 4),
                      "attn.to_v": ("linear1", 2, 4), "proj_mlp": ("linear1", 3, 4)}
_DIFF_GLOBAL = {"x_embedder": "img_in", "context_embedder": "txt_in",
                "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
                "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
                "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
                "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
                "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
                "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
                "proj_out": "final_layer.linear", "norm_out.linear": _FINAL_MOD}
_DIFF_KEY = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)\.(weight|bias|scale)")

# BFL module (after the block index) -> diffusers module, for writing diffusers-format LoRAs
_TO_DIFF_DOUBLE = {bfl: diff for diff, bfl in _DIFF_DOUBLE.items()}
_TO_DIFF_SINGLE = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
_TO_DIFF_GLOBAL = {bfl: diff for diff, bfl in _DIFF_GLOBAL.items()}


def _diffusers_to_bfl(native):
    """(canonical key, part index, part count) for a diffusers Flux key, or None when unmapped."""
    hit = _DIFF_KEY.fullmatch(native)
    if hit:
        kind, index, module, param = hit.groups()
        block = ("double_blocks." if kind == "transformer_blocks" else "single_blocks.") + index
        fused = _DIFF_DOUBLE_FUSED if kind == "transformer_blocks" else _DIFF_SINGLE_FUSED
        renames = _DIFF_DOUBLE if kind == "transformer_blocks" else _DIFF_SINGLE
        if module in fused:
            name, part, count = fused[module]
            return f"{block}.{name}.{param}", part, count
        if module in renames:
            param = "scale" if "norm" in renames[module] and param == "weight" else param
            return f"{block}.{renames[module]}.{param}", 0, 1
        return None
    module, _, param = native.rpartition(".")
    if module in _DIFF_GLOBAL:
        return f"{_DIFF_GLOBAL[module]}.{param}", 0, 1
    return None


class Flux(NativeArchitecture):
    name = "flux"
    diffusers_classes = ("FluxTransformer2DModel",)  # the class a diffusers folder of this layout names
    title = "Flux.1"
    auto_format = "kohya"
    base_model_version = "flux1"
    modelspec_architecture = "flux-1-dev/lora"
    implementation = "https://github.com/black-forest-labs/flux"
    lora_hint = re.compile(r"(?:^|_)(?:double_blocks_\d+_(?:img|txt)_|single_blocks_\d+_linear)"
                           r"|single_transformer_blocks_\d+_(?:proj_mlp|proj_out|attn_to_[qkv])"
                           r"|(?:^|_)transformer_blocks_\d+_(?:attn_(?:to_[qkv]|add_[qkv]_proj|to_out_0|to_add_out)|"
                           r"ff(?:_context)?_net_(?:0_proj|2))$")
    metadata_tags = ("flux-1", "flux1", "flux.1")
    optional_groups = {"modulation": "img_mod/txt_mod/modulation linears",
                       "embedders": "img_in, txt_in and the time, vector and guidance embedders",
                       "final": "final_layer.linear and its adaLN modulation"}
    kohya_dropped_groups = {"embedders", "final"}  # what diffusers' kohya converter skips silently (measured)

    def detect(self, keys):
        prefix = find_prefix(keys, ["double_blocks.0.img_attn.qkv.weight"])
        if prefix is not None:
            return "bfl", prefix
        prefix = find_prefix(keys, ["transformer_blocks.0.attn.add_q_proj.weight",
                                    "single_transformer_blocks.0.proj_mlp.weight"])
        if prefix is not None:
            return "diffusers", prefix
        return None

    def from_layout(self, native, layout):
        return _diffusers_to_bfl(native) if layout == "diffusers" else (native, 0, 1)

    def row_order(self, key, layout, shape_of):
        if layout == "diffusers" and key in (f"{_FINAL_MOD}.weight", f"{_FINAL_MOD}.bias"):
            return swapped_halves(shape_of(key)[0])
        return None

    def targets(self, shapes, groups=frozenset(), conv=False, text_encoders=True):
        found = [Target(key, key[: -len(".weight")], tuple(shape), group=_GLOBAL_GROUPS[key[: -len(".weight")]])
                 for key, shape in shapes.items() if key.endswith(".weight") and len(shape) == 2
                 and _GLOBAL_GROUPS.get(key[: -len(".weight")]) in groups]
        for key, shape in shapes.items():
            hit = _DOUBLE.fullmatch(key) or _SINGLE.fullmatch(key)
            if not hit or len(shape) != 2:
                continue
            module = key[: -len(".weight")]
            group = "modulation" if module.endswith(_MODULATION) else ""
            if group and group not in groups:
                continue
            splits = ()
            if module.endswith(".qkv"):
                d = shape[0] // 3
                splits = (("q", 0, d), ("k", d, 2 * d), ("v", 2 * d, 3 * d))
            elif module.endswith(".linear1"):
                d = shape[1]  # hidden size; rows are q, k, v (hidden each) then the MLP input
                splits = (("q", 0, d), ("k", d, 2 * d), ("v", 2 * d, 3 * d), ("mlp", 3 * d, shape[0]))
            found.append(Target(key, module, tuple(shape), splits=splits, group=group))
        return found

    def format_notes(self, fmt, groups):
        if fmt == "kohya" and set(groups) & self.kohya_dropped_groups:
            return [f"diffusers' kohya converter for {self.title} drops the embedders and the final layer without "
                    "a word: those load in ComfyUI; for diffusers extract with --format diffusers"]
        return []

    def diffusers_modules(self, target):
        peft = PEFT_SUFFIXES
        if target.module in _GLOBAL_GROUPS:
            order = swapped_halves(target.shape[0]) if target.module == _FINAL_MOD else None
            return [LoraModule(f"transformer.{_TO_DIFF_GLOBAL[target.module]}", None, peft, False, order=order)]
        kind, index, rest = target.module.split(".", 2)
        if kind == "double_blocks":
            block = f"transformer.transformer_blocks.{index}"
            if rest.endswith("attn.qkv"):
                names = ("to_q", "to_k", "to_v") if rest.startswith("img") else ("add_q_proj", "add_k_proj",
                                                                                  "add_v_proj")
                return [LoraModule(f"{block}.attn.{n}", (a, b), peft, False)
                        for n, (_, a, b) in zip(names, target.splits)]
            return [LoraModule(f"{block}.{_TO_DIFF_DOUBLE[rest]}", None, peft, False)]
        block = f"transformer.single_transformer_blocks.{index}"
        if rest == "linear1":
            names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
            return [LoraModule(f"{block}.{n}", (a, b), peft, False) for n, (_, a, b) in zip(names, target.splits)]
        return [LoraModule(f"{block}.{_TO_DIFF_SINGLE[rest]}", None, peft, False)]
