"""diffusers' spelling (`save_lora_weights`, its training scripts): PEFT's `lora_A` / `lora_B` under the
component's name (`transformer.`, `unet.`, `text_encoder.`), each component's PEFT config (r, lora_alpha,
rslora, rank and alpha patterns) in the `lora_adapter_metadata` entry or, without it, scale 1; DoRA as
`lora_magnitude_vector` (one per output row). `load_lora_weights` reads it."""

from .adapter_config import METADATA_KEY
from .table import Spelling, share

DIFFUSERS_PREFIXES = (("transformer.", "model"), ("unet.", "model"), ("text_encoder.", "te1"),
                      ("text_encoder_2.", "te2"), ("text_encoder_3.", "te3"))


def detect(layers, metadata, config):
    return METADATA_KEY in (metadata or {}) or share(layers, SPELLING.starts) > 0.5


SPELLING = Spelling(
    "diffusers", "diffusers / PEFT keys (transformer., unet., text_encoder.)", clients=("diffusers",),
    prefixes=DIFFUSERS_PREFIXES, namespace="diffusers", factors=(".lora_A.weight", ".lora_B.weight"),
    alpha="adapter", magnitude=".lora_magnitude_vector", magnitude_axes=("out",), algorithms=("lora",),
    whole=False, output=True, detect=detect)
