"""Z-Image / Z-Image Turbo: ComfyUI single file (fused qkv) and diffusers (split to_q/to_k/to_v)."""

import re

from .common import PEFT_SUFFIXES, LoraModule, NativeArchitecture, Target, find_prefix

_BLOCKS = r"(?:layers|noise_refiner|context_refiner)\.\d+"
_DEFAULT = re.compile(rf"({_BLOCKS})\.(attention\.qkv|attention\.out|feed_forward\.w[123])\.weight")
_ADALN = re.compile(rf"({_BLOCKS})\.adaLN_modulation\.0\.weight")
_DIFFUSERS_RENAMES = (
    (re.compile(r"(.*\.attention)\.to_out\.0\.(weight|bias)"), r"\1.out.\2"),
    (re.compile(r"(.*\.attention)\.norm_q\.weight"), r"\1.q_norm.weight"),
    (re.compile(r"(.*\.attention)\.norm_k\.weight"), r"\1.k_norm.weight"),
    (re.compile(r"all_x_embedder\.2-1\.(.*)"), r"x_embedder.\1"),
    (re.compile(r"all_final_layer\.2-1\.(.*)"), r"final_layer.\1"),
)
_QKV_PART = re.compile(r"(.*\.attention)\.to_([qkv])\.weight")


class ZImage(NativeArchitecture):
    name = "zimage"
    diffusers_classes = ("ZImageTransformer2DModel",)  # the class a diffusers folder of this layout names
    title = "Z-Image"
    unloaded_norms = ("norm_final",)  # ComfyUI's final LayerNorm is not elementwise-affine: no weight to patch
    auto_format = "kohya"
    base_model_version = "zimage"
    modelspec_architecture = "Z-Image/lora"
    implementation = "https://github.com/Tongyi-MAI/Z-Image"
    lora_hint = re.compile(r"(?:^|_)(?:layers|noise_refiner|context_refiner)_\d+_(?:attention|feed_forward)_")
    metadata_tags = ("z-image", "zimage", "lumina2")
    optional_groups = {"adaln": "adaLN_modulation.0 of each block"}

    def detect(self, keys):
        prefix = find_prefix(keys, ["layers.0.attention.qkv.weight"])
        if prefix is not None:
            return "single-file", prefix
        prefix = find_prefix(keys, ["layers.0.attention.to_q.weight", "cap_embedder.1.weight"])
        if prefix is not None:
            return "diffusers", prefix
        return None

    def from_layout(self, native, layout):
        if layout == "diffusers":
            part = _QKV_PART.fullmatch(native)
            if part:
                return f"{part.group(1)}.qkv.weight", "qkv".index(part.group(2)), 3
            for pattern, replacement in _DIFFUSERS_RENAMES:
                if pattern.fullmatch(native):
                    return pattern.sub(replacement, native), 0, 1
        return native, 0, 1

    def targets(self, shapes, groups=frozenset(), conv=False, text_encoders=True):
        found = []
        for key, shape in shapes.items():
            hit = _DEFAULT.fullmatch(key)
            group = ""
            if not hit and "adaln" in groups:
                hit, group = _ADALN.fullmatch(key), "adaln"
            if not hit or len(shape) != 2:
                continue
            module = key[: -len(".weight")]
            splits = ()
            if module.endswith(".qkv"):
                d = shape[0] // 3
                splits = (("to_q", 0, d), ("to_k", d, 2 * d), ("to_v", 2 * d, 3 * d))
            found.append(Target(key, module, tuple(shape), splits=splits, group=group))
        return found

    def diffusers_modules(self, target):
        if target.splits:
            block = target.module[: -len(".qkv")]
            return [LoraModule(f"transformer.{block}.{name}", (a, b), PEFT_SUFFIXES, False)
                    for name, a, b in target.splits]
        module = re.sub(r"\.attention\.out$", ".attention.to_out.0", target.module)
        return [LoraModule("transformer." + module, None, PEFT_SUFFIXES, False)]
