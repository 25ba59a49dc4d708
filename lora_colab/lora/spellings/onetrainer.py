"""OneTrainer's spelling: its older default `lora_transformer_` (or `lora_unet_`) + the diffusers module path
flattened, `lora_down` / `lora_up`, `X.alpha`, DoRA as `dora_scale` on the input axis by default; its
DIFFUSERS format (`transformer.` + lora_A/lora_B, alpha folded into lora_B, `lora_magnitude_vector.weight`)
is read the same way. Told by `ot_*` metadata or the `lora_transformer_` prefix."""

from .table import Spelling, share


def detect(layers, metadata, config):
    if share(layers, lambda name: name.startswith("lora_transformer_")) > 0.5:
        return True
    marked = any(key.startswith("ot_") for key in (metadata or {}))
    return marked and share(layers, SPELLING.starts) > 0.5


SPELLING = Spelling(
    "onetrainer", "OneTrainer", clients=("ComfyUI (Flux, SD3: lora_transformer_)", "OneTrainer"),
    prefixes=(("lora_transformer_", "model"), ("transformer.", "model"), ("unet.", "model"),
              ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te3_", "te3"), ("text_encoder.", "te1"),
              ("text_encoder_2.", "te2"), ("text_encoder_3.", "te3")),
    namespace="diffusers", detect=detect)
