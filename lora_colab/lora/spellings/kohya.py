"""kohya's sd-scripts spelling, which A1111, Forge, ComfyUI and LyCORIS also load: `lora_unet_` / `lora_te1_`
and the module path flattened, `lora_down` / `lora_up` with `X.alpha` (scale alpha/rank), DoRA as
`dora_scale`, LyCORIS's LoHa/LoKr tensors under the same names, `ss_*` metadata."""

from .table import Spelling, share

KOHYA_PREFIXES = (("lora_unet_", "model"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te3_", "te3"),
                  ("lora_te_", "te1"))


def detect(layers, metadata, config):
    return share(layers, SPELLING.starts) > 0.5


SPELLING = Spelling(
    "kohya", "kohya (sd-scripts)", clients=("kohya's networks/lora.py", "A1111/Forge", "ComfyUI", "LyCORIS"),
    prefixes=KOHYA_PREFIXES, namespace="native", output=True, detect=detect)
