"""diffusers' older spelling (training scripts before PEFT, `convert_state_dict_to_diffusers`): text encoder
modules as `text_encoder.<path>.lora_linear_layer.down/up.weight`, UNet attention processors as
`unet.<path>.processor.to_q_lora.down.weight`; no alpha (scale 1). diffusers still loads it."""

from .diffusers import DIFFUSERS_PREFIXES
from .table import Spelling, share

LEGACY_SUFFIXES = (".lora_linear_layer.down.weight", "_lora.down.weight", ".lora.down.weight")


def detect(layers, metadata, config):
    return share(layers.values(), lambda layer: layer.suffixes[0] in LEGACY_SUFFIXES) > 0.5


SPELLING = Spelling(
    "diffusers-legacy", "diffusers, pre-PEFT (lora_linear_layer, processor.*_lora)", clients=("diffusers",),
    prefixes=DIFFUSERS_PREFIXES, namespace="diffusers",
    factors=(".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"), alpha="folded",
    magnitude_axes=(), algorithms=("lora",), whole=False, detect=detect)


def plain_name(name):
    """The module a pre-PEFT attention-processor name patches (`attn1.processor.to_q` -> `attn1.to_q`,
    `processor.to_out` -> `to_out.0`), or None for other names."""
    if ".processor." not in name:
        return None
    head, _, proj = name.partition(".processor.")
    return f"{head}.{proj}.0" if proj == "to_out" else f"{head}.{proj}"
