"""The shared vocabulary of architectures: targets, layouts and output module names."""

from dataclasses import dataclass, field

# Prefixes checkpoints carry in front of the model's own names, longest first.
MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.", "unet.")


@dataclass(frozen=True)
class Target:
    """One weight that gets a LoRA: its canonical weight key and what the LoRA is written as.

    `key` is the canonical weight key (the arch's native layout, e.g. `layers.0.attention.qkv.weight`);
    `module` the canonical module path; `component` says which model part it belongs to
    ("model", "te1", "te2"); `kind` is "linear" or "conv" (a k×k kernel, k > 1); `conv1x1` marks a 1×1
    convolution (decomposed as a linear, written with 4-D factors); `splits` names the row blocks a fused
    weight is split into when a format needs separate modules, as (name, start, stop).
    """

    key: str
    module: str
    shape: tuple
    component: str = "model"
    kind: str = "linear"
    conv1x1: bool = False
    splits: tuple = ()
    group: str = ""  # optional-target group this belongs to ("adaln", "modulation"...), "" = default


@dataclass(frozen=True)
class LoraModule:
    """A module name as a LoRA file spells it, and which rows of the target's up factor it takes."""

    name: str
    rows: tuple = None  # (start, stop) into the target's output rows; None = all
    factor_suffixes: tuple = (".lora_down.weight", ".lora_up.weight")
    alpha: bool = True  # whether an `.alpha` tensor is written (PEFT files fold it into the factors)


PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass
class CanonicalMap:
    """How a checkpoint's keys form the canonical weights: key -> ordered source keys (concatenated on rows)."""

    sources: dict = field(default_factory=dict)

    def add(self, canonical, source, index=0, count=1):
        parts = self.sources.setdefault(canonical, [None] * count)
        if len(parts) != count:
            raise ValueError(f"{canonical}: inconsistent fused part count")
        parts[index] = source


def kohya_name(prefix, module):
    """kohya's flattened module name: `lora_unet_input_blocks_4_1_...`."""
    return f"{prefix}_{module.replace('.', '_')}"


def find_prefix(keys, probes, extra=()):
    """The prefix under which all `probes` occur in `keys`, or None (`extra`: a family's own prefixes)."""
    for prefix in ("",) + MODEL_PREFIXES + tuple(extra) + tuple(p + e for p in MODEL_PREFIXES for e in extra):
        if all(prefix + probe in keys for probe in probes):
            return prefix
    return None


class NativeArchitecture:
    """An architecture whose canonical names are one checkpoint layout's own (Z-Image single file, Flux BFL,
    generic): kohya and comfy names come straight from the canonical module path; a subclass supplies
    `from_layout` (other layouts -> canonical) and `diffusers_modules`."""

    optional_groups = {}
    diffusers_reads_comfy = False  # diffusers is a client of this architecture's comfy-format files
    exhaustive_layout_map = False  # every diffusers key maps to its native name (not only the targets')
    diffusers_classes = ()       # diffusers classes of this family: a folder naming another goes to the fallback
    default_dtype = "bf16"       # factor dtype when the user gives none
    resolution = "1024x1024"     # modelspec.resolution

    def format_notes(self, fmt, groups):
        """Lines for the report about which clients load `fmt` for this architecture (none by default)."""
        return []

    def diff_module(self, module):
        """The model-local module path under which a 1-D tensor of canonical module `module` (its bias or
        norm scale) is patched, or None when it is not the diffusion model's."""
        return module

    def from_layout(self, native, layout):
        """(canonical key, part index, part count) for a prefix-stripped key of `layout`, or None to skip."""
        return native, 0, 1

    def canonical_map(self, keys, layout, prefix):
        cmap = CanonicalMap()
        for key in keys:
            if key.startswith(prefix):
                mapped = self.from_layout(key[len(prefix):], layout)
                if mapped is not None:
                    cmap.add(mapped[0], key, mapped[1], mapped[2])
        return cmap

    def lora_modules(self, target, fmt):
        if fmt == "kohya":
            return [LoraModule(kohya_name("lora_unet", target.module))]
        if fmt == "comfy":
            return [LoraModule("diffusion_model." + target.module)]
        return self.diffusers_modules(target)

    def diffusers_modules(self, target):
        return [LoraModule("transformer." + target.module, None, PEFT_SUFFIXES, False)]
