"""DiffSynth-Studio's spelling: the parameter names of its own model classes, bare (no prefix), with PEFT's
adapter name left in (`X.lora_A.default.weight`), no alpha (scale 1: it trains at lora_alpha = rank unless
told otherwise, and its loader applies 1). ComfyUI reads the `.default` factors."""

from .table import Spelling, share


def detect(layers, metadata, config):
    return share(layers.values(), lambda layer: ".default." in layer.suffixes[0]) > 0.5


SPELLING = Spelling(
    "diffsynth", "DiffSynth-Studio (.lora_A.default.)", clients=("ComfyUI", "DiffSynth-Studio"),
    prefixes=(("", "model"),), namespace="own", factors=(".lora_A.default.weight", ".lora_B.default.weight"),
    alpha="folded", detect=detect)
