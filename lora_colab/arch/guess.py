"""Which family a LoRA file was made for, from its metadata or its module names."""

import re
from functools import lru_cache

_FIELD = "987654321"  # stands for a block index in a family's templates
# what trainers put in front of a model's own module names (dotted first, then flattened)
_PREFIX = re.compile(r"^(?:(?:base_model\.model|diffusion_model|transformer|model|unet)\.)+|^(?:lora_unet|lora_transformer|lycoris)_")


def _bare(name):
    """A LoRA module name without a trainer's prefix, flattened (`.` as `_`)."""
    return _PREFIX.sub("", name).replace(".", "_")


@lru_cache(maxsize=None)
def _names_pattern(arch):
    """One regex that matches, whole, a bare LoRA module name of a table family's targets in any spelling."""
    tails = sorted({_bare(name) for name in arch.template_names(_FIELD)})
    return re.compile("|".join(re.escape(t).replace(_FIELD, r"\d+") for t in tails))


def _matches(arch, bare_names):
    """How many of the LoRA's modules name one of `arch`'s targets (a family without tables: its hint)."""
    if hasattr(arch, "template_names"):
        pattern = _names_pattern(arch)
        return sum(bool(pattern.fullmatch(name)) for name in bare_names)
    return sum(bool(arch.lora_hint.search(name)) for name in bare_names)


def _named_in(architectures, metadata):
    """The family the metadata (`modelspec.architecture`, `ss_base_model_version`) names: the longest tag found
    wins (`wan_animate2` is Wan-Animate 2's, though it holds Wan's `wan_`); None if none does."""
    said = " ".join(str(metadata.get(k, "")) for k in ("modelspec.architecture", "ss_base_model_version")).lower()
    if not said.strip():
        return None
    found = [(max((len(tag) for tag in arch.metadata_tags if tag in said), default=0), arch) for arch in architectures]
    length, arch = max(found, key=lambda pair: pair[0], default=(0, None))
    return arch if length else None


def guess_family(architectures, names, metadata=None):
    """Title of the one of `architectures` a LoRA was made for, from its metadata or its module names ("unknown").

    Metadata wins when it names a family. Otherwise each module name, without its trainer's prefix and flattened,
    is matched whole against every name a family's targets have in any spelling (a family without tables: its
    `lora_hint`); the family matching most modules is the guess, families that match as many are named with it
    ("Anima / Cosmos Predict 2.5": their names are the same)."""
    architectures = list(architectures)
    named = _named_in(architectures, metadata or {})
    if named is not None:
        return named.title
    bare_names = [_bare(name) for name in names]
    counts = {arch.title: _matches(arch, bare_names) for arch in architectures}
    best = max(counts.values(), default=0)
    return " / ".join(title for title, count in counts.items() if count == best) if best else "unknown"
