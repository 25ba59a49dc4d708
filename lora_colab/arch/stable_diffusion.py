"""SD1.5 and SDXL: LDM/SGM single files (UNet + CLIP text encoders), kohya's target set and names."""

import re

from .common import CanonicalMap, LoraModule, NativeArchitecture, Target, find_prefix, kohya_name

UNET = "model.diffusion_model."
_XFORMER = r"(?:input_blocks\.\d+\.1|middle_block\.1|output_blocks\.\d+\.1)"
_ATTN_TARGET = re.compile(
    rf"({_XFORMER}\.(?:proj_in|proj_out|transformer_blocks\.\d+\.(?:attn[12]\.to_(?:q|k|v|out\.0)"
    rf"|ff\.net\.0\.proj|ff\.net\.2)))\.weight")
_RESNET = r"(?:input_blocks\.\d+\.0|middle_block\.[02]|output_blocks\.\d+\.0)"
_CONV_TARGET = re.compile(
    rf"({_RESNET}\.(?:in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection)"
    r"|input_blocks\.\d+\.0\.op|output_blocks\.\d+\.[12]\.conv)\.weight")
_CLIP_TARGET = re.compile(r"(text_model\.encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12]))\.weight")
_BIGG_TARGET = re.compile(r"transformer\.resblocks\.(\d+)\.(attn\.in_proj_weight|attn\.out_proj\.weight"
                          r"|mlp\.c_fc\.weight|mlp\.c_proj\.weight)")
_BIGG_TO_HF = {"attn.out_proj.weight": "self_attn.out_proj", "mlp.c_fc.weight": "mlp.fc1",
               "mlp.c_proj.weight": "mlp.fc2"}
_RESNET_TO_DIFFUSERS = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
                        "skip_connection": "conv_shortcut"}


def sgm_to_diffusers(module):
    """diffusers UNet module path of an LDM/SGM UNet module path (SD1 and SDXL share the scheme)."""
    head = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)(?:\.(\d+))?\.?(.*)", module)
    if not head:
        raise ValueError(f"not an LDM UNet module: {module}")
    kind, index, sub, rest = head.group(1), int(head.group(2)), head.group(3), head.group(4)
    if kind == "middle_block":
        block = {0: "mid_block.resnets.0", 1: "mid_block.attentions.0", 2: "mid_block.resnets.1"}[index]
        return _inner(block, ".".join(p for p in (sub, rest) if p))
    if kind == "input_blocks":
        level, slot = (index - 1) // 3, (index - 1) % 3
        if slot == 2:  # downsampler: input_blocks.N.0.op
            return f"down_blocks.{level}.downsamplers.0.conv"
        block = f"down_blocks.{level}.{'resnets' if sub == '0' else 'attentions'}.{slot}"
    else:
        level, slot = index // 3, index % 3
        if rest.startswith("conv") and sub in ("1", "2") and not rest.startswith("conv1"):
            return f"up_blocks.{level}.upsamplers.0.conv"
        block = f"up_blocks.{level}.{'resnets' if sub == '0' else 'attentions'}.{slot}"
    return _inner(block, rest)


_RESNET_FROM_DIFFUSERS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                          "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def diffusers_to_sgm(key, up_attention_levels):
    """LDM/SGM UNet key of a diffusers UNet key (SD1 and SDXL, two resnets per level), or None.
    `up_attention_levels`: the up_blocks levels that have attentions (they decide where an upsampler sits)."""
    module, _, param = key.rpartition(".")
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{param}"
    hit = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.?(.*)",
                       module) or re.fullmatch(r"(mid_block)\.()(resnets|attentions)\.(\d+)\.?(.*)", module)
    if not hit:
        return None
    kind, level, part, slot, rest = hit.groups()
    slot = int(slot)
    if kind == "mid_block":
        block = f"middle_block.{1 if part == 'attentions' else 2 * slot}"
    elif kind == "down_blocks":
        level = int(level)
        if part == "downsamplers":
            return f"input_blocks.{3 * level + 3}.0.op.{param}"
        block = f"input_blocks.{3 * level + slot + 1}.{1 if part == 'attentions' else 0}"
    else:
        level = int(level)
        if part == "upsamplers":
            return f"output_blocks.{3 * level + 2}.{2 if level in up_attention_levels else 1}.conv.{param}"
        block = f"output_blocks.{3 * level + slot}.{1 if part == 'attentions' else 0}"
    if part == "resnets":
        rest = _RESNET_FROM_DIFFUSERS.get(rest, rest)
    return ".".join(p for p in (block, rest, param) if p)


def _inner(block, rest):
    if ".resnets." in block:
        rest = _RESNET_TO_DIFFUSERS.get(rest, rest)
    return f"{block}.{rest}" if rest else block


class _StableDiffusion(NativeArchitecture):
    diffusers_classes = ("UNet2DConditionModel",)  # the class a diffusers folder of this layout names
    auto_format = "kohya"
    exhaustive_layout_map = True  # diffusers_to_sgm renames every UNet key
    default_dtype = "fp16"

    te_prefixes = {}  # component -> key prefix in the single file

    def diff_module(self, module):
        """The UNet's modules only: text encoder biases and norms are not carried."""
        return module[len(UNET):] if module.startswith(UNET) else None

    def canonical_map(self, keys, layout, prefix):
        cmap = CanonicalMap()
        if layout in ("diffusers", "diffusers-unet"):
            return self._diffusers_map(keys, "unet." if layout == "diffusers" else prefix, cmap)
        model_prefixes = tuple(self.te_prefixes.values())
        for key in keys:
            if layout == "unet-only":
                if key.startswith(prefix):
                    cmap.add(UNET + key[len(prefix):], key)
            elif key.startswith(UNET) or key.startswith(model_prefixes):
                cmap.add(self._with_text_model(key), key)
        return cmap

    def _diffusers_map(self, keys, unet_prefix, cmap):
        """A diffusers pipeline's `unet.`, `text_encoder.` and `text_encoder_2.` keys (as PipelineCheckpoint
        prefixes them) on the single file's canonical names; the bigG encoder's split q/k/v become the parts
        of its fused in_proj."""
        levels = {int(hit.group(1)) for key in keys
                  for hit in [re.match(re.escape(unet_prefix) + r"up_blocks\.(\d+)\.attentions\.", key)] if hit}
        te_prefixes = list(self.te_prefixes.values())
        for key in keys:
            if key.startswith(unet_prefix) and not key.startswith("text_encoder"):
                sgm = diffusers_to_sgm(key[len(unet_prefix):], levels)
                if sgm is not None:
                    cmap.add(UNET + sgm, key)
            elif key.startswith("text_encoder."):
                local = key[len("text_encoder."):]
                cmap.add(te_prefixes[0] + ("" if local.startswith("text_model.") else "text_model.") + local, key)
            elif key.startswith("text_encoder_2.") and len(te_prefixes) > 1:
                self._bigg_from_hf(key, te_prefixes[1], cmap)
        return cmap

    @staticmethod
    def _bigg_from_hf(key, prefix, cmap):
        hit = re.fullmatch(r"text_encoder_2\.(?:text_model\.)?encoder\.layers\.(\d+)\.(self_attn\.([qkv])_proj"
                           r"|self_attn\.out_proj|mlp\.fc1|mlp\.fc2)\.weight", key)
        if not hit:
            return
        layer, module, qkv = hit.groups()
        base = f"{prefix}transformer.resblocks.{layer}."
        if qkv:
            cmap.add(base + "attn.in_proj_weight", key, "qkv".index(qkv), 3)
        else:
            cmap.add(base + {"self_attn.out_proj": "attn.out_proj.weight", "mlp.fc1": "mlp.c_fc.weight",
                             "mlp.fc2": "mlp.c_proj.weight"}[module], key)

    def _with_text_model(self, key):
        """HF CLIP keys appear both with and without `text_model.`; canonical names have it."""
        for component, prefix in self.te_prefixes.items():
            if component != "te2" and key.startswith(prefix) and not key.startswith(prefix + "text_model."):
                return prefix + "text_model." + key[len(prefix):]
        return key

    def targets(self, shapes, groups=frozenset(), conv=False, text_encoders=True):
        found = []
        for key, shape in shapes.items():
            if key.startswith(UNET):
                found.extend(self._unet_target(key, shape, conv))
            elif text_encoders:
                found.extend(self._te_targets(key, shape))
        return found

    def _unet_target(self, key, shape, conv):
        local = key[len(UNET):]
        hit = _ATTN_TARGET.fullmatch(local)
        group = ""
        if not hit and conv:
            hit, group = _CONV_TARGET.fullmatch(local), "conv"
        if not hit or len(shape) not in (2, 4):
            return []
        module = hit.group(1)
        is_kxk = len(shape) == 4 and shape[2:] != (1, 1) and tuple(shape[2:]) != (1, 1)
        kind = "conv" if is_kxk else "linear"
        return [Target(key, module, tuple(shape), "model", kind, conv1x1=len(shape) == 4 and not is_kxk,
                       group=group)]

    def _te_targets(self, key, shape):
        for component, prefix in self.te_prefixes.items():
            if not key.startswith(prefix):
                continue
            local = key[len(prefix):]
            if component == "te2":
                hit = _BIGG_TARGET.fullmatch(local)
                if not hit:
                    return []
                layer, part = hit.groups()
                base = f"text_model.encoder.layers.{layer}"
                if part == "attn.in_proj_weight":
                    d = shape[0] // 3
                    splits = tuple((f"{base}.self_attn.{n}_proj", i * d, (i + 1) * d) for i, n in enumerate("qkv"))
                    return [Target(key, f"{base}.self_attn.qkv", tuple(shape), component, splits=splits)]
                return [Target(key, f"{base}.{_BIGG_TO_HF[part]}", tuple(shape), component)]
            hit = _CLIP_TARGET.fullmatch(local)
            return [Target(key, hit.group(1), tuple(shape), component)] if hit and len(shape) == 2 else []
        return []

    def unet_kohya_path(self, module):
        return module

    def lora_modules(self, target, fmt):
        if target.component == "model":
            if fmt == "kohya":
                return [LoraModule(kohya_name("lora_unet", self.unet_kohya_path(target.module)))]
            if fmt == "comfy":
                return [LoraModule("diffusion_model." + target.module)]
            return [LoraModule("unet." + sgm_to_diffusers(target.module), None,
                               (".lora_A.weight", ".lora_B.weight"), False)]
        if fmt == "diffusers":
            prefix = {"te": "text_encoder.", "te1": "text_encoder.", "te2": "text_encoder_2."}[target.component]
            peft = (".lora_A.weight", ".lora_B.weight")
            if target.splits:
                return [LoraModule(prefix + name, (a, b), peft, False) for name, a, b in target.splits]
            return [LoraModule(prefix + target.module, None, peft, False)]
        kohya_prefix = "lora_" + target.component
        if target.splits:
            return [LoraModule(kohya_name(kohya_prefix, name), (a, b)) for name, a, b in target.splits]
        return [LoraModule(kohya_name(kohya_prefix, target.module))]


def _diffusers_unet(keys, sdxl_probe):
    """("diffusers", "unet.") for a diffusers pipeline, ("diffusers-unet", prefix) for a lone diffusers UNet,
    of SDXL (with its added embedding, `sdxl_probe`) or SD1.5 (without one)."""
    for layout, prefix in (("diffusers", "unet."), ("diffusers-unet", "")):
        if prefix + "conv_in.weight" in keys and prefix + "down_blocks.0.resnets.0.conv1.weight" in keys:
            has_added = prefix + "add_embedding.linear_1.weight" in keys
            if (sdxl_probe is not None) == has_added:
                return layout, prefix
    return None


class SDXL(_StableDiffusion):
    name = "sdxl"
    title = "SDXL"
    base_model_version = "sdxl_base_v1-0"
    modelspec_architecture = "stable-diffusion-xl-v1-base/lora"
    implementation = "https://github.com/Stability-AI/generative-models"
    te_prefixes = {"te1": "conditioner.embedders.0.transformer.", "te2": "conditioner.embedders.1.model."}
    lora_hint = re.compile(r"(?:^|_)(?:input_blocks|output_blocks|middle_block)_\d+_|^lora_te[12]_|add_embedding|"
                           r"text_encoder_2_")
    metadata_tags = ("sdxl", "stable-diffusion-xl")

    def detect(self, keys):
        if UNET + "label_emb.0.0.weight" in keys or (
                "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys):
            return "single-file", UNET
        found = _diffusers_unet(keys, "add_embedding.linear_1.weight")
        if found is not None:
            return found
        prefix = find_prefix(keys, ["input_blocks.0.0.weight", "label_emb.0.0.weight"])
        if prefix is not None:
            return "unet-only", prefix
        return None


class SD15(_StableDiffusion):
    name = "sd15"
    title = "SD1.5"
    base_model_version = "sd_v1"
    modelspec_architecture = "stable-diffusion-v1/lora"
    implementation = "diffusers"
    te_prefixes = {"te": "cond_stage_model.transformer."}
    resolution = "512x512"
    lora_hint = re.compile(r"^lora_te_text_model|(?:^|_)(?:down|up)_blocks_\d+_(?:attentions|resnets)_\d+|"
                           r"(?:^|_)mid_block_(?:attentions|resnets)_")
    metadata_tags = ("sd_v1", "stable-diffusion-v1")

    def detect(self, keys):
        if UNET + "input_blocks.0.0.weight" in keys:
            return "single-file", UNET
        found = _diffusers_unet(keys, None)
        if found is not None:
            return found
        prefix = find_prefix(keys, ["input_blocks.0.0.weight"])
        if prefix is not None:
            return "unet-only", prefix
        return None

    def unet_kohya_path(self, module):
        return sgm_to_diffusers(module)  # sd-scripts' SD1 UNet uses diffusers module names


_CONV3X3 = re.compile(r"(in_layers_2|out_layers_3|_op|_conv|conv1|conv2|conv_in|conv_out)$")
_CONV1X1 = re.compile(r"(skip_connection|conv_shortcut)$")


def lora_conv_shape(name, shape):
    """The weight shape of a UNet convolution that a LoRA module `name` patches, from its flattened 2-D change
    `shape` (LoHa keeps a convolution's factors flat): 3×3 for the ResNet, down- and upsampling convs, 1×1
    for the skip connections; `shape` for any other name."""
    flat = name.replace(".", "_")
    out, cols = shape
    if _CONV3X3.search(flat) and cols % 9 == 0:
        return (out, cols // 9, 3, 3)
    if _CONV1X1.search(flat):
        return (out, cols, 1, 1)
    return tuple(shape)
