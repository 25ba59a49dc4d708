"""Architectures described by tables: module-name templates that map the diffusers layout onto the native
(canonical) one, the default and optional LoRA targets, and how each format names a target.

A template is a module path with `{i}`-style fields for block indices, e.g. `blocks.{i}.self_attn.q`. A
`Rule(native, diffusers, part, parts)` says that the diffusers module is rows part/parts of the native one
(parts > 1: the native weight fuses several diffusers weights, in that order, of equal height).
"""

import re
from dataclasses import dataclass
from functools import lru_cache

from .common import PEFT_SUFFIXES, LoraModule, NativeArchitecture, Target, find_prefix


def swapped_halves(rows):
    """Segments of a weight whose two halves are stored the other way round."""
    return ((rows // 2, rows), (0, rows // 2))


@lru_cache(maxsize=None)
def _compile(template):
    pattern = re.escape(template)
    pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>\\d+)", pattern)
    return re.compile(pattern)


@dataclass(frozen=True)
class Rule:
    """Native module `native` is (or holds, as rows part/parts) the diffusers module `diffusers`."""

    native: str
    diffusers: str
    part: int = 0
    parts: int = 1

    def from_diffusers(self, module):
        hit = _compile(self.diffusers).fullmatch(module)
        return self.native.format(**hit.groupdict()) if hit else None

    def to_diffusers(self, module):
        hit = _compile(self.native).fullmatch(module)
        return self.diffusers.format(**hit.groupdict()) if hit else None


def kohya_not_diffusers(title):
    """The report line for a kohya file of a family whose diffusers loader takes `diffusion_model.` names."""
    return (f"diffusers' {title} loader takes `diffusion_model.` names, not kohya's: this file loads in ComfyUI; "
            f"--format comfy (the auto spelling) loads in both")


def fused(native, diffusers_parts):
    """Rules for a native module that fuses `diffusers_parts` (in row order, equal heights)."""
    return [Rule(native, d, i, len(diffusers_parts)) for i, d in enumerate(diffusers_parts)]


class TableArchitecture(NativeArchitecture):
    """A NativeArchitecture whose layouts, targets and names come from class-level tables."""

    native_probes = ()         # keys (no prefix) that all occur in the native layout
    diffusers_probes = ()      # ... in the diffusers layout
    rules = ()                 # Rule(...) for every module whose diffusers name differs
    default_targets = ()       # native module templates (regex-free, `{i}` fields)
    optional = {}              # group -> (description, [native module templates])
    comfy_peft = False         # the comfy format uses lora_A/lora_B without alpha (what both clients load)
    own_prefixes = ()          # prefixes this family's files carry besides the common ones (Anima's `net.`)
    swapped_in_diffusers = ()  # native module templates whose diffusers weight holds the two halves swapped
    auto_format = "kohya"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.optional_groups = {group: what for group, (what, _) in cls.optional.items()}
        cls._default = [_compile(t) for t in cls.default_targets]
        cls._groups = {group: [_compile(t) for t in templates] for group, (_, templates) in cls.optional.items()}
        cls._swapped = [_compile(t) for t in cls.swapped_in_diffusers]

    # -- layouts ----------------------------------------------------------------------------------
    def detect(self, keys):
        for layout, probes in (("native", self.native_probes), ("diffusers", self.diffusers_probes)):
            if probes:
                prefix = find_prefix(keys, list(probes), self.own_prefixes)
                if prefix is not None:
                    return layout, prefix
        return None

    def from_layout(self, native, layout):
        return self.by_rules(self.rules, native) if layout == "diffusers" else (native, 0, 1)

    @staticmethod
    def by_rules(rules, key):
        """(canonical key, part, parts) of a key that `rules` map from their `diffusers` side (else itself)."""
        module, _, param = key.rpartition(".")
        for rule in rules:
            mapped = rule.from_diffusers(module)
            if mapped is not None:
                return f"{mapped}.{param}", rule.part, rule.parts
        return key, 0, 1

    def row_order(self, key, layout, shape_of):
        if layout == "diffusers" and self._swapped and any(p.fullmatch(key.rpartition(".")[0]) for p in self._swapped):
            return swapped_halves(shape_of(key)[0])
        return None

    # -- targets ----------------------------------------------------------------------------------
    def targets(self, shapes, groups=frozenset(), conv=False, text_encoders=True):
        found = []
        for key, shape in shapes.items():
            if not key.endswith(".weight") or len(shape) != 2:
                continue
            module = key[: -len(".weight")]
            group = self._group_of(module, groups)
            if group is None:
                continue
            found.append(Target(key, module, tuple(shape), splits=self._splits(module, tuple(shape)), group=group))
        return found

    def _group_of(self, module, groups):
        """"" for a default target, the optional group's name when it is asked for, else None."""
        if any(p.fullmatch(module) for p in self._default):
            return ""
        for group in groups:
            if any(p.fullmatch(module) for p in self._groups.get(group, ())):
                return group
        return None

    def _splits(self, module, shape):
        """(diffusers module, first row, end row) of each part a fused native weight is stored as."""
        parts = self._diffusers_parts(module)
        if len(parts) < 2:
            return ()
        heights = self._part_heights(module, shape, len(parts))
        starts = [sum(heights[:i]) for i in range(len(parts) + 1)]
        return tuple((name, starts[i], starts[i + 1]) for i, name in enumerate(parts))

    def _part_heights(self, module, shape, n):
        """Rows of each part of a fused weight: equal heights (a family with other fusions says its own)."""
        return [shape[0] // n] * n

    def _diffusers_parts(self, module):
        """The diffusers modules a native module is stored as, in row order ([itself] when unrenamed)."""
        parts = sorted(((rule.part, rule.to_diffusers(module)) for rule in self.rules
                        if rule.to_diffusers(module) is not None))
        return [name for _, name in parts] or [module]

    def template_names(self, field):
        """Every module name a LoRA of this family may hold, in every spelling, with `field` standing for each
        block index: the native templates of every group, their kohya, comfy and diffusers names."""
        names = set()
        for template in self.default_targets + tuple(t for _, templates in self.optional.values() for t in templates):
            module = re.sub(r"\{\w+\}", field, template)
            target = Target(module + ".weight", module, (3, 3), splits=self._splits(module, (3, 3)))
            names.add(module)
            names.update(m.name for fmt in ("kohya", "comfy", "diffusers") for m in self.lora_modules(target, fmt))
        return names

    # -- output names -----------------------------------------------------------------------------
    def lora_modules(self, target, fmt):
        if fmt == "comfy" and self.comfy_peft:
            return [LoraModule("diffusion_model." + self.comfy_module(target.module), None, PEFT_SUFFIXES, False)]
        return super().lora_modules(target, fmt)

    def diffusers_modules(self, target):
        if target.splits:
            return [LoraModule(f"transformer.{name}", (a, b), PEFT_SUFFIXES, False) for name, a, b in target.splits]
        order = swapped_halves(target.shape[0]) if any(p.fullmatch(target.module) for p in self._swapped) else None
        return [LoraModule("transformer." + self._diffusers_parts(target.module)[0], None, PEFT_SUFFIXES, False,
                           order=order)]
