"""The shared vocabulary of architectures: targets, layouts and output module names."""

import re
from dataclasses import dataclass, field

# Prefixes checkpoints carry in front of the model's own names, longest first.
MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.", "unet.")


@dataclass(frozen=True)
class Target:
    """One weight that gets a LoRA: its canonical weight key and what the LoRA is written as.

    `key` is the canonical weight key (the arch's native layout, e.g. `layers.0.attention.qkv.weight`);
    `module` the canonical module path; `component` says which model part it belongs to
    ("model", "te1", "te2"); `kind` is "linear" or "conv" (a k×k kernel, k > 1); `conv1x1` marks a 1×1
    convolution (decomposed as a linear, written with 4-D factors); `splits` names the row blocks a fused
    weight is split into when a format needs separate modules, as (name, start, stop).
    """

    key: str
    module: str
    shape: tuple
    component: str = "model"
    kind: str = "linear"
    conv1x1: bool = False
    splits: tuple = ()
    group: str = ""  # optional-target group this belongs to ("adaln", "modulation"...), "" = default


@dataclass(frozen=True)
class LoraModule:
    """A module name as a LoRA file spells it, and which rows of the target's up factor it takes."""

    name: str
    rows: tuple = None  # (start, stop) into the target's output rows; None = all
    factor_suffixes: tuple = (".lora_down.weight", ".lora_up.weight")
    alpha: bool = True  # whether an `.alpha` tensor is written (PEFT files fold it into the factors)


@dataclass
class CanonicalMap:
    """How a checkpoint's keys form the canonical weights: key -> ordered source keys (concatenated on rows)."""

    sources: dict = field(default_factory=dict)

    def add(self, canonical, source, index=0, count=1):
        parts = self.sources.setdefault(canonical, [None] * count)
        if len(parts) != count:
            raise ValueError(f"{canonical}: inconsistent fused part count")
        parts[index] = source


def kohya_name(prefix, module):
    """kohya's flattened module name: `lora_unet_input_blocks_4_1_...`."""
    return f"{prefix}_{module.replace('.', '_')}"


def strip_prefix(key, prefix):
    return key[len(prefix):] if prefix and key.startswith(prefix) else key


def find_prefix(keys, probes):
    """The prefix under which all `probes` occur in `keys`, or None."""
    for prefix in ("",) + MODEL_PREFIXES:
        if all(prefix + probe in keys for probe in probes):
            return prefix
    return None


def match(pattern, key):
    return re.fullmatch(pattern, key)
