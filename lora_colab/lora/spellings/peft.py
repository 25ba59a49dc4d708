"""PEFT's `save_pretrained` folder: `adapter_model.safetensors` with `base_model.model.` and the model's
module paths, PEFT's `lora_A` / `lora_B`, and `adapter_config.json` beside it (r, lora_alpha, rslora, rank
and alpha patterns, DoRA as `lora_magnitude_vector`). `PeftModel.from_pretrained` reads it."""

from .table import Spelling, share

WEIGHTS_NAME = "adapter_model.safetensors"


def detect(layers, metadata, config):
    return config is not None or share(layers, SPELLING.starts) > 0.5


SPELLING = Spelling(
    "peft", "PEFT (save_pretrained folder)", clients=("PEFT's PeftModel.from_pretrained",),
    prefixes=(("base_model.model.", "model"),), namespace="diffusers", factors=(".lora_A.weight", ".lora_B.weight"),
    alpha="adapter", magnitude=".lora_magnitude_vector", magnitude_axes=("out",), algorithms=("lora",),
    whole=False, folder=True, output=True, detect=detect)
