"""LyCORIS's own wrapper spelling (also SimpleTuner's and ai-toolkit's older LoKr files): `lycoris_` and the
diffusers module path flattened, with LyCORIS's tensors (`lora_down`/`lora_up`/`lora_mid`, `hada_*`,
`lokr_*`) and `X.alpha`."""

from .table import Spelling, share


def detect(layers, metadata, config):
    return share(layers, SPELLING.starts) > 0.5


SPELLING = Spelling(
    "lycoris", "LyCORIS (lycoris_)", clients=("LyCORIS", "ComfyUI"),
    prefixes=(("lycoris_", "model"),), namespace="diffusers", detect=detect)
