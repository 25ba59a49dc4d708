"""The resizer's journal: each LoRA layer's decomposition and its base references (the base checkpoint's
norms, the subspace terms: what costs reading the base) are kept as they are computed, beside the outputs,
so a resize started again after an interruption takes them back instead of reading the base again.
The journal does not depend on the recipes: any recipes resume from it."""

import zlib

import torch

from ..lora.journal import Journal, identity_of
from .inputs import file_stem
from .spectrum import Spectrum

_SPECTRUM_FIELDS = ("name", "kind", "out_shape", "old_rank", "has_alpha", "in_scale", "suffixes", "magnitude_axis",
                    "magnitude_suffix", "magnitude_shape")


def open_journal(folder, lora, loras, base, restart=False):
    """The journal of one LoraInput (`loras`: its open LoraFiles with their merge weights) resized against
    `base` (BaseReferences or None), at `folder/STEM.resize.journal` (a merge's stem: `merged-` and a hash of
    the argument as given)."""
    identity = {"run": "resize", "version": 2,
                "loras": [[identity_of(lora.ckpt.sources), weight] for lora, weight in loras],
                "base": base.identity if base is not None else None}
    stem = f"merged-{zlib.crc32(lora.text.encode()):08x}" if lora.merged else file_stem(lora.first)
    return Journal(folder / f"{stem}.resize", identity, restart=restart)


def decomposed(journal, part, name):
    """A layer's Spectrum decomposed by an interrupted run (None when it was not)."""
    key = f"d{part}:{name}"
    info = journal.done.get(key) if journal is not None else None
    if info is None:
        return None
    fields = {k: info[k] for k in _SPECTRUM_FIELDS}
    fields["out_shape"], fields["suffixes"] = tuple(fields["out_shape"]), tuple(fields["suffixes"])
    if fields["magnitude_shape"] is not None:
        fields["magnitude_shape"] = tuple(fields["magnitude_shape"])
        fields["magnitude"] = journal.read_scratch(key + ".m")
    return Spectrum(u=journal.read_scratch(key + ".u"), s=journal.read_scratch(key + ".s"),
                    v=journal.read_scratch(key + ".v"), **fields)


def keep_decomposed(journal, part, sp):
    if journal is None:
        return
    key = f"d{part}:{sp.name}"
    for what in ("u", "s", "v"):
        journal.add_scratch(f"{key}.{what}", getattr(sp, what).contiguous())
    if sp.magnitude is not None:
        journal.add_scratch(f"{key}.m", sp.magnitude.contiguous())
    journal.commit(key, {k: getattr(sp, k) for k in _SPECTRUM_FIELDS})


def _rows(rows):
    """A module's rows back from JSON: None, (start, stop) or ((start, stop), ...) segments."""
    if rows is None:
        return None
    return tuple(rows) if isinstance(rows[0], int) else tuple(tuple(seg) for seg in rows)


def references(journal, sp):
    """Take back a spectrum's base references from the journal; False when it holds none for it."""
    key = f"r:{sp.name}"
    info = journal.done.get(key) if journal is not None else None
    if info is None:
        return False
    sp.base = None if info["base"] is None else (info["base"][0], _rows(info["base"][1]))
    sp.refs.update(info["refs"])
    if info.get("subspace"):
        sp.refs["subspace"] = journal.read_scratch(key + ".subspace")
    return True


def keep_references(journal, sp):
    if journal is None:
        return
    key = f"r:{sp.name}"
    subspace = sp.refs.get("subspace")
    if isinstance(subspace, torch.Tensor):
        journal.add_scratch(key + ".subspace", subspace.contiguous())
    journal.commit(key, {"base": None if sp.base is None else [sp.base[0], sp.base[1]],
                         "refs": {k: v for k, v in sp.refs.items() if k != "subspace"},
                         "subspace": isinstance(subspace, torch.Tensor)})
