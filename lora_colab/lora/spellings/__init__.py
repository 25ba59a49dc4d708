"""LoRA spellings: how each trainer and client names a LoRA's tensors and carries its scale, one mostly-table
module each (kohya, musubi-tuner, LyCORIS, OneTrainer, ComfyUI, ai-toolkit, DiffSynth-Studio, diffusers and
its pre-PEFT spelling, PEFT folders, bare names); `adapter_config` holds PEFT's scale rules. `detect` tells a
file's spelling, `get` names an output spelling. Imports only the shared errors."""

from . import (ai_toolkit, bare, comfy, diffsynth, diffusers, diffusers_legacy, kohya, lycoris, musubi,
               onetrainer, peft)
from .table import Spelling, rename

# detection order: what a file's metadata or config names first, then what its names look like
DETECTION = tuple(m.SPELLING for m in (peft, ai_toolkit, onetrainer, musubi, diffsynth, diffusers_legacy,
                                       lycoris, kohya, comfy, diffusers, bare))
SPELLINGS = {spelling.name: spelling for spelling in DETECTION}
OUTPUTS = tuple(s.name for s in DETECTION if s.output)


def detect(layers, metadata=None, config=None):
    """The Spelling of a LoRA file: `layers` {module name: LoraLayer}, its metadata, its PEFT config (a
    `save_pretrained` folder's adapter_config.json) or None."""
    for spelling in DETECTION:
        if spelling is diffusers.SPELLING and not layers:
            continue
        if spelling.detect(layers, metadata or {}, config):
            return spelling
    return bare.SPELLING


def get(name):
    """The output Spelling called `name` (one of OUTPUTS)."""
    from ...errors import OptionError
    spelling = SPELLINGS.get(name)
    if spelling is None or not spelling.output:
        raise OptionError(f"unknown LoRA spelling {name!r}: choose one of {', '.join(OUTPUTS)}")
    return spelling


def plain_names(name):
    """Other names a client may give the module `name` patches (pre-PEFT processor names)."""
    plain = diffusers_legacy.plain_name(name)
    return [plain] if plain else []


__all__ = ["DETECTION", "OUTPUTS", "SPELLINGS", "Spelling", "detect", "get", "plain_names", "rename"]
