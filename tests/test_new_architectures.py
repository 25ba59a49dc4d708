"""Qwen-Image, Qwen-Image 2.1, Wan, FLUX.2, Chroma, Krea 2 and LTX-2: detection and pairing on the full real
layouts; LoRA files loaded by diffusers' own pipeline loaders into tiny models of its real classes; ComfyUI's
key rules; and extraction end to end (a planted fine-tune, native and diffusers layouts, the layers' outputs)."""

import inspect
import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save_file as st_save_file

from lora_colab import arch, extract
from lora_colab.arch.common import row_index
from lora_colab.errors import OptionError
from lora_colab.lora.formats import module_tensors, pieces

from comfy_rules import unet_key_map
from conftest import LAYOUTS
from test_diffusers_loading import ALPHA, RANK, LowRank, assert_deltas, diffusers_warnings  # noqa: F401

diffusers = pytest.importorskip("diffusers")

# name -> (full native layout, full diffusers layout, default targets, optional targets)
FULL = {
    "qwen_image": ("qwen-image-diffusers", None, 720, 126),
    "qwen_image_2_1": ("qwen-image-2.1-native", "qwen-image-2.1-diffusers", 192, 8),
    "wan": ("wan2.2-t2v-a14b-native", "wan2.2-t2v-a14b-diffusers", 400, 6),
    "flux2": ("flux2-dev-native", "flux2-dev-diffusers", 160, 11),
    "chroma": ("chroma1-hd-native", "chroma1-hd-diffusers", 228, 15),
    "krea2": ("krea2-native", "krea2-diffusers", 256, 8),
    "ltx2": ("ltx2-native", "ltx2-diffusers", 1344, 26),
    "flux3": ("flux3-native", "flux3-diffusers", 258, 13),
    "sd3": ("sd3.5-large-native", "sd3.5-large-diffusers", 301, 45),
    "hidream": ("hidream-i1-native", None, 1024, 104),
    "lumina2": ("lumina2-native", "lumina2-diffusers", 178, 6),
    "ernie_image": ("ernie-image-native", None, 252, 6),  # native names are the diffusers names
    "ideogram4": ("ideogram4-native", "ideogram4-diffusers", 170, 41),
    "kandinsky5": ("kandinsky5-diffusers", None, 512, 59),
    "anima": ("anima-native", "anima-diffusers", 280, 235),
    "wan_animate2": ("wan-animate2-native", "wan-animate2-diffusers", 480, 8),
    "ace_step15": ("ace-step1.5-native", "ace-step1.5-diffusers", 264, 7),
    "hidream_o1": ("hidream-o1-native", None, 252, 115),  # no diffusers class
    "cosmos_predict2_5": ("cosmos-predict2.5-2b-native", "cosmos-predict2.5-2b-diffusers", 280, 175),
    "minimax_h3": ("minimax-h3-native", "minimax-h3-diffusers", 208, 58),
    "hunyuan_video15": ("hunyuanvideo1.5-native", "hunyuanvideo1.5-diffusers", 440, 124),
}
# other releases of a family: "family@release" -> (as FULL)
EXTRA = {"wan@ti2v-5b": ("wan2.2-ti2v-5b-native", "wan2.2-ti2v-5b-diffusers", 300, 6),
         "flux2@klein-9b": ("flux2-klein-9b-native", "flux2-klein-9b-diffusers", 112, 9),
         "flux3@distilled": ("flux3-distilled-native", "flux3-distilled-diffusers", 258, 15),
         "sd3@medium": ("sd3.5-medium-native", "sd3.5-medium-diffusers", 215, 31),
         "ltx2@2.5": ("ltx2.5-native", "ltx2.5-diffusers", 1344, 316)}
LAYOUT_OF = {**FULL, **EXTRA}


def layout(name):
    return {k: tuple(s) for k, s, _ in json.loads((LAYOUTS / f"{name}.json").read_text())["tensors"]}


def canonical(shapes_or_tensors, prefix_ok=True):
    """(Detected, {canonical key: shape or tensor}) of a key -> shape/tensor dict, fused parts concatenated."""
    detected = arch.detect(set(shapes_or_tensors))
    stored = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in shapes_or_tensors.items()}
    cmap = detected.arch.canonical_map(stored, detected.layout, detected.prefix)
    out = {}
    for key, sources in cmap.sources.items():
        if None in sources:
            continue
        if isinstance(shapes_or_tensors[sources[0]], torch.Tensor):
            out[key] = cmap.assemble(key, shapes_or_tensors.__getitem__)
        else:
            parts = [stored[s] for s in sources]
            out[key] = (sum(p[0] for p in parts),) + parts[0][1:]
    return detected, out


@pytest.mark.parametrize("name", sorted(LAYOUT_OF))
def test_full_layouts_detect_and_pair_across_layouts(name):
    key = name.partition("@")[0]
    native_name, diffusers_name, n_default, n_optional = LAYOUT_OF[name]
    native = layout(native_name)
    detected, shapes = canonical(native)
    assert detected.arch.name == key
    every = detected.arch.targets(shapes, groups=set(detected.arch.optional_groups))
    default = detected.arch.targets(shapes)
    assert (len(default), len(every) - len(default)) == (n_default, n_optional)
    stripped = {k.removeprefix(detected.prefix): v for k, v in native.items()}  # LTX-2's and Anima's own prefixes
    prefixed = {"model.diffusion_model." + k: v for k, v in stripped.items()}
    for variant in (stripped, prefixed):
        assert arch.detect(set(variant)).arch.name == key
    if diffusers_name:
        d_detected, d_shapes = canonical(layout(diffusers_name))
        assert (d_detected.arch.name, d_detected.layout) == (key, "diffusers")
        d_every = d_detected.arch.targets(d_shapes, groups=set(d_detected.arch.optional_groups))
        shared = {t.group for t in d_every}  # Anima's diffusers folder keeps its LLM adapter as another model
        assert {t.key: t.shape for t in d_every} == {t.key: t.shape for t in every if t.group in shared}
        assert len(shared) >= len(detected.arch.optional_groups)


# families whose auto spelling is diffusers' because ComfyUI has no model of them: their comfy spelling (the
# names ComfyUI's key map gives their native keys) is checked
NOT_IN_COMFYUI = ("cosmos_predict2_5", "wan_animate2")


@pytest.mark.parametrize("name,fmt", [(n, "auto") for n in sorted(FULL) + ["ltx2@2.5"] if n not in NOT_IN_COMFYUI]
                         + [("hunyuan_video15", "kohya")] + [(n, "comfy") for n in NOT_IN_COMFYUI])
def test_comfyui_rules_consume_every_tensor_of_the_default_output(name, fmt):
    native, _, _, _ = LAYOUT_OF[name]
    detected, shapes = canonical(layout(native))
    a = detected.arch
    fmt = arch.resolve_format(a, fmt)
    key_map = unet_key_map(a.name, {k: v for k, v in shapes.items()})
    tensors = 0
    groups = set(a.optional_groups) if name == "hunyuan_video15" else set()  # its embedders are renamed too
    for target in a.targets(shapes, groups=groups):
        for module in a.lora_modules(target, fmt):
            assert module.name in key_map, module.name
            weight, piece = key_map[module.name]  # the same weight, and the same rows where it is a slice
            rows = None if module.rows is None else (module.rows[0], module.rows[1] - module.rows[0])
            assert weight == target.key and piece == rows, (module.name, piece, module.rows)
            tensors += 3 if module.alpha else 2
    assert tensors >= 2 * len(a.targets(shapes))


def test_hunyuan_video15_bias_and_norm_patches_name_comfyuis_own_modules():
    """ComfyUI renames HunyuanVideo 1.5's keys as it loads them (q/k norms, the time and text embedders): each
    `.diff`/`.diff_b` of the default output names the module its key map knows, for the right weight."""
    from lora_colab.arch.canonical import CanonicalCheckpoint
    from lora_colab.extraction import bias_diff
    from test_arch import KeysOnly

    view = CanonicalCheckpoint(KeysOnly(list(layout("hunyuanvideo1.5-native").items())))
    a = view.arch
    key_map = unet_key_map(a.name, view.shapes())
    found = bias_diff.diff_targets(a, arch.resolve_format(a, "auto"), view, view)
    names = {t.name for t in found}
    assert {"diffusion_model.double_blocks.0.img_attn.norm.query_norm.diff",
            "diffusion_model.time_in.in_layer.diff_b", "diffusion_model.txt_in.c_embedder.in_layer.diff_b",
            "diffusion_model.txt_in.t_embedder.out_layer.diff_b"} <= names
    for target in found:
        module = target.name.rsplit(".", 1)[0]
        weight = key_map[module][0]
        assert weight.rsplit(".", 1)[0] == target.key.rsplit(".", 1)[0], (target.name, weight, target.key)


@pytest.mark.parametrize("native", ["zimage-single-file", "lumina2-native"])
def test_no_patch_is_written_for_a_norm_comfyuis_model_has_no_weight_for(native):
    """Z-Image's and Lumina 2's files hold norm_final.weight, which ComfyUI's model (its final LayerNorm is not
    elementwise-affine) has no place for: its `.diff` loaded nowhere ("lora key not loaded", bench/comfy_check.py)."""
    from lora_colab.arch.canonical import CanonicalCheckpoint
    from lora_colab.extraction import bias_diff
    from test_arch import KeysOnly

    view = CanonicalCheckpoint(KeysOnly(list(layout(native).items())))
    names = [t.name for t in bias_diff.diff_targets(view.arch, "comfy", view, view)]
    assert "norm_final.weight" in view.shapes() and len(names) > 100
    assert not [name for name in names if "norm_final" in name]


# --- tiny models of diffusers' classes ------------------------------------------------------------

TINY = {
    "qwen_image": ("QwenImageTransformer2DModel", "QwenImagePipeline",
                   dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                        in_channels=16, out_channels=4, axes_dims_rope=(4, 6, 6))),
    "qwen_image_2_1": ("QwenImage21Transformer2DModel", "QwenImage21Pipeline",
                       dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, context_in_dim=32,
                            in_channels=16, out_channels=16, axes_dims_rope=(4, 6, 6))),
    "wan": ("WanTransformer3DModel", "WanPipeline",
            dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=32,
                 freq_dim=32, ffn_dim=64, num_layers=2)),
    "ace_step15": ("AceStepTransformer1DModel", "AceStepPipeline",
                   dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=16, in_channels=8, audio_acoustic_hidden_dim=4, patch_size=2)),
    "wan_animate2": ("WanAnimate2Transformer3DModel", "WanAnimate2ModularPipeline",
                     dict(num_heads=2, dim=32, in_dim=4, out_dim=4, text_dim=32, freq_dim=32, ffn_dim=64,
                          num_layers=2)),
    "flux2": ("Flux2Transformer2DModel", "Flux2Pipeline",
              dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                   joint_attention_dim=32, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4))),
    "chroma": ("ChromaTransformer2DModel", "ChromaPipeline",
               dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                    joint_attention_dim=32, axes_dims_rope=(4, 6, 6), approximator_num_channels=8,
                    approximator_hidden_dim=32, approximator_layers=2)),
    "krea2": ("Krea2Transformer2DModel", "Krea2Pipeline",
              dict(in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=4, num_key_value_heads=1,
                   intermediate_size=64, timestep_embed_dim=32, text_hidden_dim=32, num_text_layers=2,
                   text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=48,
                   num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6))),
    "ltx2": ("LTX2VideoTransformer3DModel", "LTX2Pipeline",
             dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
                  audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2, audio_attention_head_dim=8,
                  audio_cross_attention_dim=16, num_layers=1, caption_channels=16)),
    "flux3": ("Flux3Transformer2DModel", "Flux3ModularPipeline",
              dict(in_channels=16, cond_in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, timestep_channels=32, axes_dims_rope=(4, 4, 4, 4))),
    "sd3": ("SD3Transformer2DModel", "StableDiffusion3Pipeline",
            dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
                 pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,))),
    "hidream": ("HiDreamImageTransformer2DModel", "HiDreamImagePipeline",
                dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1,
                     attention_head_dim=8, num_attention_heads=2, caption_channels=[16, 16], text_emb_dim=16,
                     num_routed_experts=2, num_activated_experts=1, axes_dims_rope=(2, 2, 4), max_resolution=(16, 16),
                     llama_layers=[0, 1])),
    "lumina2": ("Lumina2Transformer2DModel", "Lumina2Pipeline",
                dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, hidden_size=32, num_layers=2,
                     num_refiner_layers=1, num_attention_heads=4, num_kv_heads=2, multiple_of=16,
                     axes_dim_rope=(4, 2, 2), axes_lens=(64, 16, 16), cap_feat_dim=16)),
    "ernie_image": ("ErnieImageTransformer2DModel", "ErnieImagePipeline",
                    dict(hidden_size=32, num_attention_heads=2, num_layers=2, ffn_hidden_size=64, in_channels=4,
                         out_channels=4, patch_size=1, text_in_dim=16, rope_axes_dim=(4, 6, 6))),
    "ideogram4": ("Ideogram4Transformer2DModel", "Ideogram4Pipeline",
                  dict(in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2, intermediate_size=64,
                       adaln_dim=16, llm_features_dim=32, mrope_section=(2, 1, 1))),
    "kandinsky5": ("Kandinsky5Transformer3DModel", "Kandinsky5T2IPipeline",
                   dict(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4,
                        patch_size=(1, 2, 2), model_dim=128, ff_dim=64, num_text_blocks=1, num_visual_blocks=2,
                        axes_dims=(16, 24, 24))),
    "anima": ("CosmosTransformer3DModel", "AnimaModularPipeline",
              dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                   mlp_ratio=2.0, text_embed_dim=32, adaln_lora_dim=8, max_size=(4, 16, 16), patch_size=(1, 2, 2),
                   concat_padding_mask=False, extra_pos_embed_type=None, crossattn_proj_in_channels=32,
                   encoder_hidden_states_channels=32)),
    "cosmos_predict2_5": ("CosmosTransformer3DModel", "Cosmos2_5_PredictBasePipeline",
                          dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16,
                               num_layers=2, mlp_ratio=2.0, text_embed_dim=32, adaln_lora_dim=8, max_size=(4, 16, 16),
                               patch_size=(1, 2, 2), concat_padding_mask=False, extra_pos_embed_type=None,
                               use_crossattn_projection=True, crossattn_proj_in_channels=48,
                               encoder_hidden_states_channels=32)),
    "minimax_h3": ("MiniMaxH3Transformer3DModel", "MiniMaxH3ModularPipeline",
                   dict(num_attention_heads=2, attention_head_dim=16, hidden_size=32, num_layers=2,
                        num_refiner_layers=1, ffn_dim=48, in_channels=4, audio_in_channels=8, text_dim=16,
                        freq_dim=32, time_embed_hidden_dim=32, time_embed_dim=16, rope_freq_dim=2)),
    "hunyuan_video15": ("HunyuanVideo15Transformer3DModel", "HunyuanVideo15ModularPipeline",
                        dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                             num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=16, text_embed_2_dim=8,
                             image_embed_dim=8, rope_axes_dim=(4, 6, 6), use_meanflow=True)),  # step-distilled
}


# diffusers' Flux-family converters for kohya/ComfyUI spellings assume Flux.1's real 3072 width
FULL_WIDTH = {"chroma": dict(attention_head_dim=128, num_attention_heads=24),
              # Lumina 2's converter cuts q, k, v at the release's rows (2304, 768, 768)
              "lumina2": dict(hidden_size=2304, num_attention_heads=24, num_kv_heads=8, axes_dim_rope=(32, 32, 32))}


def tiny(name, seed=0):
    cls, _, kwargs = TINY[name]
    torch.manual_seed(seed)
    return getattr(diffusers, cls)(**kwargs).eval()


def full_width(name):
    """The tiny model at the real width, its weights allocated but never touched (not resident)."""
    from accelerate import init_empty_weights
    cls, _, kwargs = TINY[name]
    with init_empty_weights():
        model = getattr(diffusers, cls)(**{**kwargs, **FULL_WIDTH[name]})
    return model.to_empty(device="cpu").eval()


def load_into(name, model, folder, weight_name):
    pipeline = getattr(diffusers, TINY[name][1])
    state_dict = pipeline.lora_state_dict(str(folder), weight_name=weight_name)
    if isinstance(state_dict, tuple):
        state_dict = state_dict[0]
    params = inspect.signature(pipeline.load_lora_into_transformer).parameters
    extra = {"network_alphas": None} if "network_alphas" in params else {}
    pipeline.load_lora_into_transformer(state_dict, transformer=model, adapter_name="x", **extra)
    return model


def write_random_lora(folder, a, fmt, targets, seed=0):
    """A LoRA of random factors for `targets` in `fmt`; returns its file name and {diffusers module: LowRank}."""
    gen = torch.Generator().manual_seed(seed)
    tensors, expected = {}, {}
    for t in targets:
        down = torch.randn(RANK, t.shape[1], generator=gen) / t.shape[1] ** 0.5
        up = torch.randn(t.shape[0], RANK, generator=gen) / RANK ** 0.5
        tensors.update(module_tensors(a, fmt, t, down, up, ALPHA, torch.float32))
        for module in a.lora_modules(t, "diffusers"):
            index = row_index(module.located_rows, t.shape[0])  # its rows, in its own order
            expected[module.name.removeprefix("transformer.")] = LowRank(up[index], down, ALPHA / RANK,
                                                                        (index.numel(), t.shape[1]))
    name = f"lora_{fmt}.safetensors"
    st_save_file(tensors, str(folder / name))
    return name, expected


# (architecture, format) pairs that diffusers' loader must take fully: `auto` wherever one spelling loads
# in both clients, `diffusers` always
def auto_is_diffusers_too(name):
    """Whether the auto spelling claims diffusers as a client: wherever the report names no other one."""
    a = arch.get(name)
    return not a.format_notes(arch.resolve_format(a, "auto"), [])


LOADS = [(n, "auto") for n in TINY if auto_is_diffusers_too(n)] + [(n, "diffusers") for n in TINY]


@pytest.mark.parametrize("name,fmt", LOADS)
def test_lora_loads_fully_through_the_pipeline_loader(tmp_path, name, fmt, diffusers_warnings):
    model = full_width(name) if name in FULL_WIDTH and fmt != "diffusers" else tiny(name)
    detected, shapes = canonical({k: tuple(v.shape) for k, v in model.state_dict().items()})
    a = detected.arch
    assert a.name == name
    groups = set(a.optional_groups) if fmt == "diffusers" else set()
    targets = a.targets(shapes, groups=groups)
    weight_name, expected = write_random_lora(tmp_path, a, arch.resolve_format(a, fmt), targets)
    load_into(name, model, tmp_path, weight_name)
    assert_deltas(model, "x", expected)
    bad = [m for m in diffusers_warnings if any(w in m.lower() for w in ("unexpected", "missing", "not loaded",
                                                                          "unsupported"))]
    assert not bad, bad[:3]


# Linear layers of diffusers' class that no target group reaches yet (a new gap, or one closed, fails below)
UNTARGETED = {
    "sd3": {"transformer_blocks.0.norm1_context.linear", "transformer_blocks.1.norm1_context.linear"},
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_linear_layer_is_a_target_with_every_group(name):
    """With every optional group, the diffusers spelling covers each nn.Linear of diffusers' class (HunyuanVideo
    1.5's step-distilled time_r_in included), but for the gaps UNTARGETED lists."""
    model = tiny(name)
    detected, shapes = canonical({k: tuple(v.shape) for k, v in model.state_dict().items()})
    a = detected.arch
    written = {m.name.split(".", 1)[1] for t in a.targets(shapes, groups=set(a.optional_groups))
               for m in a.lora_modules(t, "diffusers")}
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linear - written == UNTARGETED.get(name, set())


# diffusers' own single-file converters (native -> diffusers), where one runs on a tiny model of the class
# (Flux.1's and Chroma's hard-code the released 3072 width)
CONVERTERS = {"sd3": "convert_sd3_transformer_checkpoint_to_diffusers",
              "flux2": "convert_flux2_transformer_checkpoint_to_diffusers",
              "flux3": "convert_flux3_transformer_checkpoint_to_diffusers",
              "wan": "convert_wan_transformer_to_diffusers", "hidream": "convert_hidream_transformer_to_diffusers",
              "ltx2": "convert_ltx2_transformer_to_diffusers",
              "ernie_image": "convert_ernie_image_transformer_checkpoint_to_diffusers",
              "qwen_image_2_1": "convert_qwen_image21_transformer_checkpoint_to_diffusers",
              "krea2": "convert_krea2_transformer_checkpoint_to_diffusers",
              "minimax_h3": "convert_minimax_h3_transformer_checkpoint_to_diffusers",
              "anima": "convert_cosmos_transformer_checkpoint_to_diffusers",
              "cosmos_predict2_5": "convert_cosmos_transformer_checkpoint_to_diffusers",
              "wan_animate2": "convert_wan_animate_2_transformer_to_diffusers"}


def sd3_unmapped(model, state):
    """Native SD3 weights our map leaves out (never targets) that diffusers' converter requires: pos_embed and
    the context stream's adaLN modulation (the last block's halves swapped); and the Linear layers they are."""
    extra, count = {"pos_embed": state["pos_embed.pos_embed"]}, model.config.num_layers
    for i in range(count):
        for param in ("weight", "bias"):
            w = state[f"transformer_blocks.{i}.norm1_context.linear.{param}"]
            h = w.shape[0] // 2
            extra[f"joint_blocks.{i}.context_block.adaLN_modulation.1.{param}"] = \
                torch.cat([w[h:], w[:h]]) if i == count - 1 else w
    return extra, {f"transformer_blocks.{i}.norm1_context.linear.weight" for i in range(count)}


UNMAPPED = {"sd3": sd3_unmapped}


@pytest.mark.parametrize("name", sorted(CONVERTERS))
def test_our_native_reading_is_what_diffusers_own_converter_reads(name):
    """A diffusers model read through our map to native names, then through diffusers' single-file converter,
    gives back every nn.Linear weight bit for bit: rows in the order diffusers keeps them (FLUX.2's and
    FLUX.3's final adaLN (scale; shift), MiniMax-H3's MLP halves)."""
    from diffusers.loaders import single_file_utils
    from whole_model import make_transformer
    model = make_transformer(name)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    native = canonical(dict(state))[1]
    extra, unmapped = UNMAPPED[name](model, state) if name in UNMAPPED else ({}, set())
    native.update(extra)
    converter = getattr(single_file_utils, CONVERTERS[name])
    extra = {"config": dict(model.config)} if "config" in inspect.signature(converter).parameters else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = converter({k: v.clone() for k, v in native.items()}, **extra)
    linear = [n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert [k for k in linear if k not in unmapped and (k not in converted or not torch.equal(converted[k],
                                                                                          state[k]))] == []


def test_qwen_image_2_1_auto_is_comfyui_spelling_and_the_report_says_so(tmp_path):
    model = tiny("qwen_image_2_1")
    a = arch.get("qwen_image_2_1")
    assert arch.resolve_format(a, "auto") == "kohya"
    notes = a.format_notes("kohya", [])
    assert len(notes) == 1 and "--format diffusers" in notes[0]
    # the diffusers spelling splits the fused gate_up into gate_layer and proj, gate rows first
    _, shapes = canonical({k: tuple(v.shape) for k, v in model.state_dict().items()})
    gate_up = next(t for t in a.targets(shapes) if t.module.endswith("gate_up"))
    names = [(m.name, m.rows) for m in a.lora_modules(gate_up, "diffusers")]
    h = gate_up.shape[0] // 2
    assert names == [("transformer.transformer_blocks.0.img_mlp.gate_layer", (0, h)),
                     ("transformer.transformer_blocks.0.img_mlp.proj", (h, 2 * h))]


# --- extraction end to end ---------------------------------------------------------------------

def planted_pair(model, gen, rank=3, scale=0.05, groups=frozenset()):
    """Canonical base tensors of a model and a tuned copy with a low-rank change on every default target (and
    every target of the optional `groups`)."""
    detected, base = canonical({k: v.detach().clone() for k, v in model.state_dict().items()})
    tuned = dict(base)
    for t in detected.arch.targets({k: tuple(v.shape) for k, v in base.items()}, groups=groups):
        d = torch.randn(t.shape[0], rank, generator=gen) @ torch.randn(rank, t.shape[1], generator=gen)
        tuned[t.key] = base[t.key] + d * (scale * base[t.key].std() / d.std())
    return detected.arch, base, tuned


def to_diffusers(a, canonical_tensors, shapes):
    """diffusers state dict ({name: shape} `shapes`) from canonical tensors, fused parts cut by rows (and
    put in the diffusers layout's row order)."""
    cmap = a.canonical_map(shapes, "diffusers", "")
    out = {}
    for ckey, sources in cmap.sources.items():
        out.update(cmap.disassemble(ckey, canonical_tensors[ckey], lambda s: shapes[s][0]))
    return out


def linear_outputs(model, gen):
    """Outputs of every nn.Linear of a model (LoRA-wrapped ones included) on fixed random inputs."""
    outs = {}
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", module)
        if isinstance(base, torch.nn.Linear) and not name.endswith(("base_layer", "lora_A.x", "lora_B.x")) \
                and ".lora_" not in name:
            x = torch.randn(2, base.in_features, generator=torch.Generator().manual_seed(len(name)))
            with torch.no_grad():
                outs[name] = module(x)
    return outs


@pytest.mark.parametrize("name", sorted(TINY))
def test_extracted_lora_reproduces_the_tuned_layers_through_diffusers(tmp_path, name):
    gen = torch.Generator().manual_seed(1)
    base_model = tiny(name)
    a, base, tuned = planted_pair(base_model, gen)
    keys = {k: tuple(v.shape) for k, v in base_model.state_dict().items()}
    (tmp_path / "base" / "transformer").mkdir(parents=True)
    st_save_file(to_diffusers(a, base, keys), str(tmp_path / "base" / "transformer" /
                                                 "diffusion_pytorch_model.safetensors"))
    st_save_file({k: v.contiguous() for k, v in tuned.items()}, str(tmp_path / "tuned.safetensors"))
    st_save_file({k: v.contiguous() for k, v in base.items()}, str(tmp_path / "base_native.safetensors"))
    tuned_model = tiny(name)
    tuned_model.load_state_dict(to_diffusers(a, tuned, keys))
    want = linear_outputs(tuned_model, gen)
    was = linear_outputs(base_model, gen)
    change = sum(float((want[k] - was[k]).norm() ** 2) for k in want) ** 0.5
    assert change > 0

    # the PEFT spelling where diffusers' other route needs the full width (tested above) or loads no auto file
    fmt = "diffusers" if name in FULL_WIDTH or not auto_is_diffusers_too(name) else "auto"
    for label, base_path in (("cross-layout", tmp_path / "base"), ("native", tmp_path / "base_native.safetensors")):
        out = tmp_path / f"{label}.safetensors"
        report = extract(base_path, tmp_path / "tuned.safetensors", out, rank=4, format=fmt, progress=False)
        written = [p for t in a.targets({k: tuple(v.shape) for k, v in base.items()}) for p in pieces(a, fmt, t)]
        assert report.architecture.startswith(a.title) and len(report.extracted) == len(written)
        assert report.dtype == "bfloat16"
        if label == "cross-layout" and a.name not in ("qwen_image", "hidream", "ernie_image", "kandinsky5"):  # one layout: diffusers names
            canonical_layout = arch.detect(set(tuned)).layout  # "native"; HunyuanVideo 1.5's: ComfyUI's repack
            assert report.architecture.endswith(f" / {canonical_layout}") and "(diffusers" in report.architecture
        factors = {v.dtype for k, v in load_file(str(out)).items() if not k.endswith(".alpha")}
        assert factors == {torch.bfloat16}
        model = load_into(name, tiny(name), tmp_path, out.name)
        got = linear_outputs(model, gen)
        gap = sum(float((got[k] - want[k]).norm() ** 2) for k in want) ** 0.5
        assert gap <= 0.05 * change, (label, gap / change)


def test_anima_pipeline_folder_pairs_with_a_native_file_both_ways(tmp_path):
    """diffusers keeps Anima's DiT as a CosmosTransformer3DModel: its pipeline folder (config.json naming that
    class, model_index.json naming Anima's pipeline) pairs with a native file either way, and the LoRA gives
    the tuned layers' outputs through diffusers' own loader."""
    gen = torch.Generator().manual_seed(1)
    base_model = tiny("anima")
    a, base, tuned = planted_pair(base_model, gen)
    keys = {k: tuple(v.shape) for k, v in base_model.state_dict().items()}
    base_model.load_state_dict(to_diffusers(a, base, keys))
    folder = tmp_path / "base"
    base_model.save_pretrained(folder / "transformer")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "AnimaModularPipeline",
                                                         "transformer": ["diffusers", "CosmosTransformer3DModel"]}))
    st_save_file({k: v.contiguous() for k, v in tuned.items()}, str(tmp_path / "tuned.safetensors"))
    st_save_file({k: v.contiguous() for k, v in base.items()}, str(tmp_path / "base_native.safetensors"))
    tuned_model = tiny("anima")
    tuned_model.load_state_dict(to_diffusers(a, tuned, keys))
    want, was = linear_outputs(tuned_model, gen), linear_outputs(tiny("anima"), gen)
    change = sum(float((want[k] - was[k]).norm() ** 2) for k in want) ** 0.5
    for label in ("folder base", "folder fine-tune"):
        if label == "folder base":
            pair_ = (folder, tmp_path / "tuned.safetensors")
        else:  # the folder holds the fine-tune now, the native file the base
            tuned_model.save_pretrained(folder / "transformer")
            pair_ = (tmp_path / "base_native.safetensors", folder)
        out = tmp_path / f"{label.replace(' ', '_')}.safetensors"
        report = extract(*pair_, out, rank=4, format="diffusers", progress=False)
        assert report.architecture.startswith("Anima") and "diffusers" in report.architecture, label
        got = linear_outputs(load_into("anima", tiny("anima"), tmp_path, out.name), gen)
        gap = sum(float((got[k] - want[k]).norm() ** 2) for k in want) ** 0.5
        assert gap <= 0.05 * change, (label, gap / change)


def _wan_pipeline(folder, experts):
    """A Wan 2.2 A14B-shaped pipeline folder: `transformer` and `transformer_2` (diffusers models) and its index."""
    for component, model in zip(("transformer", "transformer_2"), experts):
        model.save_pretrained(folder / component)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline",
                                                         "transformer": ["diffusers", "WanTransformer3DModel"],
                                                         "transformer_2": ["diffusers", "WanTransformer3DModel"]}))
    return folder


def test_wan_22_pipeline_folders_give_each_expert_its_lora(tmp_path):
    """Wan 2.2 A14B's pipeline holds two experts and loads the second's LoRA from a file of its own
    (`load_into_transformer_2=True`): a pair of pipeline folders gives OUT and OUT_transformer_2, each the change
    of its own expert through diffusers' loader."""
    gen = torch.Generator().manual_seed(3)
    bases, tuneds, wants, changes = [], [], [], []
    for seed in (0, 1):
        model = tiny("wan", seed)
        keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        a, base, tuned = planted_pair(model, gen)
        model.load_state_dict(to_diffusers(a, base, keys))
        tuned_model = tiny("wan", seed)
        tuned_model.load_state_dict(to_diffusers(a, tuned, keys))
        bases.append(model)
        tuneds.append(tuned_model)
    base = _wan_pipeline(tmp_path / "base", bases)
    tuned = _wan_pipeline(tmp_path / "tuned", tuneds)
    for model, tuned_model in zip(bases, tuneds):
        want, was = linear_outputs(tuned_model, gen), linear_outputs(model, gen)
        wants.append((want, was))
        changes.append(sum(float((want[k] - was[k]).norm() ** 2) for k in want) ** 0.5)
    report = extract(base, tuned, tmp_path / "lora.safetensors", rank=4, format="diffusers", progress=False)
    second = report.components["transformer_2"]
    assert second.output == str(tmp_path / "lora_transformer_2.safetensors") and "transformer_2" in str(report)
    for name, model_seed, (want, _), change in zip(("lora.safetensors", "lora_transformer_2.safetensors"), (0, 1),
                                                   wants, changes):
        got = linear_outputs(load_into("wan", tiny("wan", model_seed), tmp_path, name), gen)
        gap = sum(float((got[k] - want[k]).norm() ** 2) for k in want) ** 0.5
        assert gap <= 0.05 * change, (name, gap / change)
    one = extract(base, tuned / "transformer", tmp_path / "one.safetensors", rank=4, progress=False)
    assert not one.components and any("transformer_2: only the base's" in w for w in one.warnings)


# --- resizing LoRAs of these models, in every common spelling ---------------------------------------

def spellings(a, targets):
    """{spelling: {module name: (target key, rows)}} as kohya, ComfyUI, PEFT (with and without
    `transformer.`), ai-toolkit (`diffusion_model.`/`base_model.model.` + native) and musubi-tuner name them."""
    out = {"kohya": {}, "comfy": {}, "diffusers": {}, "peft-bare": {}, "ai-toolkit": {}, "musubi": {}}
    for t in targets:
        for fmt in ("kohya", "comfy", "diffusers"):
            for m in a.lora_modules(t, fmt):
                out[fmt][m.name] = (t.key, m.located_rows)
                if fmt == "diffusers":
                    bare = m.name.removeprefix("transformer.")
                    out["peft-bare"][bare] = (t.key, m.located_rows)
                    out["musubi"]["lora_unet_" + bare.replace(".", "_")] = (t.key, m.located_rows)
        out["ai-toolkit"]["base_model.model." + t.module] = (t.key, None)
    return out


@pytest.mark.parametrize("name", sorted(TINY))
def test_resize_finds_base_weights_in_either_layout_for_every_spelling(tmp_path, name):
    from lora_colab.resizing.base_refs import BaseReferences
    from lora_colab.resizing.resizer import resize
    model = tiny(name)
    a, base, _ = planted_pair(model, torch.Generator().manual_seed(2))
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    (tmp_path / "d" / "transformer").mkdir(parents=True)
    st_save_file(to_diffusers(a, base, keys), str(tmp_path / "d" / "transformer" / "diffusion_pytorch_model.safetensors"))
    st_save_file({k: v.contiguous() for k, v in base.items()}, str(tmp_path / "native.safetensors"))
    targets = a.targets({k: tuple(v.shape) for k, v in base.items()}, groups=set(a.optional_groups))
    names = spellings(a, targets)
    for base_path in (tmp_path / "d", tmp_path / "native.safetensors"):
        with BaseReferences(base_path) as refs:
            for spelling, expected in names.items():
                for module, (key, rows) in expected.items():
                    assert refs.locate(module) == (key, rows), (spelling, module)
            key, rows = next(iter(names["diffusers"].values()))
            w = base[key][rows[0]:rows[1]] if rows else base[key]
            assert refs.norms(key, rows)[0] == pytest.approx(float(torch.linalg.matrix_norm(w.float(), 2)), rel=1e-3)
    weight_name, _ = write_random_lora(tmp_path, a, arch.resolve_format(a, "auto"), targets)
    report = resize(tmp_path / "d", [tmp_path / weight_name], tmp_path / "out", "spn_ckpt=1,thr=-20")[0]
    assert not [w for w in report.warnings if "patch no weight" in w]
    from lora_colab.arch.common import row_segments
    fmt = arch.resolve_format(a, "auto")
    assert report.total_rank == sum(  # each module keeps its rank, but a narrow one (Krea 2's projector) its own
        min(RANK, t.shape[1], sum(b - x for x, b in row_segments(m.located_rows, t.shape[0])))
        for t in targets for m in a.lora_modules(t, fmt))


def test_two_wan_variants_are_one_line_naming_both(tmp_path, capsys):
    from lora_colab.cli import main
    for label, heads in (("a14b", 2), ("ti2v", 3)):
        cls, _, kwargs = TINY["wan"]
        model = getattr(diffusers, cls)(**{**kwargs, "num_attention_heads": heads})
        st_save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / f"{label}.safetensors"))
    assert main(["extract", str(tmp_path / "a14b.safetensors"), str(tmp_path / "ti2v.safetensors"), "-o",
                 str(tmp_path / "x.safetensors"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "ti2v.safetensors: is Wan (diffusers), width 48, 20 target layers but the base" in err
    assert "a14b.safetensors is Wan (diffusers), width 32, 20 target layers: another variant" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_sharded_diffusers_folder_pairs_with_a_prefixed_native_file(tmp_path):
    """Wan as shipped: a diffusers `transformer/` folder in F32 shards with an index, against a ComfyUI
    checkpoint whose keys carry `model.diffusion_model.` (F16)."""
    model = tiny("wan")
    a, base, tuned = planted_pair(model, torch.Generator().manual_seed(3))
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = to_diffusers(a, base, keys)
    folder = tmp_path / "Wan-Diffusers" / "transformer"
    folder.mkdir(parents=True)
    names = sorted(state)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[: len(names) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, shard_keys in shards.items():
        st_save_file({k: state[k].float().contiguous() for k in shard_keys}, str(folder / shard))
        weight_map.update({k: shard for k in shard_keys})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    st_save_file({"model.diffusion_model." + k: v.half().contiguous() for k, v in tuned.items()},
                 str(tmp_path / "wan_fp16.safetensors"))
    report = extract(tmp_path / "Wan-Diffusers", tmp_path / "wan_fp16.safetensors", tmp_path / "lora.safetensors",
                     rank=4, progress=False)
    assert report.architecture == "Wan (diffusers) / native" and report.dtype == "bfloat16"
    assert len(report.extracted) == len(a.targets({k: tuple(v.shape) for k, v in base.items()}))
    assert max(layer.rel_error for layer in report.extracted) < 0.02  # F16 rounding of the fine-tune only


@pytest.mark.parametrize("fmt", ["comfy", "diffusers"])
def test_anima_llm_adapter_loads_into_diffusers_text_conditioner(fmt, diffusers_warnings):
    """Anima's single file holds its LLM adapter (`net.llm_adapter.*`), which diffusers loads as the separate
    AnimaTextConditioner: the adapter's LoRA modules in both spellings reach that model in full."""
    torch.manual_seed(0)
    conditioner = diffusers.AnimaTextConditioner(source_dim=32, target_dim=32, model_dim=32, num_layers=2,
                                                 num_attention_heads=2, target_vocab_size=64).eval()
    a = arch.get("anima")
    shapes = {"llm_adapter." + k: tuple(v.shape) for k, v in conditioner.state_dict().items()}
    targets = [t for t in a.targets(shapes, groups={"llm_adapter"}) if t.group == "llm_adapter"]
    assert len(targets) == 2 * 10 + 1
    gen = torch.Generator().manual_seed(1)
    state, expected = {}, {}
    for t in targets:
        down, up = torch.randn(RANK, t.shape[1], generator=gen), torch.randn(t.shape[0], RANK, generator=gen)
        state.update(module_tensors(a, fmt, t, down, up, ALPHA, torch.float32))
        expected[t.module.removeprefix("llm_adapter.")] = LowRank(up, down, ALPHA / RANK, t.shape)
    pipeline = diffusers.AnimaModularPipeline
    converted = pipeline.lora_state_dict(state)
    converted = converted[0] if isinstance(converted, tuple) else converted
    pipeline.load_lora_into_text_conditioner(converted, text_conditioner=conditioner, adapter_name="x")
    assert_deltas(conditioner, "x", expected)
    bad = [m for m in diffusers_warnings if any(w in m.lower() for w in ("unexpected", "missing", "not loaded"))]
    assert not bad, bad[:3]


def per_head(stacked, heads):
    """MiniMax-H3 q/k/v rows as the MiniMaxAI shards store them: [h0: q k v, h1: q k v, ...]."""
    return stacked.reshape(3, heads, -1, stacked.shape[1]).transpose(0, 1).reshape(stacked.shape)


def test_minimax_h3_per_head_shards_and_stacked_files_pair(tmp_path):
    """The MiniMaxAI shards interleave q/k/v per head, single files stack them (same keys and shapes): our
    reading of the shards equals diffusers' own converter's with qkv_layout="interleaved"; a shards base
    pairs with a stacked fine-tune, and a hand-merged per-head file is read so when only that matches the
    base; each LoRA reproduces the planted fine-tune's layers through diffusers."""
    from diffusers.loaders.single_file_utils import convert_minimax_h3_transformer_checkpoint_to_diffusers
    from lora_colab.arch.canonical import open_canonical
    gen = torch.Generator().manual_seed(4)
    model = tiny("minimax_h3")
    heads = model.config.num_attention_heads
    a, base, tuned = planted_pair(model, gen)
    interleaved = {k: per_head(v, heads) if k.endswith("qkv_proj.weight") else v for k, v in base.items()}
    names = sorted(interleaved)
    weight_map = {}
    for i, chunk in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        st_save_file({k: interleaved[k].contiguous() for k in chunk}, str(tmp_path / shard))
        weight_map.update({k: shard for k in chunk})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    converted = convert_minimax_h3_transformer_checkpoint_to_diffusers(dict(interleaved), dict(model.config),
                                                                       qkv_layout="interleaved")
    with open_canonical(tmp_path / "model.safetensors.index.json") as view:
        assert view.detected.layout == "native, q/k/v per head"
        assert set(view.keys()) == set(base)
        for key in base:  # the converter's reading, put back in canonical rows
            assert torch.equal(view.read(key, dtype=None), base[key]), key
    assert all(torch.equal(converted[k], v) for k, v in to_diffusers(a, base, keys).items())

    st_save_file({k: v.contiguous() for k, v in tuned.items()}, str(tmp_path / "tuned.safetensors"))
    st_save_file({k: v.contiguous() for k, v in base.items()}, str(tmp_path / "base.safetensors"))
    merged = {k: per_head(v, heads) if k.endswith("qkv_proj.weight") else v for k, v in tuned.items()}
    st_save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp_path / "merged.safetensors"))
    tuned_model = tiny("minimax_h3")
    tuned_model.load_state_dict(to_diffusers(a, tuned, keys))
    want, was = linear_outputs(tuned_model, gen), linear_outputs(model, gen)
    change = sum(float((want[k] - was[k]).norm() ** 2) for k in want) ** 0.5
    for label, base_path, tuned_path in (("shards", "model.safetensors.index.json", "tuned.safetensors"),
                                         ("merged", "base.safetensors", "merged.safetensors")):
        out = tmp_path / f"lora_{label}.safetensors"
        report = extract(tmp_path / base_path, tmp_path / tuned_path, out, rank=4, format="diffusers",
                         progress=False)
        notes = [w for w in report.warnings if "per head" in w]
        if label == "merged":
            assert len(notes) == 1 and "merged.safetensors is read as MiniMax-H3 (native, q/k/v per head)" in notes[0]
        else:
            assert report.architecture.startswith("MiniMax-H3 (native, q/k/v per head)") and not notes
        got = linear_outputs(load_into("minimax_h3", tiny("minimax_h3"), tmp_path, out.name), gen)
        gap = sum(float((got[k] - want[k]).norm() ** 2) for k in want) ** 0.5
        assert gap <= 0.02 * change, (label, gap / change)


def test_minimax_h3_pruned_fine_tune_of_a_full_base(tmp_path, capsys):
    """Pruned MiniMax-H3 checkpoints replace time_embedder by an adaln_t_table (diffusers' single-file loader
    refuses them); their blocks are the model's own: a pruned fine-tune of a full base gives the blocks' LoRA,
    which reproduces the planted fine-tune's layers through diffusers. Asking for the embedders as well is one
    line naming the pruned file and the layer it lacks."""
    from lora_colab.cli import main
    gen = torch.Generator().manual_seed(8)
    model = tiny("minimax_h3")
    a, base, tuned = planted_pair(model, gen)
    pruned = {k: v for k, v in tuned.items() if not k.startswith("time_embedder.")}
    pruned["adaln_t_table"] = torch.randn(16, 6 * model.config.hidden_size, generator=gen)
    st_save_file({k: v.contiguous() for k, v in base.items()}, str(tmp_path / "base.safetensors"))
    st_save_file({k: v.contiguous() for k, v in pruned.items()}, str(tmp_path / "pruned.safetensors"))
    tuned_model = tiny("minimax_h3")
    tuned_model.load_state_dict(to_diffusers(a, tuned, {k: tuple(v.shape) for k, v in model.state_dict().items()}))
    want, was = linear_outputs(tuned_model, gen), linear_outputs(model, gen)
    change = sum(float((want[k] - was[k]).norm() ** 2) for k in want) ** 0.5
    out = tmp_path / "lora.safetensors"
    report = extract(tmp_path / "base.safetensors", tmp_path / "pruned.safetensors", out, rank=4,
                     format="diffusers", progress=False)
    targets = a.targets({k: tuple(v.shape) for k, v in base.items()})
    assert report.architecture.startswith("MiniMax-H3") and \
        len(report.extracted) == sum(len(a.lora_modules(t, "diffusers")) for t in targets)
    got = linear_outputs(load_into("minimax_h3", tiny("minimax_h3"), tmp_path, out.name), gen)
    assert sum(float((got[k] - want[k]).norm() ** 2) for k in want) ** 0.5 <= 0.02 * change
    args = ["extract", str(tmp_path / "base.safetensors"), str(tmp_path / "pruned.safetensors"), "-o",
            str(tmp_path / "all.safetensors"), "--include", "embedders", "-q"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pruned.safetensors" in err and "time_embedder.proj_in.weight" in err, err
    assert not (tmp_path / "all.safetensors").exists()


def test_minimax_h3_mlp_halves_merge_across_spellings(tmp_path):
    """diffusers' ff.net.0.proj holds fc1's halves swapped: a diffusers-spelled LoRA merged with a kohya one
    against the base is, module by module, the sum of their changes in diffusers' row order (halves swapped
    by hand here), and the subspace score reads the base rows in that order."""
    from lora_colab.resizing.resizer import resize
    model = tiny("minimax_h3")
    a, base, _ = planted_pair(model, torch.Generator().manual_seed(5))
    st_save_file({k: v.contiguous() for k, v in base.items()}, str(tmp_path / "base.safetensors"))
    targets = a.targets({k: tuple(v.shape) for k, v in base.items()})
    gen = torch.Generator().manual_seed(6)
    want = {}
    for fmt, weight in (("diffusers", 1.0), ("kohya", -0.5)):
        tensors = {}
        for t in targets:
            down, up = torch.randn(2, t.shape[1], generator=gen), torch.randn(t.shape[0], 2, generator=gen)
            tensors.update(module_tensors(a, fmt, t, down, up, 2.0, torch.float32))
            delta = up @ down
            if t.module.endswith("mlp.fc1"):  # (gate; value) -> diffusers' (value; gate)
                h = t.shape[0] // 2
                delta = torch.cat([delta[h:], delta[:h]])
            name = a.lora_modules(t, "diffusers")[0].name if not t.splits else None
            if name:
                want[name] = want.get(name, 0) + weight * delta
        st_save_file(tensors, str(tmp_path / f"{fmt}.safetensors"))
    merged = resize(tmp_path / "base.safetensors",
                    [f"{tmp_path / 'diffusers.safetensors'}:1,{tmp_path / 'kohya.safetensors'}:-0.5"],
                    tmp_path / "out", "subspace=1,thr=-30", dtype="32")[0]
    lora = load_file(merged.output)
    fc1 = [n for n in want if n.endswith("ff.net.0.proj")]
    assert len(fc1) == 3
    for name in want:
        got = lora[name + ".lora_B.weight"] @ lora[name + ".lora_A.weight"]
        torch.testing.assert_close(got, want[name], rtol=1e-4, atol=1e-5)
    from lora_colab.resizing.base_refs import BaseReferences
    with BaseReferences(tmp_path / "base.safetensors") as refs:
        key, rows = refs.locate(fc1[0])
        h = base[key].shape[0] // 2
        assert torch.equal(refs.weight(key, rows), torch.cat([base[key][h:], base[key][:h]]).float())


def test_minimax_h3_rows_across_the_swapped_halves_read_only_those_rows(tmp_path):
    """A row block of fc1 that straddles diffusers' swapped halves is two pieces of ff.net.0.proj far apart:
    each is read alone (the bytes of those rows, not the whole weight between them) and the rows are the
    canonical (gate; value) rows."""
    from lora_colab.arch.canonical import open_canonical
    model = tiny("minimax_h3")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    a, base, _ = planted_pair(model, torch.Generator().manual_seed(5))
    st_save_file(to_diffusers(a, base, shapes), str(tmp_path / "base.safetensors"))
    key = next(k for k in base if k.endswith("blocks.0.mlp.fc1.weight"))
    h, cols = base[key].shape[0] // 2, base[key].shape[1]
    with open_canonical(tmp_path / "base.safetensors") as view:
        assert view.detected.layout == "diffusers"
        before = view.ckpt.bytes_read
        rows = view.read(key, rows=(h - 3, h + 2))
        assert view.ckpt.bytes_read - before == 5 * cols * base[key].element_size()
    torch.testing.assert_close(rows, base[key][h - 3:h + 2].float(), rtol=0, atol=0)


def tencent_layout(canonical_state):
    """HunyuanVideo 1.5 as Tencent ships it: ComfyUI's fused double-block q/k/v split into three weights."""
    out = {}
    for key, value in canonical_state.items():
        hit = re.fullmatch(r"(double_blocks\.\d+\.(?:img|txt)_attn_)qkv\.(weight|bias)", key)
        if hit:
            for name, part in zip("qkv", value.chunk(3)):
                out[f"{hit.group(1)}{name}.{hit.group(2)}"] = part
        else:
            out[key] = value
    return out


def test_hunyuan_video15_tencent_and_comfyui_repack_layouts_pair():
    """Tencent's file (split q/k/v), ComfyUI's repack (fused) and diffusers' names are one canonical model on the
    full layouts; diffusers' norm_out.linear is the final adaLN modulation with its halves swapped (scale;
    shift), as diffusers' convert script writes it."""
    native = layout("hunyuanvideo1.5-native")
    detected, shapes = canonical(native)
    assert detected.layout == "native" and len(shapes) < len(native)
    repack = {k: v for k, v in shapes.items()}  # ComfyUI's repackaged file holds the canonical names
    for prefix in ("", "model.diffusion_model."):
        found = arch.detect({prefix + k for k in repack})
        assert (found.arch.name, found.layout, found.prefix) == ("hunyuan_video15", "comfy", prefix)
    assert canonical(repack)[1] == shapes
    state = tiny("hunyuan_video15").state_dict()
    final = state["norm_out.linear.weight"]
    h = final.shape[0] // 2
    assert torch.equal(canonical(dict(state))[1]["final_layer.adaLN_modulation.1.weight"],
                       torch.cat([final[h:], final[:h]]))


def test_hunyuan_video15_tencent_fine_tune_of_a_comfyui_base(tmp_path):
    """A Tencent-layout fine-tune against a ComfyUI repack base: the LoRA reproduces the tuned layers through
    diffusers."""
    gen = torch.Generator().manual_seed(8)
    model = tiny("hunyuan_video15")
    a, base, tuned = planted_pair(model, gen)
    st_save_file({k: v.contiguous() for k, v in base.items()}, str(tmp_path / "repack.safetensors"))
    st_save_file({k: v.contiguous() for k, v in tencent_layout(tuned).items()}, str(tmp_path / "tencent.safetensors"))
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tuned_model = tiny("hunyuan_video15")
    tuned_model.load_state_dict(to_diffusers(a, tuned, keys))
    want, was = linear_outputs(tuned_model, gen), linear_outputs(model, gen)
    change = sum(float((want[k] - was[k]).norm() ** 2) for k in want) ** 0.5
    report = extract(tmp_path / "repack.safetensors", tmp_path / "tencent.safetensors", tmp_path / "lora.safetensors",
                     rank=4, format="diffusers", progress=False)
    assert report.architecture == "HunyuanVideo 1.5 (comfy) / native"
    got = linear_outputs(load_into("hunyuan_video15", tiny("hunyuan_video15"), tmp_path, "lora.safetensors"), gen)
    gap = sum(float((got[k] - want[k]).norm() ** 2) for k in want) ** 0.5
    assert gap <= 0.02 * change, gap / change


LTX25 = dict(gated_attn=True, cross_attn_mod=True, audio_gated_attn=True, audio_cross_attn_mod=True,
             use_prompt_embeddings=False, perturbed_attn=True, ff_bias=False, use_prompt_adaln_single=True)


@pytest.mark.parametrize("fmt", ["auto", "diffusers"])
def test_ltx25_gates_and_prompt_adaln_extract_and_load_through_diffusers(tmp_path, fmt):
    """LTX-2.5 (LTX-2.3+'s gated attention, cross-attention adaLN and prompt adaLN, no video FF biases): a
    planted change on the default targets, the gates and the prompt adaLN, extracted from a native file against
    a diffusers folder, gives the tuned layers' outputs through LTX2Pipeline's own loader."""
    cls, _, kwargs = TINY["ltx2"]
    torch.manual_seed(0)
    base_model = getattr(diffusers, cls)(**kwargs, **LTX25).eval()
    gen = torch.Generator().manual_seed(1)
    groups = {"gates", "modulation"}
    a, base, tuned = planted_pair(base_model, gen, rank=2, groups=groups)
    assert a.name == "ltx2" and "prompt_adaln_single.linear.weight" in base
    targets = a.targets({k: tuple(v.shape) for k, v in base.items()}, groups=groups)
    assert {t.group for t in targets} == {"", "gates", "modulation"}
    assert "prompt_adaln_single.linear" in {t.module for t in targets}
    keys = {k: tuple(v.shape) for k, v in base_model.state_dict().items()}
    (tmp_path / "base" / "transformer").mkdir(parents=True)
    st_save_file(to_diffusers(a, base, keys), str(tmp_path / "base" / "transformer" /
                                                 "diffusion_pytorch_model.safetensors"))
    st_save_file({k: v.contiguous() for k, v in tuned.items()}, str(tmp_path / "tuned.safetensors"))
    tuned_model = getattr(diffusers, cls)(**kwargs, **LTX25).eval()
    tuned_model.load_state_dict(to_diffusers(a, tuned, keys))
    want, was = linear_outputs(tuned_model, gen), linear_outputs(base_model, gen)
    change = sum(float((want[k] - was[k]).norm() ** 2) for k in want) ** 0.5
    out = tmp_path / "lora.safetensors"
    report = extract(tmp_path / "base", tmp_path / "tuned.safetensors", out, rank=4, format=fmt, groups=groups,
                     progress=False)
    assert len(report.extracted) == len(targets)
    torch.manual_seed(0)
    model = load_into("ltx2", getattr(diffusers, cls)(**kwargs, **LTX25).eval(), tmp_path, out.name)
    got = linear_outputs(model, gen)
    gate = [k for k in want if k.endswith("to_gate_logits")]
    assert gate and all(not torch.allclose(want[k], was[k]) for k in gate)
    gap = sum(float((got[k] - want[k]).norm() ** 2) for k in want) ** 0.5
    assert gap <= 0.05 * change, gap / change


# HiDream-O1 at a small width: every dimension of the real layout scaled down, two language-model layers and one
# vision block kept (names and structure as ComfyUI's model holds them)
O1_WIDTHS = {4096: 32, 1024: 8, 12288: 64, 128: 16, 1152: 24, 3456: 72, 4304: 40, 4608: 96, 3072: 48, 256: 16,
             151936: 64, 2304: 16, 16: 4}


def tiny_hidream_o1(gen):
    keep = re.compile(r"language_model\.layers\.[01]\.|visual\.blocks\.0\.|(?!language_model\.layers|visual\.blocks)")
    return {k: torch.randn([O1_WIDTHS.get(d, d) for d in s], generator=gen) * 0.02
            for k, s in layout("hidream-o1-native").items() if keep.match(k)}


@pytest.mark.parametrize("fmt", ["auto", "kohya"])
def test_hidream_o1_extracts_what_comfyuis_rules_patch_back(tmp_path, fmt):
    """HiDream-O1 (no diffusers class): a planted change on every target of every group, extracted from native
    files (ComfyUI's names under its checkpoint prefix), patched back by ComfyUI's key map and LoRA arithmetic
    (restated), gives the tuned weights; the diffusers spelling is one line before any output."""
    from whole_model import comfy_apply
    gen = torch.Generator().manual_seed(3)
    base = tiny_hidream_o1(gen)
    a = arch.detect(set(base)).arch
    assert a.name == "hidream_o1"
    targets = a.targets({k: tuple(v.shape) for k, v in base.items()}, groups=set(a.optional_groups))
    assert len(targets) == 2 * 7 + 4 + 1 + 4 + 2
    tuned = dict(base)
    for t in targets:
        tuned[t.key] = base[t.key] + 0.01 * torch.randn(t.shape[0], 2, generator=gen) @ torch.randn(2, t.shape[1],
                                                                                                   generator=gen)
    prefixed = "model.diffusion_model."
    st_save_file({prefixed + k: v for k, v in base.items()}, str(tmp_path / "base.safetensors"))
    st_save_file({prefixed + k: v.contiguous() for k, v in tuned.items()}, str(tmp_path / "tuned.safetensors"))
    out = tmp_path / "lora.safetensors"
    extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", out, rank=2, format=fmt,
            groups=set(a.optional_groups), clamp_quantile=None, dtype="float32", progress=False)
    key_map = unet_key_map(a.name, {k: tuple(v.shape) for k, v in base.items()})
    patched = comfy_apply(out, key_map, base)
    for t in targets:
        change = tuned[t.key] - base[t.key]
        assert (patched[t.key] - tuned[t.key]).norm() <= 1e-3 * change.norm(), t.key
    # resized against the base's own layers (spn_ckpt), every module at the rank it holds: the same weights again
    from lora_colab.resizing.resizer import resize
    report = resize(tmp_path / "base.safetensors", [out], tmp_path / "resized", "spn_ckpt=1,thr=-20", progress=False)[0]
    assert not [w for w in report.warnings if "patch no weight" in w]
    resized = next((tmp_path / "resized").glob("*.safetensors"))
    again = comfy_apply(resized, key_map, base)
    assert all((again[t.key] - tuned[t.key]).norm() <= 1e-2 * (tuned[t.key] - base[t.key]).norm() for t in targets)
    with pytest.raises(OptionError, match="no diffusers model"):
        extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "d.safetensors", rank=2,
                format="diffusers", progress=False)
    assert not (tmp_path / "d.safetensors").exists()


# families whose LoRA names some spelling shares with another family's (Anima's DiT is Cosmos Predict 2's, FLUX.2
# and Chroma keep Flux.1's block names, Ideogram 4 Z-Image's, SD3.5's diffusers names are Flux.1's): the guess
# names each of them
SAME_NAMES = {"anima", "cosmos_predict2_5", "chroma", "flux2", "ideogram4", "sd3"}


@pytest.mark.parametrize("name", sorted(FULL))
def test_a_loras_family_is_guessed_from_its_names_in_every_spelling(name):
    """Without metadata, a LoRA of the default targets in each spelling is guessed as its family (as one of the
    families whose names it shares, where names are shared)."""
    detected, shapes = canonical(layout(FULL[name][0]))
    a = detected.arch
    for fmt in ("kohya", "comfy", "diffusers") if a.diffusers_model else ("kohya", "comfy"):
        names = [m.name for t in a.targets(shapes) for m in a.lora_modules(t, fmt)]
        guess = arch.guess_lora_arch(names)
        assert guess == a.title or (name in SAME_NAMES and a.title in guess.split(" / ")), (fmt, guess)


@pytest.mark.parametrize("metadata,title", [
    ({"modelspec.architecture": "wan-animate-2/lora", "ss_base_model_version": "wan_animate2"}, "Wan-Animate 2"),
    ({"modelspec.architecture": "hidream-o1/lora", "ss_base_model_version": "hidream_o1"}, "HiDream-O1"),
    ({"ss_base_model_version": "wan_t2v_14b"}, "Wan"), ({"modelspec.architecture": "qwen-image-2.1/lora"},
                                                         "Qwen-Image 2.1")])
def test_metadata_names_the_family_by_its_longest_tag(metadata, title):
    """`wan_animate2` holds Wan's tag `wan_` and `hidream_o1` HiDream-I1's `hidream`: the longest tag decides."""
    assert arch.guess_lora_arch(["x"], metadata) == title
