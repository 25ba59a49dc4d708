"""ostris' ai-toolkit spelling: diffusers module paths under `transformer.` (or `diffusion_model.`, as
its ComfyUI-facing families save), PEFT's `lora_A` / `lora_B` with no alpha (it trains at alpha = rank:
scale 1), DoRA as `X.magnitude` per output row. Told by its `software` metadata."""

from .table import Spelling


def detect(layers, metadata, config):
    return "ai-toolkit" in str((metadata or {}).get("software", "")).lower()


SPELLING = Spelling(
    "ai-toolkit", "ai-toolkit", clients=("diffusers", "ComfyUI (Flux: transformer.)"),
    prefixes=(("transformer.", "model"), ("diffusion_model.", "model"), ("unet.", "model"),
              ("lora_unet_", "model"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te1")),
    namespace="diffusers", factors=(".lora_A.weight", ".lora_B.weight"), alpha="folded", magnitude=".magnitude",
    magnitude_axes=("out",), detect=detect)
