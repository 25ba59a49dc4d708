"""HunyuanVideo 1.5: Tencent's single file (split img/txt attention q, k, v), ComfyUI's repackaged file (the
same names, with q, k, v fused as `img_attn_qkv`/`txt_attn_qkv`, which is ComfyUI's model and so the
canonical layout here) and diffusers' `HunyuanVideo15Transformer3DModel`. The token refiner fuses q, k, v in
every layout but diffusers'; the final adaLN modulation is (shift; scale), diffusers' `norm_out.linear`
(scale; shift)."""

import re

from .common import find_prefix
from .table import Rule, TableArchitecture, fused

_D = "double_blocks.{i}"
_T = "transformer_blocks.{i}"
_R = "txt_in.individual_token_refiner.blocks.{i}"
_RD = "context_embedder.token_refiner.refiner_blocks.{i}"
_STREAMS = (("img", ("attn.to_q", "attn.to_k", "attn.to_v"), "attn.to_out.0", "attn.norm_q", "attn.norm_k", "ff",
             "norm1.linear"),
            ("txt", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "attn.to_add_out", "attn.norm_added_q",
             "attn.norm_added_k", "ff_context", "norm1_context.linear"))
_EMBEDDERS = {"txt_in.input_embedder": "context_embedder.proj_in",
              "txt_in.t_embedder.mlp.0": "context_embedder.time_text_embed.timestep_embedder.linear_1",
              "txt_in.t_embedder.mlp.2": "context_embedder.time_text_embed.timestep_embedder.linear_2",
              "txt_in.c_embedder.linear_1": "context_embedder.time_text_embed.text_embedder.linear_1",
              "txt_in.c_embedder.linear_2": "context_embedder.time_text_embed.text_embedder.linear_2",
              "byt5_in.fc1": "context_embedder_2.linear_1", "byt5_in.fc2": "context_embedder_2.linear_2",
              "byt5_in.fc3": "context_embedder_2.linear_3", "vision_in.proj.1": "image_embedder.linear_1",
              "vision_in.proj.3": "image_embedder.linear_2", "time_in.mlp.0": "time_embed.timestep_embedder.linear_1",
              "time_in.mlp.2": "time_embed.timestep_embedder.linear_2",
              # the step-distilled (meanflow) checkpoints' second time embedder
              "time_r_in.mlp.0": "time_embed.timestep_embedder_r.linear_1",
              "time_r_in.mlp.2": "time_embed.timestep_embedder_r.linear_2"}
_RENAMED = {"byt5_in.layernorm": "context_embedder_2.norm", "vision_in.proj.0": "image_embedder.norm_in",
            "vision_in.proj.4": "image_embedder.norm_out", "img_in.proj": "x_embedder.proj",
            "cond_type_embedding": "cond_type_embed"}
_FINAL_MOD = "final_layer.adaLN_modulation.1"


def _stream_rules(s, qkv, out, q_norm, k_norm, ff, mod):
    return (fused(f"{_D}.{s}_attn_qkv", [f"{_T}.{n}" for n in qkv])
            + [Rule(f"{_D}.{s}_attn_proj", f"{_T}.{out}"), Rule(f"{_D}.{s}_attn_q_norm", f"{_T}.{q_norm}"),
               Rule(f"{_D}.{s}_attn_k_norm", f"{_T}.{k_norm}"), Rule(f"{_D}.{s}_mlp.fc1", f"{_T}.{ff}.net.0.proj"),
               Rule(f"{_D}.{s}_mlp.fc2", f"{_T}.{ff}.net.2"), Rule(f"{_D}.{s}_mod.linear", f"{_T}.{mod}")])


class HunyuanVideo15(TableArchitecture):
    name = "hunyuan_video15"
    diffusers_classes = ("HunyuanVideo15Transformer3DModel",)
    title = "HunyuanVideo 1.5"
    base_model_version = "hunyuan_video15"
    modelspec_architecture = "hunyuan-video-1.5/lora"
    implementation = "https://github.com/Tencent-Hunyuan/HunyuanVideo-1.5"
    metadata_tags = ("hunyuanvideo-1.5", "hunyuan-video-1.5", "hunyuanvideo1.5", "hunyuan_video15")
    lora_hint = re.compile(r"individual_token_refiner|byt5_in|(?:^|_)double_blocks_\d+_(?:img|txt)_attn_q(?:kv)?$")
    # ComfyUI's model is its repackaged file's: `diffusion_model.` + those names loads there. diffusers' loader
    # takes its own PEFT names only (it converts fused img_attn_qkv as HunyuanVideo 1's): the report says so.
    auto_format = "comfy"
    # ComfyUI's HunyuanVideo15.process_unet_state_dict (supported_models.py): the repackaged file's names become
    # its model's as it loads them, and its LoRA key map knows only those (plus diffusion-pipe's aliases of some
    # weights, none of a norm or an embedder, and none for kohya's names)
    comfy_renames = (("txt_in.t_embedder.mlp.0.", "txt_in.t_embedder.in_layer."),
                     ("txt_in.t_embedder.mlp.2.", "txt_in.t_embedder.out_layer."),
                     ("txt_in.c_embedder.linear_1.", "txt_in.c_embedder.in_layer."),
                     ("txt_in.c_embedder.linear_2.", "txt_in.c_embedder.out_layer."),
                     ("_mod.linear.", "_mod.lin."), ("_attn_qkv.", "_attn.qkv."),
                     ("mlp.fc1.", "mlp.0."), ("mlp.fc2.", "mlp.2."),
                     ("_attn_q_norm.", "_attn.norm.query_norm."), ("_attn_k_norm.", "_attn.norm.key_norm."),
                     (".q_norm.", ".norm.query_norm."), (".k_norm.", ".norm.key_norm."),
                     ("_attn_proj.", "_attn.proj."), (".modulation.linear.", ".modulation.lin."),
                     ("_in.mlp.2.", "_in.out_layer."), ("_in.mlp.0.", "_in.in_layer."))
    exhaustive_layout_map = True
    swapped_in_diffusers = (_FINAL_MOD,)  # (shift; scale) -> diffusers' (scale; shift)
    comfy_probes = ("double_blocks.0.img_attn_qkv.weight", "byt5_in.fc1.weight")
    native_probes = ("double_blocks.0.img_attn_q.weight", "byt5_in.fc1.weight")
    diffusers_probes = ("transformer_blocks.0.attn.add_q_proj.weight", "context_embedder_2.linear_1.weight")
    rules = tuple(
        [r for stream in _STREAMS for r in _stream_rules(*stream)]
        + fused(f"{_R}.self_attn_qkv", [f"{_RD}.attn.to_q", f"{_RD}.attn.to_k", f"{_RD}.attn.to_v"])
        + [Rule(f"{_R}.{n}", f"{_RD}.{d}") for n, d in (("self_attn_proj", "attn.to_out.0"),
                                                      ("mlp.fc1", "ff.net.0.proj"), ("mlp.fc2", "ff.net.2"),
                                                      ("adaLN_modulation.1", "norm_out.linear"),
                                                      ("norm1", "norm1"), ("norm2", "norm2"))]
        + [Rule(n, d) for n, d in {**_EMBEDDERS, **_RENAMED}.items()]
        + [Rule("final_layer.linear", "proj_out"), Rule(_FINAL_MOD, "norm_out.linear")])
    # Tencent's file: the double blocks' q, k, v are separate weights, rows of ComfyUI's fused ones
    split_rules = tuple(r for s in ("img", "txt") for r in fused(f"{_D}.{s}_attn_qkv",
                                                                  [f"{_D}.{s}_attn_{p}" for p in "qkv"]))
    default_targets = tuple([f"{_D}.{s}_{m}" for s in ("img", "txt")
                             for m in ("attn_qkv", "attn_proj", "mlp.fc1", "mlp.fc2")]
                            + [f"{_R}.{m}" for m in ("self_attn_qkv", "self_attn_proj", "mlp.fc1", "mlp.fc2")])
    optional = {
        "modulation": ("the double blocks' img_mod/txt_mod and the token refiner's adaLN modulation",
                       [f"{_D}.img_mod.linear", f"{_D}.txt_mod.linear", f"{_R}.adaLN_modulation.1"]),
        "embedders": ("the text, ByT5, vision and time embedders (and the meanflow variant's time_r_in)",
                      list(_EMBEDDERS)),
        "final": ("final_layer.linear and its adaLN modulation", ["final_layer.linear", _FINAL_MOD]),
    }

    def detect(self, keys):
        found = super().detect(keys)
        if found and found[0] == "native":
            return found
        prefix = find_prefix(keys, list(self.comfy_probes))
        return ("comfy", prefix) if prefix is not None else found

    def from_layout(self, native, layout):
        return self.by_rules(self.split_rules, native) if layout == "native" else super().from_layout(native, layout)

    def format_notes(self, fmt, groups):
        if fmt in ("kohya", "comfy"):
            return ["diffusers' HunyuanVideo 1.5 loader takes its own PEFT names only: this file loads in ComfyUI "
                    "(its repackaged model's names); for diffusers extract with --format diffusers"]
        return ["this file names diffusers' modules: it loads in diffusers; ComfyUI takes --format comfy "
                "(the auto spelling)"]
