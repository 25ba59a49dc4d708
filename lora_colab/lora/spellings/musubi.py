"""musubi-tuner's spelling: kohya's grammar (`lora_unet_` + the module path flattened, `lora_down` / `lora_up`,
`X.alpha`), told apart by its network module in the metadata (`ss_network_module: networks.lora_wan`, ...)."""

from .kohya import KOHYA_PREFIXES
from .table import Spelling, share

MUSUBI_MODULES = ("networks.lora_wan", "networks.lora_framepack", "networks.lora_qwen_image", "networks.lora_zimage",
                  "networks.lora_hv_1_5", "networks.lora_flux_2", "networks.lora_kandinsky", "networks.lora_krea2",
                  "networks.lora_ideogram4", "networks.lora_hidream_o1", "networks.loha", "networks.lokr")


def detect(layers, metadata, config):
    module = str((metadata or {}).get("ss_network_module", ""))
    return module.startswith(MUSUBI_MODULES) and share(layers, SPELLING.starts) > 0.5


SPELLING = Spelling(
    "musubi", "musubi-tuner", clients=("ComfyUI (most families)", "diffusers (Wan, Qwen-Image)"),
    prefixes=KOHYA_PREFIXES, namespace="native", detect=detect)
