"""ComfyUI's LoRA key matching (comfy/lora.py model_lora_keys_unet/clip, per the reference notes),
re-stated over key lists so tests can check which model weight each emitted LoRA name patches."""

import re

ZIMAGE_BLOCK = re.compile(r"(layers|noise_refiner|context_refiner)\.(\d+)\.attention\.qkv\.weight")
FLUX_DOUBLE_QKV = re.compile(r"double_blocks\.(\d+)\.(img|txt)_attn\.qkv\.weight")
FLUX_SINGLE = re.compile(r"single_blocks\.(\d+)\.linear1\.weight")
# ComfyUI utils.flux_to_diffusers, per block: diffusers module -> BFL weight
FLUX_DOUBLE_PLAIN = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
                     "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0",
                     "ff_context.net.2": "txt_mlp.2", "norm1.linear": "img_mod.lin",
                     "norm1_context.linear": "txt_mod.lin",
                     # FLUX.2's and LyCORIS' names of the MLPs
                     "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
                     "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
FLUX_SINGLE_PLAIN = {"proj_out": "linear2", "norm.linear": "modulation.lin",
                     "attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}  # the last two: FLUX.2's
# comfy/lora.py: the model classes that also take other spellings of their own keys ("": the bare key,
# "lycoris_": flattened with underscores); Chroma and FLUX.2 are Flux models there (flux_to_diffusers)
NATIVE_ALIASES = {"hidream": ("transformer.", "lycoris_"), "qwen_image": ("", "transformer.", "lycoris_"),
                  "qwen_image_2_1": ("", "transformer.", "lycoris_"), "kandinsky5": ("", "transformer."),
                  "ernie_image": ("transformer.",), "ltx2": ("",)}
FLUX_MODELS = ("flux", "chroma", "flux2")
# comfy/utils.py krea2_to_diffusers: diffusers names of Krea 2's native modules, per block and outside blocks
KREA2_BLOCK = {"attn.to_q": "attn.wq", "attn.to_k": "attn.wk", "attn.to_v": "attn.wv", "attn.to_gate": "attn.gate",
               "attn.to_out.0": "attn.wo", "attn.to_out": "attn.wo", "ff.gate": "mlp.gate", "ff.up": "mlp.up",
               "ff.down": "mlp.down"}
KREA2_BLOCKS = {"transformer_blocks": "blocks", "text_fusion.layerwise_blocks": "txtfusion.layerwise_blocks",
                "text_fusion.refiner_blocks": "txtfusion.refiner_blocks"}
KREA2_BASIC = {"img_in": "first", "time_embed.linear_1": "tmlp.0", "time_embed.linear_2": "tmlp.2",
               "time_mod_proj": "tproj.1", "txt_in.linear_1": "txtmlp.1", "txt_in.linear_2": "txtmlp.3",
               "text_fusion.projector": "txtfusion.projector", "final_layer.linear": "last.linear"}


def _krea2_aliases(key_map, model_shapes):
    """comfy/lora.py for Krea 2: each diffusers name (bare, `diffusion_model.`, `transformer.`, `lycoris_`) ->
    its native weight."""
    names = dict(KREA2_BASIC)
    for key in model_shapes:
        hit = re.fullmatch(r"(blocks|txtfusion\.layerwise_blocks|txtfusion\.refiner_blocks)\.(\d+)\..*", key)
        if hit:
            d_block = next(d for d, c in KREA2_BLOCKS.items() if c == hit.group(1))
            names.update({f"{d_block}.{hit.group(2)}.{d}": f"{hit.group(1)}.{hit.group(2)}.{c}"
                          for d, c in KREA2_BLOCK.items()})
    for d, c in names.items():
        if c + ".weight" in model_shapes:
            for alias in (d, "diffusion_model." + d, "transformer." + d, "lycoris_" + d.replace(".", "_")):
                key_map[alias] = (c + ".weight", None)
# flux_to_diffusers' MAP_BASIC (weights): norm_out.linear comes with swap_scale_shift, which ComfyUI applies to the
# patch, so a LoRA holding diffusers' (scale; shift) rows patches the native (shift; scale) weight rightly
FLUX_BASIC = {"img_in": "x_embedder", "txt_in": "context_embedder",
              "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
              "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
              "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
              "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
              "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
              "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
              "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}
# ComfyUI utils.mmdit_to_diffusers (SD3), per block: fused q/k/v as row thirds, then the plain renames
SD3_QKV = re.compile(r"joint_blocks\.(\d+)\.(x_block\.attn|context_block\.attn|x_block\.attn2)\.qkv\.weight")
SD3_QKV_NAMES = {"x_block.attn": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "context_block.attn": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                 "x_block.attn2": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}
SD3_BLOCK = {"context_block.attn.proj": "attn.to_add_out", "context_block.mlp.fc1": "ff_context.net.0.proj",
             "context_block.mlp.fc2": "ff_context.net.2", "context_block.adaLN_modulation.1": "norm1_context.linear",
             "x_block.adaLN_modulation.1": "norm1.linear", "x_block.attn.proj": "attn.to_out.0",
             "x_block.mlp.fc1": "ff.net.0.proj", "x_block.mlp.fc2": "ff.net.2", "x_block.attn2.proj": "attn2.to_out.0"}
SD3_BASIC = {"context_embedder": "context_embedder", "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
             "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
             "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
             "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2", "final_layer.linear": "proj_out"}


# ComfyUI supported_models.HunyuanVideo.process_unet_state_dict: a checkpoint's keys as its model names them
HUNYUAN_LOAD_RENAMES = (("txt_in.t_embedder.mlp.0.", "txt_in.t_embedder.in_layer."),
                        ("txt_in.t_embedder.mlp.2.", "txt_in.t_embedder.out_layer."),
                        ("txt_in.c_embedder.linear_1.", "txt_in.c_embedder.in_layer."),
                        ("txt_in.c_embedder.linear_2.", "txt_in.c_embedder.out_layer."),
                        ("_mod.linear.", "_mod.lin."), ("_attn_qkv.", "_attn.qkv."), ("mlp.fc1.", "mlp.0."),
                        ("mlp.fc2.", "mlp.2."), ("_attn_q_norm.weight", "_attn.norm.query_norm.weight"),
                        ("_attn_k_norm.weight", "_attn.norm.key_norm.weight"),
                        (".q_norm.weight", ".norm.query_norm.weight"), (".k_norm.weight", ".norm.key_norm.weight"),
                        ("_attn_proj.", "_attn.proj."), (".modulation.linear.", ".modulation.lin."),
                        ("_in.mlp.2.", "_in.out_layer."), ("_in.mlp.0.", "_in.in_layer."))
# comfy/lora.py's diffusion-pipe aliases for HunyuanVideo models, from the model's own keys
HUNYUAN_LORA_ALIASES = (("_mod.lin.", "_mod.linear."), ("_attn.qkv.", "_attn_qkv."), ("_attn.proj.", "_attn_proj."),
                        ("mlp.0.", "mlp.fc1."), ("mlp.2.", "mlp.fc2."), (".modulation.lin.", ".modulation.linear."))


def _renamed(key, renames):
    for old, new in renames:
        key = key.replace(old, new)
    return key


def _hunyuan_key_map(model_shapes):
    """HunyuanVideo (1.5): the checkpoint's keys renamed as ComfyUI loads them, the generic rule over those and
    diffusion-pipe's aliases; each LoRA name -> (the checkpoint's key it patches, None)."""
    key_map = {}
    for key in model_shapes:
        model_key = _renamed(key, HUNYUAN_LOAD_RENAMES)
        if not model_key.endswith(".weight"):
            key_map["diffusion_model." + model_key] = (key, None)
            continue
        base = model_key[: -len(".weight")]
        key_map["lora_unet_" + base.replace(".", "_")] = (key, None)
        key_map["diffusion_model." + base] = (key, None)
        alias = _renamed(model_key, HUNYUAN_LORA_ALIASES)[: -len(".weight")]
        key_map["transformer." + alias] = key_map["diffusion_model." + alias] = (key, None)
    return key_map


def unet_key_map(arch, model_shapes):
    """LoRA name -> (model weight key, (start, length) slice or None); `model_shapes` is native key -> shape."""
    if arch == "hunyuan_video15":
        return _hunyuan_key_map(model_shapes)
    key_map = {}
    for key in model_shapes:
        if key.endswith(".weight"):
            base = key[: -len(".weight")]
            key_map["lora_unet_" + base.replace(".", "_")] = (key, None)
            key_map["diffusion_model." + base] = (key, None)
    if arch == "zimage":
        for key, shape in model_shapes.items():
            hit = ZIMAGE_BLOCK.fullmatch(key)
            if not hit:
                continue
            block = f"{hit.group(1)}.{hit.group(2)}"
            d = shape[0] // 3
            aliases = {f"{block}.attention.to_{p}": (key, (i * d, d)) for i, p in enumerate("qkv")}
            aliases[f"{block}.attention.to_out.0"] = (f"{block}.attention.out.weight", None)
            for w in ("w1", "w2", "w3"):
                aliases[f"{block}.feed_forward.{w}"] = (f"{block}.feed_forward.{w}.weight", None)
            if hit.group(1) != "context_refiner":
                aliases[f"{block}.adaLN_modulation.0"] = (f"{block}.adaLN_modulation.0.weight", None)
            for name, target in aliases.items():
                for alias in (f"diffusion_model.{name}", f"transformer.{name}", "lycoris_" + name.replace(".", "_"),
                              name):
                    key_map[alias] = target
    for alias in NATIVE_ALIASES.get(arch, ()):
        for key in model_shapes:
            if key.endswith(".weight"):
                base = key[: -len(".weight")]
                name = "lycoris_" + base.replace(".", "_") if alias == "lycoris_" else alias + base
                key_map.setdefault(name, (key, None))
    if arch in FLUX_MODELS:
        for key, shape in model_shapes.items():
            hit = FLUX_DOUBLE_QKV.fullmatch(key)
            if hit:
                d = shape[0] // 3
                names = ("to_q", "to_k", "to_v") if hit.group(2) == "img" else ("add_q_proj", "add_k_proj",
                                                                                 "add_v_proj")
                for i, n in enumerate(names):
                    _flux_alias(key_map, f"transformer_blocks.{hit.group(1)}.attn.{n}", (key, (i * d, d)))
                if hit.group(2) == "img":
                    for diff, bfl in FLUX_DOUBLE_PLAIN.items():
                        _flux_alias(key_map, f"transformer_blocks.{hit.group(1)}.{diff}",
                                    (f"double_blocks.{hit.group(1)}.{bfl}.weight", None))
            hit = FLUX_SINGLE.fullmatch(key)
            if hit:
                d = shape[1]
                for i, n in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
                    _flux_alias(key_map, f"single_transformer_blocks.{hit.group(1)}.{n}", (key, (i * d, d)))
                _flux_alias(key_map, f"single_transformer_blocks.{hit.group(1)}.proj_mlp",
                            (key, (3 * d, shape[0] - 3 * d)))
                for diff, bfl in FLUX_SINGLE_PLAIN.items():
                    _flux_alias(key_map, f"single_transformer_blocks.{hit.group(1)}.{diff}",
                                (f"single_blocks.{hit.group(1)}.{bfl}.weight", None))
            if key.endswith(".weight") and key[: -len(".weight")] in FLUX_BASIC:
                _flux_alias(key_map, FLUX_BASIC[key[: -len(".weight")]], (key, None))
    if arch == "sd3":
        _sd3_aliases(key_map, model_shapes)
    if arch == "krea2":
        _krea2_aliases(key_map, model_shapes)
    if arch == "ace_step15":
        _ace_step15_aliases(key_map, model_shapes)
    return key_map


def _ace_step15_aliases(key_map, model_shapes):
    """comfy/lora.py for ACEStep15: `base_model.model.` + the decoder's own names (its trainer's LoRAs) and
    `lycoris_` + them flattened -> the decoder's weight."""
    for key in model_shapes:
        if key.startswith("decoder.") and key.endswith(".weight"):
            name = key[len("decoder."):-len(".weight")]
            key_map["base_model.model." + name] = (key, None)
            key_map["lycoris_" + name.replace(".", "_")] = (key, None)


def _sd3_aliases(key_map, model_shapes):
    """comfy/lora.py for SD3: `transformer.` (and `base_model.model.`, `lora_transformer_`, `lycoris_`) +
    each diffusers name mmdit_to_diffusers knows -> the native weight (a row slice for q, k, v)."""
    for key, shape in model_shapes.items():
        hit = SD3_QKV.fullmatch(key)
        if hit:
            d = shape[0] // 3
            for i, name in enumerate(SD3_QKV_NAMES[hit.group(2)]):
                _sd3_alias(key_map, f"transformer_blocks.{hit.group(1)}.{name}", (key, (i * d, d)))
        block = re.fullmatch(r"joint_blocks\.(\d+)\.(.+)\.weight", key)
        if block and block.group(2) in SD3_BLOCK:
            _sd3_alias(key_map, f"transformer_blocks.{block.group(1)}.{SD3_BLOCK[block.group(2)]}", (key, None))
        if key.endswith(".weight") and key[:-len(".weight")] in SD3_BASIC:
            _sd3_alias(key_map, SD3_BASIC[key[:-len(".weight")]], (key, None))


def _sd3_alias(key_map, diffusers_name, target):
    for alias in (f"transformer.{diffusers_name}", f"base_model.model.{diffusers_name}",
                  "lora_transformer_" + diffusers_name.replace(".", "_"), "lycoris_" + diffusers_name.replace(".", "_")):
        key_map[alias] = target


def _flux_alias(key_map, diffusers_name, target):
    for alias in (f"transformer.{diffusers_name}", "lycoris_" + diffusers_name.replace(".", "_"),
                  "lora_transformer_" + diffusers_name.replace(".", "_"), diffusers_name):
        key_map[alias] = target


def sd_diffusers_aliases(unet_shapes):
    """comfy/lora.py's names for an SD/SDXL UNet's weights from utils.unet_to_diffusers: `lora_unet_`/`lycoris_` +
    the flattened diffusers path, and the diffusers path bare or behind `unet.` with attention's `.to_` as the
    old `.processor.to_` (and `to_out.0` as `to_out`), -> (native key, None)."""
    from lora_colab.arch import sgm_to_diffusers

    key_map = {}
    for key in unet_shapes:
        if not key.endswith(".weight"):
            continue
        try:
            d = sgm_to_diffusers(key[: -len(".weight")])
        except ValueError:
            continue
        for alias in ("lora_unet_", "lycoris_"):
            key_map[alias + d.replace(".", "_")] = (key, None)
        old = d.replace(".to_", ".processor.to_")
        old = old[:-2] if old.endswith(".to_out.0") else old
        key_map[old] = key_map["unet." + old] = (key, None)
    return key_map


def clip_key_map(prefix, n_layers, diffusers_prefix=None):
    """kohya TE names ComfyUI accepts for an HF-layout CLIP (`lora_te1_...`) and, with `diffusers_prefix`
    (`text_encoder.`, `text_encoder_2.`), its diffusers names behind that, -> (layer, module)."""
    key_map = {}
    for layer in range(n_layers):
        for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                       "mlp.fc1", "mlp.fc2"):
            name = f"text_model.encoder.layers.{layer}.{module}"
            key_map[f"{prefix}_{name.replace('.', '_')}"] = (f"{prefix}:{name}", None)
            if diffusers_prefix:
                key_map[diffusers_prefix + name] = (f"{prefix}:{name}", None)
    return key_map
