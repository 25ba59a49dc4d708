"""ComfyUI's own spelling: `diffusion_model.` and the model's native module path, dotted, `lora_down` /
`lora_up` or `lora_A` / `lora_B`, `X.alpha` where the scale is not 1, `.diff` / `.diff_b` for whole-tensor
changes, DoRA as `dora_scale`. Text encoders keep kohya's `lora_te1_` names."""

from .kohya import KOHYA_PREFIXES
from .table import Spelling, share


def detect(layers, metadata, config):
    return share(layers, lambda name: name.startswith("diffusion_model.")) > 0.5


SPELLING = Spelling(
    "comfy", "ComfyUI (diffusion_model.)", clients=("ComfyUI", "Forge", "diffusers (most DiT families)"),
    prefixes=(("diffusion_model.", "model"),) + KOHYA_PREFIXES[1:], namespace="native", output=True,
    detect=detect)
