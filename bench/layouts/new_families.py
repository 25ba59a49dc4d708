"""Full layouts (key, shape, dtype) of the families added after ../shared/layouts was made, written to
tests/layouts like the shared ones: the diffusers layout is the `state_dict()` of diffusers 0.42.1's class
built on the meta device with the release's config; the native layout is derived from it (or is ComfyUI's own
model's) and checked.

    python bench/layouts/new_families.py [--write] [--comfyui DIR]

Checks (each prints ok or the keys that differ):
- conv: the native layout (meta tensors) through diffusers' own single-file converter gives exactly the
  diffusers class's keys and shapes (Cosmos Predict 2.5, Wan-Animate 2).
- orig: the native layout equals the `state_dict()` of ComfyUI's own model built on meta with the release's
  config (LTX-2.5: ComfyUI's LTXAV with the flags the release's `config` metadata carries; needs --comfyui
  and ComfyUI's venv, see bench/comfy_check.py; ACE-Step 1.5: ComfyUI's AceStepConditionGenerationModel, whose
  decoder, renamed as diffusers' LoRA converter renames attention, is diffusers' AceStepTransformer1DModel).
"""

import argparse
import json
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "layouts"

# LTX-2.5 22B: the flags its DiT's `config` metadata sets (LTX-2.3 added gated attention, cross-attention
# adaLN and the prompt adaLN; 2.4 dropped the video FF biases; the caption projection moved into the text
# encoder); the rest are the LTX-2 class defaults (48 layers, 4096/2048 wide)
LTX25_COMFY = dict(apply_gated_attention=True, caption_proj_before_connector=True, caption_projection_first_linear=False,
                   cross_attention_adaln=True, ff_bias=False, audio_ff_bias=True, use_prompt_adaln_single=True,
                   use_keyframes_abs_pos_embedding=True)
LTX25_DIFFUSERS = dict(gated_attn=True, cross_attn_mod=True, audio_gated_attn=True, audio_cross_attn_mod=True,
                       use_prompt_embeddings=False, perturbed_attn=True, ff_bias=False, audio_ff_bias=True,
                       use_prompt_adaln_single=True, use_keyframes_abs_pos_embedding=True, rope_type="split")
# diffusers' scripts/convert_cosmos_to_diffusers.py "Cosmos-2.5-Predict-Base-2B"
COSMOS25_2B = dict(in_channels=17, out_channels=16, num_attention_heads=16, attention_head_dim=128, num_layers=28,
                   mlp_ratio=4.0, text_embed_dim=1024, adaln_lora_dim=256, max_size=(128, 240, 240),
                   patch_size=(1, 2, 2), rope_scale=(1.0, 3.0, 3.0), concat_padding_mask=True,
                   extra_pos_embed_type=None, use_crossattn_projection=True, crossattn_proj_in_channels=100352,
                   encoder_hidden_states_channels=1024)


def meta_state(cls_name, **config):
    import diffusers
    with torch.device("meta"):
        model = getattr(diffusers, cls_name)(**config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def renamed(shapes, renames, prefix=""):
    """`shapes` with each key's substrings renamed in turn (first match of each pair), under `prefix`."""
    out = {}
    for key, shape in shapes.items():
        for old, new in renames:
            key = re.sub(old, new, key)
        out[prefix + key] = shape
    return out


def compare(label, got, want):
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    shapes = sorted(k for k in set(got) & set(want) if tuple(got[k]) != tuple(want[k]))
    ok = not (missing or extra or shapes)
    print(f"{label}: {'ok' if ok else 'DIFFERS'}" + ("" if ok else f" missing {missing[:5]} extra {extra[:5]} "
                                                                 f"shape {shapes[:5]}"))
    return ok


def through_converter(name, native):
    from diffusers.loaders import single_file_utils
    meta = {k: torch.empty(s, device="meta") for k, s in native.items()}
    return {k: tuple(v.shape) for k, v in getattr(single_file_utils, name)(meta).items()}


# --- the families -----------------------------------------------------------------------------------------

LTX25_NATIVE_NAMES = [(r"^proj_in\.", "patchify_proj."), (r"^audio_proj_in\.", "audio_patchify_proj."),
                      (r"^time_embed\.", "adaln_single."), (r"^audio_time_embed\.", "audio_adaln_single."),
                      (r"^prompt_adaln\.", "prompt_adaln_single."),
                      (r"^audio_prompt_adaln\.", "audio_prompt_adaln_single."),
                      (r"^av_cross_attn_video_scale_shift\.", "av_ca_video_scale_shift_adaln_single."),
                      (r"^av_cross_attn_video_a2v_gate\.", "av_ca_a2v_gate_adaln_single."),
                      (r"^av_cross_attn_audio_scale_shift\.", "av_ca_audio_scale_shift_adaln_single."),
                      (r"^av_cross_attn_audio_v2a_gate\.", "av_ca_v2a_gate_adaln_single."),
                      (r"video_a2v_cross_attn_scale_shift_table", "scale_shift_table_a2v_ca_video"),
                      (r"audio_a2v_cross_attn_scale_shift_table", "scale_shift_table_a2v_ca_audio"),
                      (r"\.norm_q\.", ".q_norm."), (r"\.norm_k\.", ".k_norm.")]


def ltx25(comfyui):
    diffusers = meta_state("LTX2VideoTransformer3DModel", **LTX25_DIFFUSERS)
    dit = renamed(diffusers, LTX25_NATIVE_NAMES)
    if not comfyui:
        print("ltx2.5 orig: skipped (no --comfyui); the native layout needs ComfyUI's model for its connectors")
        return None
    comfy = comfy_module_state(comfyui, "comfy.ldm.lightricks.av_model", "LTXAVModel", **LTX25_COMFY)
    # ComfyUI's model also holds the two text connectors the release's DiT file carries (diffusers keeps them
    # in its text encoder's connectors); diffusers keeps a perturbed-attention flag only
    ok = compare("ltx2.5 orig (DiT keys)", {k: v for k, v in comfy.items() if "_embeddings_connector." not in k}, dit)
    native = {"model.diffusion_model." + k: v for k, v in comfy.items()}
    description = ("LTX-2.5 22B DiT as Lightricks ships it (every key under model.diffusion_model.; the two text "
                   "connectors included; `config` metadata with the 2.3+ flags, given here as metadata): the "
                   "state_dict of ComfyUI's LTXAV (783545f) built with those flags. Against LTX-2: gated attention "
                   "(`to_gate_logits` in every attention), cross-attention adaLN (9-row scale_shift_table), "
                   "prompt_adaln_single / audio_prompt_adaln_single and their per-block prompt_scale_shift_table, "
                   "keyframes_abs_pos_embedding; no caption_projection (in the text encoder) and no video FF biases")
    return ok, {"ltx2.5-native": (native, description, {"config": json.dumps({"transformer": LTX25_COMFY})}),
                "ltx2.5-diffusers": (diffusers, "LTX-2.5 in diffusers' LTX2VideoTransformer3DModel with the 2.3+ flags "
                                     f"({LTX25_DIFFUSERS}); LTX25ModularPipeline loads it", None)}


COSMOS_NATIVE_NAMES = [(r"^transformer_blocks\.", "blocks."), (r"\.attn1\.", ".self_attn."),
                       (r"\.attn2\.", ".cross_attn."), (r"\.to_q\.", ".q_proj."), (r"\.to_k\.", ".k_proj."),
                       (r"\.to_v\.", ".v_proj."), (r"\.to_out\.0\.", ".output_proj."), (r"\.norm_q\.", ".q_norm."),
                       (r"\.norm_k\.", ".k_norm."), (r"\.norm1\.linear_", ".adaln_modulation_self_attn."),
                       (r"\.norm2\.linear_", ".adaln_modulation_cross_attn."),
                       (r"\.norm3\.linear_", ".adaln_modulation_mlp."), (r"\.ff\.net\.0\.proj\.", ".mlp.layer1."),
                       (r"\.ff\.net\.2\.", ".mlp.layer2."), (r"^patch_embed\.proj\.", "x_embedder.proj.1."),
                       (r"^time_embed\.t_embedder\.", "t_embedder.1."), (r"^time_embed\.norm\.", "t_embedding_norm."),
                       (r"^norm_out\.linear_", "final_layer.adaln_modulation."), (r"^proj_out\.", "final_layer.linear.")]


def cosmos25():
    diffusers = meta_state("CosmosTransformer3DModel", **COSMOS25_2B)
    native = renamed(diffusers, COSMOS_NATIVE_NAMES, "net.")
    ok = compare("cosmos-predict2.5 conv", through_converter("convert_cosmos_transformer_checkpoint_to_diffusers",
                                                             native), diffusers)
    return ok, {"cosmos-predict2.5-2b-native": (native, "Cosmos Predict 2.5 2B DiT as NVIDIA ships it (net. prefix, "
                                                "Cosmos-Predict2 MiniTrainDIT names) with the Qwen2.5-VL "
                                                "crossattn_proj (100352 -> 1024)", None),
                "cosmos-predict2.5-2b-diffusers": (diffusers, "Cosmos Predict 2.5 2B in diffusers' "
                                                   f"CosmosTransformer3DModel ({COSMOS25_2B})", None)}


WAN_ANIMATE2_NATIVE_NAMES = [(r"^blocks\.(\d+)\.", r"blocks.\1.block."), (r"\.to_q\.", ".q."), (r"\.to_k\.", ".k."),
                             (r"\.to_v\.", ".v."), (r"\.to_out\.0\.", ".o."), (r"\.add_k_proj\.", ".k_img."),
                             (r"\.add_v_proj\.", ".v_img."), (r"\.norm_added_k\.", ".norm_k_img.")]


def wan_animate2():
    diffusers = meta_state("WanAnimate2Transformer3DModel")
    native = renamed(diffusers, WAN_ANIMATE2_NATIVE_NAMES)
    ok = compare("wan-animate-2 conv", through_converter("convert_wan_animate_2_transformer_to_diffusers", native),
                 diffusers)
    return ok, {"wan-animate2-native": (native, "Wan-Animate 2 (14B) as released: every block wrapped in an in-context "
                                        "module (blocks.N.block.*), Wan's native attention names", None),
                "wan-animate2-diffusers": (diffusers, "Wan-Animate 2 in diffusers' WanAnimate2Transformer3DModel "
                                           "(class defaults): Wan's native names except the attention's "
                                           "(self_attn.to_q, cross_attn.add_k_proj)", None)}


ACE_DIFFUSERS_NAMES = [(r"^decoder\.", ""), (r"\.q_proj\.", ".to_q."), (r"\.k_proj\.", ".to_k."),
                      (r"\.v_proj\.", ".to_v."), (r"\.o_proj\.", ".to_out.0."), (r"\.q_norm\.", ".norm_q."),
                      (r"\.k_norm\.", ".norm_k."), (r"^proj_in\.1\.", "proj_in_conv."),
                      (r"^proj_out\.1\.", "proj_out_conv.")]


def ace_step15(comfyui):
    diffusers = meta_state("AceStepTransformer1DModel")
    if not comfyui:
        print("ace-step-1.5 orig: skipped (no --comfyui)")
        return None
    native = comfy_module_state(comfyui, "comfy.ldm.ace.ace_step15", "AceStepConditionGenerationModel")
    decoder = renamed({k: v for k, v in native.items() if k.startswith("decoder.")}, ACE_DIFFUSERS_NAMES)
    ok = compare("ace-step-1.5 orig (decoder = diffusers' class)", decoder, diffusers)
    return ok, {"ace-step1.5-native": (native, "ACE-Step 1.5 (2B DiT) as released and as ComfyUI's single file holds "
                                       "it: the state_dict of ComfyUI's AceStepConditionGenerationModel (783545f) "
                                       "with its defaults: decoder.* (the DiT), encoder.* (lyric and timbre "
                                       "encoders), tokenizer.*, detokenizer.*, null_condition_emb", None),
                "ace-step1.5-diffusers": (diffusers, "ACE-Step 1.5 in diffusers' AceStepTransformer1DModel (class "
                                          "defaults): the decoder alone, attention to_q/to_out.0, norm_q, "
                                          "proj_in_conv/proj_out_conv", None)}


def hidream_o1(comfyui):
    if not comfyui:
        print("hidream-o1: skipped (no --comfyui): its layout is ComfyUI's model's (diffusers has no class of it)")
        return None
    native = comfy_module_state(comfyui, "comfy.ldm.hidream_o1.model", "HiDreamO1Transformer")
    # what ComfyUI's detection and HiDreamO1 config take from a file of these names
    import comfy.model_detection
    sd = {"model.diffusion_model." + k: torch.empty(s, device="meta") for k, s in native.items()}
    found = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    ok = type(found).__name__ == "HiDreamO1"
    print(f"hidream-o1 orig (ComfyUI detects its own model's names as HiDreamO1): {'ok' if ok else found}")
    return ok, {"hidream-o1-native": (native, "HiDream-O1-Image (8B: Qwen3-VL-8B's language model and vision tower, "
                                      "32x32 pixel patch embedder, timestep embedder, final layer) in ComfyUI's "
                                      "single-file names: the state_dict of ComfyUI's HiDreamO1Transformer "
                                      "(783545f), which its loader fills from the file after dropping the unused "
                                      "deepstack mergers. No diffusers class", None)}


def comfy_module_state(comfyui, module, cls, **config):
    """{key: shape} of a ComfyUI model class built with `config` over its defaults, parameters on meta."""
    import importlib
    from accelerate import init_empty_weights
    sys.path.insert(0, str(ROOT / "bench"))
    from comfy_check import import_comfy
    import_comfy(comfyui)
    import comfy.ops
    with init_empty_weights():
        model = getattr(importlib.import_module(module), cls)(**config, dtype=torch.bfloat16,
                                                              operations=comfy.ops.disable_weight_init)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write(name, shapes, description, metadata, dtype="BF16"):
    doc = {"name": name, "description": description,
           "parameters": sum(torch.Size(s).numel() for s in shapes.values()),
           "tensors": [[k, list(s), dtype] for k, s in shapes.items()]}
    if metadata:
        doc["metadata"] = metadata
    (OUT / f"{name}.json").write_text(json.dumps(doc) + "\n")
    print(f"wrote tests/layouts/{name}.json: {len(shapes)} tensors, {doc['parameters']:,} parameters")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write the layouts that pass their check")
    parser.add_argument("--comfyui", type=Path, help="a ComfyUI checkout (for the orig checks)")
    args = parser.parse_args()
    results = [cosmos25(), wan_animate2(), ltx25(args.comfyui), ace_step15(args.comfyui),
               hidream_o1(args.comfyui)]
    for ok, layouts in filter(None, results):
        for name, (shapes, description, metadata) in layouts.items():
            if args.write and ok:
                write(name, shapes, description, metadata)
    return 0 if all(r is None or r[0] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
