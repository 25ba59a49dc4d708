"""Architectures: one mostly-table module per model family (detection, canonical key maps, LoRA targets and
output names), and `canonical`: a checkpoint seen through its family's map, whatever its layout. The
family modules import nothing but each other and errors; `canonical` reads through io."""

from dataclasses import dataclass

from ..errors import OptionError
from .ace_step15 import AceStep15
from .anima import Anima
from .chroma import Chroma
from .cosmos import CosmosPredict25
from .common import MODEL_PREFIXES, LoraModule, Target
from .ernie_image import ErnieImage
from .flux import Flux
from .flux2 import Flux2
from .flux3 import Flux3
from .generic import Generic
from .guess import guess_family
from .hidream import HiDream
from .hidream_o1 import HiDreamO1
from .hunyuan_video15 import HunyuanVideo15
from .ideogram4 import Ideogram4
from .kandinsky5 import Kandinsky5
from .krea2 import Krea2
from .ltx2 import LTX2
from .lumina2 import Lumina2
from .minimax_h3 import MiniMaxH3
from .qwen_image import QwenImage, QwenImage21
from .sd3 import SD3
from .stable_diffusion import SD15, SDXL, sgm_to_diffusers
from .wan import Wan
from .wan_animate2 import WanAnimate2
from .zimage import ZImage

# Detection order matters where layouts share names: FLUX.2 and Chroma reuse Flux.1's block names, Lumina 2
# and Ideogram 4 Z-Image's, HunyuanVideo 1.5's diffusers names SD3's, Cosmos Predict 2.5 Anima's DiT.
ARCHITECTURES = {arch.name: arch for arch in (SDXL(), SD15(), Lumina2(), Ideogram4(), ZImage(), Flux3(), Flux2(), Chroma(), Flux(), QwenImage21(),
                                               QwenImage(), Wan(), WanAnimate2(), Krea2(), LTX2(), HunyuanVideo15(), SD3(), HiDream(),
                                               ErnieImage(), Kandinsky5(), CosmosPredict25(), Anima(),
                                               MiniMaxH3(), AceStep15(), HiDreamO1())}
GENERIC = Generic()
FORMATS = ("auto", "kohya", "comfy", "diffusers")


@dataclass(frozen=True)
class Detected:
    """What a checkpoint holds: its architecture object, layout name and the prefix of its model keys."""

    arch: object
    layout: str
    prefix: str

    def describe(self):
        prefix = f", prefix {self.prefix!r}" if self.prefix else ""
        return f"{self.arch.title} ({self.layout}{prefix})"


def detect(keys):
    """Detect architecture and layout from a checkpoint's key names (generic when nothing matches)."""
    keyset = keys if isinstance(keys, (set, frozenset, dict)) else set(keys)
    for arch in ARCHITECTURES.values():
        found = arch.detect(keyset)
        if found:
            return Detected(arch, *found)
    return Detected(GENERIC, *GENERIC.detect(keyset))


def guess_lora_arch(names, metadata=None):
    """Title of the architecture a LoRA was made for, from its metadata or its module names ("unknown")."""
    return guess_family(ARCHITECTURES.values(), names, metadata)


def get(name):
    """The architecture object called `name` ('sdxl', 'sd15', 'zimage', 'flux', 'generic')."""
    if name == "generic":
        return GENERIC
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise OptionError(f"unknown architecture {name!r}: choose one of "
                         f"{', '.join(list(ARCHITECTURES) + ['generic'])}") from None


FORMAT_ALIASES = {"peft": "diffusers"}  # the diffusers spelling is PEFT's lora_A/lora_B


def resolve_format(arch, fmt):
    """The concrete output format for `fmt` ('auto' picks what loads in the most clients for `arch`)."""
    fmt = FORMAT_ALIASES.get(fmt, fmt)
    if fmt not in FORMATS:
        raise OptionError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)} (peft = diffusers)")
    if fmt == "diffusers" and not arch.diffusers_model:
        raise OptionError(f"{arch.title} has no diffusers model to load a LoRA into: use --format comfy or kohya, "
                          f"which ComfyUI loads")
    return arch.auto_format if fmt == "auto" else fmt


__all__ = ["ARCHITECTURES", "FORMATS", "GENERIC", "Detected", "LoraModule", "MODEL_PREFIXES", "Target",
           "detect", "get", "guess_lora_arch", "resolve_format", "sgm_to_diffusers"]
