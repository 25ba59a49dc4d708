"""LTX-2 (2.0 to 2.5): Lightricks' single file (video and audio streams, every key under model.diffusion_model.)
and diffusers layout (same block names; embedders renamed). LTX-2.3 and later add gated attention
(`to_gate_logits`), cross-attention adaLN and the prompt adaLN (`prompt_adaln_single`, diffusers `prompt_adaln`);
their LoRA targets are LTX-2's."""

import re

from .table import Rule, TableArchitecture

_B = "transformer_blocks.{i}"
_ATTENTIONS = ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")
_ADALN = {"adaln_single": "time_embed", "audio_adaln_single": "audio_time_embed",
          "av_ca_video_scale_shift_adaln_single": "av_cross_attn_video_scale_shift",
          "av_ca_a2v_gate_adaln_single": "av_cross_attn_video_a2v_gate",
          "av_ca_audio_scale_shift_adaln_single": "av_cross_attn_audio_scale_shift",
          "av_ca_v2a_gate_adaln_single": "av_cross_attn_audio_v2a_gate",
          "prompt_adaln_single": "prompt_adaln", "audio_prompt_adaln_single": "audio_prompt_adaln"}  # LTX-2.3+
_TIME = ("emb.timestep_embedder.linear_1", "emb.timestep_embedder.linear_2")  # each adaln_single's time MLP
_ADALN_LINEARS = ("linear",) + _TIME


class LTX2(TableArchitecture):
    diffusers_reads_comfy = True  # diffusers reads its comfy-format files too, but not every .diff/.diff_b
    name = "ltx2"
    diffusers_classes = ("LTX2VideoTransformer3DModel",)  # the class a diffusers folder of this layout names
    title = "LTX-2"
    base_model_version = "ltx2"
    modelspec_architecture = "ltx-2/lora"
    implementation = "https://github.com/Lightricks/LTX-2"
    metadata_tags = ("ltx-2", "ltx2", "ltxv2")
    lora_hint = re.compile(r"audio_attn1|audio_to_video_attn|video_to_audio_attn|audio_ff")
    auto_format = "comfy"
    comfy_peft = True  # diffusers passes LTX-2 keys through unconverted: PEFT names without alpha load in both
    native_probes = ("transformer_blocks.0.audio_attn1.to_q.weight", "transformer_blocks.0.attn1.q_norm.weight")
    diffusers_probes = ("transformer_blocks.0.audio_attn1.to_q.weight", "transformer_blocks.0.attn1.norm_q.weight")
    rules = tuple([Rule("patchify_proj", "proj_in"), Rule("audio_patchify_proj", "audio_proj_in")]
                  + [Rule(f"{_B}.{a}.{n}_norm", f"{_B}.{a}.norm_{n}") for a in _ATTENTIONS for n in "qk"]
                  + [Rule(f"{n}.{m}", f"{d}.{m}") for n, d in _ADALN.items() for m in _ADALN_LINEARS])
    default_targets = tuple([f"{_B}.{a}.{p}" for a in _ATTENTIONS for p in ("to_q", "to_k", "to_v", "to_out.0")]
                            + [f"{_B}.{f}.{p}" for f in ("ff", "audio_ff") for p in ("net.0.proj", "net.2")])
    optional = {
        "modulation": ("the adaln_single linears (video, audio and cross-modal)", [f"{n}.linear" for n in _ADALN]),
        "embedders": ("patchify and caption projections, the time embedders of each adaln_single",
                      ["patchify_proj", "audio_patchify_proj", "caption_projection.linear_1",
                       "caption_projection.linear_2", "audio_caption_projection.linear_1",
                       "audio_caption_projection.linear_2"] + [f"{n}.{m}" for n in _ADALN for m in _TIME]),
        "final": ("proj_out and audio_proj_out", ["proj_out", "audio_proj_out"]),
        "gates": ("LTX-2.3+: each attention's per-head gate (to_gate_logits)",
                  [f"{_B}.{a}.to_gate_logits" for a in _ATTENTIONS]),
    }
