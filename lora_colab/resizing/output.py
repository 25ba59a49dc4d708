"""How a resized or converted LoRA is written: in which spelling (the input's own, or one a client loads),
each layer's tensors (factors in their kernel's shape, `X.alpha` or the scale folded into the factors, the
DoRA magnitude in the spelling's own shape), and the metadata that describes the file as written (kohya's
`ss_*`, diffusers' `lora_adapter_metadata`, a PEFT folder's `adapter_config.json`)."""

import collections
import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import LoraColabError, write_fault
from ..lora import spellings
from ..lora.spellings.adapter_config import CONFIG_NAME, METADATA_KEY, described, write_metadata
from ..lora.spellings.peft import WEIGHTS_NAME
from ..io.temporary import temporary_name
from ..lora.writer import SpillWriter
from .merge import merge_spectra


def factor_shapes(out_shape, k):
    """(down shape, up shape) at rank k of a layer whose weight has `out_shape` (4-D for convolutions)."""
    if len(out_shape) > 2:
        return (k,) + tuple(out_shape[1:]), (out_shape[0], k) + (1,) * (len(out_shape) - 2)
    return (k, out_shape[1]), (out_shape[0], k)


def magnitude_shape(suffix, axis, out_shape):
    """The shape a spelling stores a DoRA magnitude in, or None where it has none for that axis: kohya's and
    LyCORIS's `dora_scale` [out, 1(, 1, 1)] or [1, in(, 1, 1)]; PEFT's `lora_magnitude_vector` [out] (linear)
    or [1, out, 1, 1] (conv), out axis only; ai-toolkit's `magnitude` [out]."""
    conv = len(out_shape) > 2
    if suffix == ".dora_scale":
        if axis == "out":
            return (out_shape[0],) + (1,) * (len(out_shape) - 1)
        return (1, out_shape[1]) + (1,) * (len(out_shape) - 2)
    if axis != "out":
        return None
    if suffix.startswith(".lora_magnitude_vector"):
        return (1, out_shape[0], 1, 1) if conv else (out_shape[0],)
    return (out_shape[0],)


def layer_specs(sp, k, dtype):
    """[(name, dtype, shape)] of one layer written at rank k: down, up, alpha, magnitude."""
    down_shape, up_shape = factor_shapes(sp.out_shape, k)
    specs = [(sp.name + sp.suffixes[0], dtype, down_shape), (sp.name + sp.suffixes[1], dtype, up_shape)]
    if sp.has_alpha:
        specs.append((sp.name + ".alpha", torch.float32, ()))
    if sp.magnitude is not None:
        specs.append((sp.name + sp.magnitude_suffix, dtype, tuple(sp.magnitude_shape)))
    return specs


def common_alpha(spectra, keep):
    """The one alpha every `X.alpha` of a file holds: the most common input alpha/rank × kept rank (kohya's
    convention where ranks are equal), the factors of each module scaled to match. One value, because
    diffusers (0.42) drops the per-module alphas of a kohya SDXL file with mixed ranks (its alpha_pattern keys
    keep the old `processor.to_v_lora` spelling and match nothing: a rank-16 module of a file whose most common
    alpha is 8 comes out at half strength); alpha/rank per module stays right in every client."""
    values = collections.Counter(round(sp.in_scale * idx.numel(), 6) for sp, idx in zip(spectra, keep)
                                 if sp.has_alpha and idx is not None and idx.numel())
    return values.most_common(1)[0][0] if values else None


def layer_tensors(sp, keep, rescale, dtype, alpha=None):
    """{name: tensor} of one layer keeping directions `keep` (a LongTensor): σ split √ to each factor; with an
    `X.alpha` tensor it holds `alpha` (default: the input's alpha/rank × k) and the factors carry the rest,
    without one the factors carry it all."""
    k = keep.numel()
    sigma = rescale * sp.s[keep]
    if sp.has_alpha and alpha is None:
        alpha = sp.in_scale * k
    scale = alpha / k if sp.has_alpha else 1.0
    root = (sigma / scale).clamp_min(0).sqrt()
    factors = (root[:, None] * sp.v[:, keep].T, sp.u[:, keep] * root)  # down, up
    specs = layer_specs(sp, k, dtype)
    tensors = {name: factor.reshape(shape).to(dtype).contiguous()
               for (name, _, shape), factor in zip(specs, factors)}
    if sp.has_alpha:
        tensors[sp.name + ".alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    if sp.magnitude is not None:
        tensors[sp.name + sp.magnitude_suffix] = sp.magnitude.reshape(sp.magnitude_shape).to(dtype).contiguous()
    return tensors


# --- spelling the layers -----------------------------------------------------------------------------

def respell(spectra, source, target, base=None):
    """The spectra named as spelling `target` names them (None or `source`: as read), and a note naming the
    layers it cannot hold (left out). Module paths change through the base checkpoint's map (`base`:
    BaseReferences), else by the spelling rules where they keep the paths; otherwise one line asks for
    the base."""
    if target is None or target == source:
        return spectra, None
    if target.folder:
        _one_model(spectra, source)
    if base is not None:
        return _respell_through(spectra, base, target)
    renamed = []
    for sp in spectra:
        name = spellings.rename(sp.name, source, target)
        if name is None:
            raise LoraColabError(f"{sp.name}: {source.title} names become {target.title} names only through "
                                 f"the base checkpoint's module paths: give the base model as CHECKPOINT (its "
                                 f"header is all that is read)")
        sp.name = name
        sp.suffixes, sp.has_alpha = tuple(target.factors), target.alpha == "tensor"
        renamed.append(sp)
    return _fit_magnitudes(renamed, target)


def _one_model(spectra, source):
    """Refuse, in one line, a LoRA of several model components for a PEFT folder (one model's adapter)."""
    components = {}
    for sp in spectra:
        parsed = source.split(sp.name)
        components.setdefault(parsed[1] if parsed else "model", parsed[0] if parsed else sp.name)
    if len(components) > 1:
        others = ", ".join(prefix.rstrip("._") for comp, prefix in components.items() if comp != "model")
        raise LoraColabError(f"a PEFT folder holds one model's adapter; this LoRA also patches {others}: "
                             f"write --to diffusers (or kohya, comfy)")


def _fit_magnitudes(spectra, target):
    """DoRA magnitudes as `target` writes them; the layers whose magnitude it cannot hold left out."""
    kept, dropped = [], []
    for sp in spectra:
        if sp.magnitude is not None:
            shape = magnitude_shape(target.magnitude, sp.magnitude_axis, sp.out_shape)
            if shape is None:
                dropped.append(sp.name)
                continue
            sp.magnitude_suffix, sp.magnitude_shape = target.magnitude, shape
        kept.append(sp)
    note = (f"{len(dropped)} DoRA layers keep their magnitude per input column, which {target.title} cannot "
            f"hold: left out (first: {dropped[0]}); write kohya or comfy to keep them" if dropped else None)
    return kept, note


def _respell_through(spectra, base, target):
    """Spectra re-spelled through the base's map: each target weight's modules in the target's format
    (fused weights split or joined exactly: a QR core of the concatenated factors)."""
    fmt = "diffusers" if target.name == "peft" else target.name
    merged, note = merge_spectra([(1.0, {sp.name: sp for sp in spectra})], base, fmt)
    if target.name == "peft":
        for sp in merged:
            sp.name = "base_model.model." + sp.name.partition(".")[2]
    fitted, dropped = _fit_magnitudes(merged, target)
    return fitted, "; ".join(n for n in (note, dropped) if n) or None


# --- metadata ----------------------------------------------------------------------------------------

def adapter_metadata(metadata, spectra, keep, spelling, adapters):
    """`metadata` with diffusers' `lora_adapter_metadata` describing the file as written (ranks per module,
    alpha = rank: the factors carry the scale), where the output is diffusers' spelling and the input had
    an adapter config; dropped elsewhere (it would be stale)."""
    meta = {k: v for k, v in metadata.items() if k != METADATA_KEY}
    if spelling.name != "diffusers" or not adapters:
        return meta
    groups = {}
    for sp, idx in zip(spectra, keep):
        if idx is None or not idx.numel():
            continue
        parsed = spelling.split(sp.name)
        prefix, path = (parsed[0].rstrip("."), parsed[2]) if parsed else ("", sp.name)
        groups.setdefault(prefix, {})[path] = idx.numel()
    previous = next(iter(adapters.values()))
    configs = {}
    for prefix, ranks in groups.items():
        dora = any(sp.magnitude is not None for sp in spectra if sp.name.startswith(prefix))
        configs[prefix] = described(adapters.get(prefix, previous), ranks, dora)
    meta[METADATA_KEY] = write_metadata(configs)
    return meta


def peft_config(spectra, keep, adapters):
    """The adapter_config.json of a PEFT folder holding these layers as kept."""
    ranks = {}
    for sp, idx in zip(spectra, keep):
        if idx is not None and idx.numel():
            ranks[sp.name[len("base_model.model."):]] = idx.numel()
    previous = next(iter(adapters.values()), None) if adapters else None
    dora = any(sp.magnitude is not None for sp in spectra)
    return json.dumps(described(previous, ranks, dora), indent=2, sort_keys=True)


def write_file(out, tensors, metadata, protect=()):
    """A safetensors file of `tensors` (name, tensor pairs, one at a time) with kohya's hashes, written
    atomically; returns its size in bytes."""
    writer = SpillWriter(out, protect=protect)
    try:
        for name, tensor in tensors:
            writer.add(name, tensor)
        writer.finish(metadata, kohya_hashes=True)
    finally:
        writer.abort()
    return Path(out).stat().st_size


def write_peft_folder(out, tensors, metadata, config, protect=()):
    """A PEFT `save_pretrained` folder `out` (adapter_model.safetensors and adapter_config.json), written
    beside it under a temporary name and renamed into place whole; returns the weights' size in bytes."""
    out = Path(out)
    for source in protect:
        if out.exists() and Path(os.path.expanduser(str(source))).resolve() == out.resolve():
            raise LoraColabError(f"{out}: output folder is one of the inputs; refusing to overwrite it")
    tmp = temporary_name(out, "tmpdir")
    try:
        tmp.mkdir(parents=True)
        size = write_file(tmp / WEIGHTS_NAME, tensors, metadata)
        (tmp / CONFIG_NAME).write_text(config)
        old = temporary_name(out, "old") if out.exists() else None
        if old is not None:
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return size
    except OSError as exc:
        raise write_fault(out, exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
