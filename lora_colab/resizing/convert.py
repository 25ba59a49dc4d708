"""Converting a LoRA to the spelling a client loads: every layer read with its trainer's own scale and
written whole (every direction kept, exact to float rounding) in kohya's, ComfyUI's, diffusers' or a PEFT
folder's spelling; module paths that differ between spellings change through the base checkpoint's map."""

from ..lowrank.recipes import keep_all
from .resizer import resize


def convert(checkpoint, loras, to, output_folder=None, dtype=None, device="auto", progress=True, token=None,
            resume=True, restart=False):
    """Write each LoRA in spelling `to` ("kohya", "comfy", "diffusers", "peft"); returns a ResizeReport per
    LoRA (its `warnings` name what the target cannot load, left out).

    checkpoint: the base model, needed where the module paths change (kohya's flattened names to dotted
    ones, a model's native names to diffusers' and back; fused q/k/v split or joined exactly), else None.
    Outputs are `STEM_SPELLING.safetensors` (a folder for "peft") in `output_folder`, else beside each LoRA.
    """
    return resize(checkpoint, loras, output_folder, [keep_all()], dtype=dtype, device=device, progress=progress,
                  token=token, resume=resume, restart=restart, to=to)
