"""Changes to biases and 1-D weights (norm scales), which a LoRA's factors cannot carry: written as
ComfyUI's full-difference patches, `<module>.diff_b` (added to the module's bias) and `<module>.diff` (added
to its weight). ComfyUI and Forge load both for every module of every model; diffusers refuses or drops them
(it converts only some `diff_b` of Wan's blocks) and kohya's scripts ignore them, so they are written by
default only in the comfy format of models whose comfy files no other client reads."""

from dataclasses import dataclass

import torch

from ..arch.common import Target
from ..arch.canonical import nonfinite_error
from ..errors import CheckpointError, OptionError

SUFFIXES = {".bias": ".diff_b", ".weight": ".diff"}


@dataclass(frozen=True)
class DiffTarget:
    """One 1-D tensor of the model whose change is written whole."""

    key: str     # canonical key (`layers.0.attention_norm1.weight`, `double_blocks.0.img_attn.qkv.bias`)
    name: str    # the LoRA file's tensor name (`diffusion_model.layers.0.attention_norm1.diff`)
    size: int


def policy(arch, fmt):
    """(written by default, why not) for the bias/norm changes of `arch` in format `fmt`."""
    if fmt == "comfy" and not arch.diffusers_reads_comfy:
        return True, ""
    if fmt == "comfy":
        return False, f"diffusers, which also reads {arch.title} comfy-format files, refuses or drops them"
    if fmt == "kohya":
        return False, "the kohya format's other clients do not load them (diffusers refuses or drops them, " \
                      "kohya's scripts ignore them)"
    return False, "the diffusers (PEFT) format has no place for them"


def choose(arch, fmt, bias_diff):
    """(write them?, a line for the report or ""). `bias_diff`: None = the format's default, True, False."""
    default, why = policy(arch, fmt)
    if bias_diff is None:
        if default:
            return True, ""
        how = "--format comfy" if policy(arch, "comfy")[0] else "--format comfy --bias-diff"
        return False, f"bias and norm changes (if any) left out: {why}; {how} writes them for ComfyUI/Forge"
    if bias_diff and fmt == "diffusers":
        raise OptionError("--bias-diff: the diffusers (PEFT) format has no place for bias and norm changes; "
                          "use --format comfy (ComfyUI, Forge)")
    if bias_diff and not default:
        return True, f"bias and norm changes written as .diff/.diff_b though {why}"
    return bool(bias_diff), ""


def diff_targets(arch, fmt, base, tuned):
    """The biases and 1-D weights of the model in both canonical views, named as `fmt` patches them.

    A tensor that neither layout's map renames keeps its diffusers name in a diffusers-layout view, which no
    native model has: when both views are diffusers layouts (and the map is not exhaustive, as SD's is), only
    the biases of modules the map knows (the targets of every group) are taken."""
    shapes, tuned_shapes = base.shapes(), tuned.shapes()
    known = None
    layouts = (base.detected.layout, tuned.detected.layout)
    if all(layout.startswith("diffusers") for layout in layouts) and not arch.exhaustive_layout_map:
        known = {t.module for t in arch.targets(shapes, groups=set(arch.optional_groups))}
    found = []
    for key, shape in shapes.items():
        param = next((p for p in SUFFIXES if key.endswith(p)), None)
        if len(shape) != 1 or param is None:
            continue
        module = arch.diff_module(key[: -len(param)])
        if module is None or (known is not None and (param != ".bias" or module not in known)):
            continue
        other = tuned_shapes.get(key)
        if other is None:
            continue  # a bias only the base has: nothing to patch it with
        if tuple(other) != tuple(shape):
            raise CheckpointError(tuned.path, f"shape {list(other)} differs from the base's {list(shape)}", key)
        name = arch.lora_modules(Target(module + ".weight", module, (shape[0], 1)), fmt)[0].name
        found.append(DiffTarget(key, name + SUFFIXES[param], shape[0]))
    return found


def changed(arch, base, tuned, min_diff=0.0):
    """How many biases and 1-D weights differ between the two canonical views (by more than `min_diff`)."""
    count = 0
    for target in diff_targets(arch, "comfy", base, tuned):
        delta = tuned.read(target.key) - base.read(target.key)
        if not bool(torch.isfinite(delta).all()) or float(delta.abs().max()) > min_diff:
            count += 1
    return count


def difference(base, tuned, target, scale):
    """scale × (tuned − base) of one 1-D tensor, float32 on the CPU; a non-finite one names its file."""
    delta = tuned.read(target.key) - base.read(target.key)
    if not bool(torch.isfinite(delta).all()):
        raise nonfinite_error(base, tuned, target.key)
    return delta * scale
