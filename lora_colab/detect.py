"""Recognise a checkpoint's architecture and layout from its tensor names."""

from dataclasses import dataclass

# Prefixes checkpoints carry in front of the model's own names, longest first.
MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.", "unet.")


@dataclass(frozen=True)
class Detected:
    """What a checkpoint holds: architecture id, layout name and the prefix its model keys carry."""

    arch: str    # "zimage", "flux", "sdxl", "sd15" or "generic"
    layout: str  # "single-file", "diffusers", "ldm" ...
    prefix: str  # e.g. "model.diffusion_model." or ""

    def describe(self):
        names = {"zimage": "Z-Image", "flux": "Flux.1", "sdxl": "SDXL", "sd15": "SD1.5", "generic": "generic"}
        prefix = f", prefix {self.prefix!r}" if self.prefix else ""
        return f"{names.get(self.arch, self.arch)} ({self.layout}{prefix})"


# (arch, layout, a key that only that layout has, after the prefix)
_SIGNATURES = (
    ("zimage", "single-file", "layers.0.attention.qkv.weight"),
    ("zimage", "diffusers", "layers.0.attention.to_q.weight", "cap_embedder.1.weight"),
    ("flux", "bfl", "double_blocks.0.img_attn.qkv.weight"),
    ("flux", "diffusers", "transformer_blocks.0.attn.add_q_proj.weight", "single_transformer_blocks.0.proj_mlp.weight"),
)


def split_prefix(keys, probes):
    """The prefix under which any of `probes` occurs in `keys`, or None."""
    keyset = keys if isinstance(keys, (set, frozenset, dict)) else set(keys)
    for prefix in ("",) + MODEL_PREFIXES:
        if all(prefix + probe in keyset for probe in probes):
            return prefix
    return None


def detect(keys):
    """Detect the architecture of a checkpoint from its key names."""
    keyset = set(keys)
    if "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keyset or (
            "model.diffusion_model.label_emb.0.0.weight" in keyset):
        return Detected("sdxl", "single-file", "model.diffusion_model.")
    if "model.diffusion_model.input_blocks.0.0.weight" in keyset:
        return Detected("sd15", "ldm", "model.diffusion_model.")
    for arch, layout, *probes in _SIGNATURES:
        prefix = split_prefix(keyset, probes)
        if prefix is not None:
            return Detected(arch, layout, prefix)
    if split_prefix(keyset, ["input_blocks.0.0.weight", "label_emb.0.0.weight"]) is not None:
        return Detected("sdxl", "unet-only", split_prefix(keyset, ["label_emb.0.0.weight"]))
    if split_prefix(keyset, ["down_blocks.0.resnets.0.conv1.weight", "add_embedding.linear_1.weight"]) is not None:
        return Detected("sdxl", "diffusers", split_prefix(keyset, ["add_embedding.linear_1.weight"]))
    if split_prefix(keyset, ["down_blocks.0.resnets.0.conv1.weight"]) is not None:
        return Detected("sd15", "diffusers", split_prefix(keyset, ["down_blocks.0.resnets.0.conv1.weight"]))
    if split_prefix(keyset, ["input_blocks.0.0.weight"]) is not None:
        return Detected("sd15", "unet-only", split_prefix(keyset, ["input_blocks.0.0.weight"]))
    return Detected("generic", "unknown", "")
