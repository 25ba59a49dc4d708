"""Several LoRAs as one: Σ weight·ΔW layer by layer (by the base checkpoint's map, whatever each LoRA's
spelling, or by name), refactored exactly (QR core) without the directions that cancel."""

import torch

from ..arch.common import row_index
from .spectrum import Spectrum, qr_core


def reweight(sp, weight):
    """Scale a spectrum by a merge weight (a negative weight flips the left vectors)."""
    if weight != 1.0:
        sp.s = sp.s * abs(weight)
        if weight < 0:
            sp.u = -sp.u


def _spelling_key(name):
    """A module name with kohya's and ComfyUI's spellings made equal (used when no base is given)."""
    if name.startswith("diffusion_model."):
        name = "lora_unet_" + name[len("diffusion_model."):]
    return name.replace(".", "_")


def merge_spectra(loaded, base, fmt=None):
    """Σ weight·ΔW over LoRAs [(weight, {name: Spectrum})], layer by canonical module.

    With a base checkpoint every module name (kohya, ComfyUI, PEFT, musubi; fused or split) is mapped to
    the base weight and rows it patches, so one module spelled three ways is one layer; the result is
    spelled as the first LoRA is (or in `fmt`: "kohya", "comfy", "diffusers"). Without a base, layers are
    matched by name (kohya = ComfyUI spelling). A DoRA magnitude goes with a layer that is its module's
    only part and is written whole. Returns (spectra, a note or None).
    """
    if base is None:
        return _merge_by_name(loaded)
    fmt = fmt or base.format_of(loaded[0][1])
    groups, unplaced = {}, []
    for weight, spectra in loaded:
        for name, sp in spectra.items():
            found = base.locate(name)
            if found is None:
                unplaced.append((weight, sp))
                continue
            groups.setdefault(found[0], []).append((weight, sp, found[1]))
    merged = []
    for key, parts in groups.items():
        target = base.targets[key]
        rows_total = target.shape[0]
        ups, downs, old_rank = [], [], 0
        scale = _top((weight, sp) for weight, sp, _ in parts)
        for weight, sp, rows in parts:
            up = torch.zeros(rows_total, sp.s.numel(), dtype=sp.u.dtype)
            up[row_index(rows, rows_total)] = sp.u * (weight * sp.s)
            ups.append(up)
            downs.append(sp.v.T)
            old_rank += sp.old_rank or sp.s.numel()
        up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
        for module in base.arch.lora_modules(target, fmt):
            index = row_index(module.located_rows, rows_total)
            sp = _refactor(module.name, up[index], down, (index.numel(),) + tuple(target.shape[1:]), old_rank,
                           module.alpha, module.factor_suffixes, scale)
            if sp is not None:
                if len(parts) == 1 and parts[0][2] is None and index.numel() == rows_total:
                    _carry_magnitude(parts[0][1], sp)
                merged.append(sp)
    if not unplaced:
        return merged, None
    rest, _ = _merge_by_name([(weight, {sp.name: sp}) for weight, sp in unplaced])
    return merged + rest, (f"{len(unplaced)} layers of the merged LoRAs patch no weight of the base "
                           f"{base.describe()} (first: {unplaced[0][1].name}); they were matched by name only")


def _merge_by_name(loaded):
    groups, order = {}, []
    for weight, spectra in loaded:
        for name, sp in spectra.items():
            key = _spelling_key(name)
            if key not in groups:
                order.append(key)
            groups.setdefault(key, []).append((weight, sp))
    merged = []
    for key in order:
        parts = groups[key]
        first = parts[0][1]
        up = torch.cat([sp.u * (weight * sp.s) for weight, sp in parts], dim=1)
        down = torch.cat([sp.v.T for _, sp in parts], dim=0)
        old_rank = sum(sp.old_rank or sp.s.numel() for _, sp in parts)
        sp = _refactor(first.name, up, down, first.out_shape, old_rank, True, first.suffixes, _top(parts))
        if sp is not None:
            if len(parts) == 1:
                _carry_magnitude(first, sp)
            merged.append(sp)
    partial = sum(len(parts) < len(loaded) for parts in groups.values())
    note = (f"{partial} layers are in only some of the merged LoRAs; without the base checkpoint layers are "
            f"matched by name, so LoRAs spelled differently (ComfyUI/kohya vs diffusers) are not combined: give "
            f"the base checkpoint" if partial and len(loaded) > 1 else None)
    return merged, note


def _carry_magnitude(source, sp):
    """Give a refactored layer the DoRA magnitude of the one layer it was made from."""
    for name in ("magnitude", "magnitude_axis", "magnitude_suffix", "magnitude_shape"):
        setattr(sp, name, getattr(source, name))


def _top(parts):
    """The largest weighted σ among merge contributions [(weight, Spectrum)]."""
    return max((abs(weight) * float(sp.s[:1].sum()) for weight, sp in parts), default=0.0)


def _refactor(name, up, down, out_shape, old_rank, has_alpha, suffixes, scale):
    """A Spectrum of up @ down (QR core) without the directions below float32 rounding of `scale` (the
    largest σ that went in), or None when nothing is left (contributions that cancel)."""
    u, s, v = qr_core(up, down)
    keep = s > scale * 1e-5
    if not bool(keep.any()):
        return None
    return Spectrum(name, "lora", u[:, keep], s[keep], v[:, keep], tuple(out_shape), old_rank, has_alpha, 1.0,
                    tuple(suffixes))
