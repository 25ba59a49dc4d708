"""MiniMax-H3 (joint video + audio DiT, one packed sequence): the reference layout (Comfy-Org's single file,
the MiniMaxAI shards) and diffusers' `MiniMaxH3Transformer3DModel`. The reference fuses q, k, v in
`attn.qkv_proj`: single files stack the rows (q; k; v), the MiniMaxAI shards interleave them per head (same
keys and shapes: a sharded checkpoint is read as interleaved, and a pair whose rows match only the other
way is read that way). `mlp.fc1` is (gate; value), diffusers' `ff.net.0.proj` (value; gate)."""

import re

from .table import Rule, TableArchitecture, fused

_BLOCKS = (("blocks.{i}", "transformer_blocks.{i}"), ("token_refiner.blocks.{i}", "token_refiner.refiner_blocks.{i}"))
_IN_BLOCK = {"attn.out_proj": "attn.to_out.0", "attn.q_norm": "attn.norm_q", "attn.k_norm": "attn.norm_k",
             "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2", "norm1": "norm1", "norm2": "norm2"}
_EMBEDDERS = {"video_patch_proj": "proj_in", "audio_patch_proj": "audio_proj_in", "condition_proj": "context_embedder",
              "time_embedder.proj_in": "time_embedder.linear_1", "time_embedder.proj_out": "time_embedder.linear_2"}
_FINAL = {"final_layer.video_out": "proj_out", "final_layer.audio_out": "audio_proj_out"}
INTERLEAVED = "native, q/k/v per head"  # the layout name of the MiniMaxAI shards


def per_head(rows, head_dim):
    """Segments of per-head interleaved q/k/v rows ([h0: q k v, h1: q k v, ...]) in stacked order."""
    heads = rows // (3 * head_dim)
    return tuple((h * 3 * head_dim + j * head_dim, h * 3 * head_dim + (j + 1) * head_dim)
                 for j in range(3) for h in range(heads))


class MiniMaxH3(TableArchitecture):
    name = "minimax_h3"
    diffusers_classes = ("MiniMaxH3Transformer3DModel",)
    title = "MiniMax-H3"
    base_model_version = "minimax_h3"
    modelspec_architecture = "minimax-h3/lora"
    implementation = "https://huggingface.co/MiniMaxAI/MiniMax-H3"
    metadata_tags = ("minimax-h3", "minimax_h3", "minimaxh3")
    lora_hint = re.compile(r"(?:^|_)blocks_\d+_attn_qkv_proj$|(?:^|_)blocks_\d+_adaln_proj_linear$")
    # diffusers' MiniMax-H3 converter takes kohya's `lora_unet_` names (musubi-tuner's) with alpha, and ComfyUI
    # maps every `lora_unet_<native module>`: this spelling loads in both
    auto_format = "kohya"
    diffusers_reads_comfy = True  # (`diffusion_model.` + native names too)
    exhaustive_layout_map = True
    swapped_in_diffusers = ("blocks.{i}.mlp.fc1", "token_refiner.blocks.{i}.mlp.fc1")  # (gate; value) -> (value; gate)
    native_probes = ("blocks.0.attn.qkv_proj.weight", "token_refiner.blocks.0.attn.qkv_proj.weight")
    diffusers_probes = ("transformer_blocks.0.attn.to_q.weight", "token_refiner.refiner_blocks.0.attn.to_q.weight")
    rules = tuple(
        [r for n, d in _BLOCKS for r in fused(f"{n}.attn.qkv_proj", [f"{d}.attn.to_q", f"{d}.attn.to_k",
                                                                       f"{d}.attn.to_v"])]
        + [Rule(f"{n}.{a}", f"{d}.{b}") for n, d in _BLOCKS for a, b in _IN_BLOCK.items()]
        + [Rule("blocks.{i}.adaln_proj.linear", "transformer_blocks.{i}.adaln_proj.linear")]
        + [Rule(n, d) for n, d in {**_EMBEDDERS, **_FINAL}.items()]
        + [Rule("final_layer.norm", "norm_out.norm"), Rule("final_layer.adaln_proj.linear", "norm_out.linear")])
    default_targets = tuple(f"{n}.{m}" for n, _ in _BLOCKS
                            for m in ("attn.qkv_proj", "attn.out_proj", "mlp.fc1", "mlp.fc2"))
    optional = {
        "modulation": ("each block's and the final layer's adaln_proj.linear",
                       ["blocks.{i}.adaln_proj.linear", "final_layer.adaln_proj.linear"]),
        "embedders": ("the video and audio patch projections, condition_proj and the time embedder",
                      list(_EMBEDDERS)),
        "final": ("the video and audio output heads", list(_FINAL)),
    }

    def stored_layout(self, layout, sharded):
        """The MiniMaxAI shards store q/k/v per head; published single files (and GGUFs) stack them."""
        return INTERLEAVED if layout == "native" and sharded else layout

    def other_layouts(self, layout):
        """The layouts a file of `layout` may really be in (keys and shapes alike), to try on a pair."""
        return {"native": [INTERLEAVED], INTERLEAVED: ["native"]}.get(layout, [])

    def row_order(self, key, layout, shape_of):
        if layout == INTERLEAVED and key.endswith(".attn.qkv_proj.weight"):
            head_dim = shape_of(key.replace(".qkv_proj.weight", ".q_norm.weight"))[0]
            return per_head(shape_of(key)[0], head_dim)
        return super().row_order(key, layout, shape_of)

    def pair_probe(self, shapes):
        """(canonical key, rows) whose rows differ between the stacked and per-head q/k/v orders: the first
        block's second head-width of q rows (k of head 0 when read per head)."""
        key = "blocks.0.attn.qkv_proj.weight"
        if key not in shapes or "blocks.0.attn.q_norm.weight" not in shapes:
            return None
        head_dim = shapes["blocks.0.attn.q_norm.weight"][0]
        return key, (head_dim, 2 * head_dim)

    def format_notes(self, fmt, groups):
        if fmt == "diffusers":
            return ["this file names diffusers' modules (`transformer.`): it loads in diffusers (into "
                    "transformer_ref with load_into_transformer_ref=True); ComfyUI takes the kohya spelling "
                    "(--format auto)"]
        return []
