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
    order: tuple = None  # ((start, stop), ...) of the target's rows in the module's own row order, where the
    #                      module holds them in another order (MiniMax-H3's diffusers MLP halves); None: in order

    @property
    def located_rows(self):
        """The target rows this module patches, as `row_segments` reads them: its order, else its rows."""
        return self.order or self.rows


def row_segments(rows, total):
    """[(start, stop)] of a module's target rows: None (all `total`), (start, stop), or segments in order."""
    if rows is None:
        return [(0, total)]
    if isinstance(rows[0], int):
        return [(rows[0], rows[1])]
    return [(a, b) for a, b in rows]


def row_index(rows, total):
    """A LongTensor of the target rows `rows` (see row_segments), in the module's order."""
    import torch
    return torch.cat([torch.arange(a, b) for a, b in row_segments(rows, total)])


PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass
class CanonicalMap:
    """How a checkpoint's keys form the canonical weights: key -> ordered source keys (concatenated on rows),
    and where the concatenation is not yet in canonical row order, the order: key -> segments (start, stop)
    of the concatenated rows, taken in turn (MiniMax-H3's swapped MLP halves, per-head interleaved qkv)."""

    sources: dict = field(default_factory=dict)
    orders: dict = field(default_factory=dict)

    def add(self, canonical, source, index=0, count=1):
        parts = self.sources.setdefault(canonical, [None] * count)
        if len(parts) != count:
            raise ValueError(f"{canonical}: inconsistent fused part count")
        parts[index] = source

    def assemble(self, key, tensor_of):
        """Canonical tensor `key` from `tensor_of(source key)`: parts concatenated, rows put in order."""
        import torch  # (the family tables load without torch: the CLI's help does)
        parts = [tensor_of(source) for source in self.sources[key]]
        whole = parts[0] if len(parts) == 1 else torch.cat(parts)
        order = self.orders.get(key)
        return whole if order is None else torch.cat([whole[a:b] for a, b in order])

    def disassemble(self, key, tensor, rows_of):
        """{source key: its rows of canonical tensor `key`} (the inverse of `assemble`; `rows_of(source)`)."""
        order = self.orders.get(key)
        if order is not None:
            stored = tensor.new_empty(tensor.shape)
            start = 0
            for a, b in order:
                stored[a:b] = tensor[start:start + b - a]
                start += b - a
            tensor = stored
        out, start = {}, 0
        for source in self.sources[key]:
            rows = rows_of(source)
            out[source] = tensor[start:start + rows]
            start += rows
        return out


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
    diffusers_pipelines = ()     # pipelines whose folders hold this family under another family's class name
    diffusers_model = True       # diffusers has a model of this family (its PEFT spelling has a client)
    default_dtype = "bf16"       # factor dtype when the user gives none
    resolution = "1024x1024"     # modelspec.resolution

    comfy_renames = ()  # (old, new): how ComfyUI's loader renames this family's file keys (its own model's paths)
    unloaded_norms = ()  # 1-D weights of the file that ComfyUI's model has no place for: their patch loads nowhere

    def format_notes(self, fmt, groups):
        """Lines for the report about which clients load `fmt` for this architecture (none by default)."""
        return []

    def comfy_module(self, module):
        """ComfyUI's own path of canonical module `module`, which its LoRA key map knows: the canonical path,
        renamed as ComfyUI renames a checkpoint's keys when it loads one (`comfy_renames`, in its order)."""
        path = module + "."
        for old, new in self.comfy_renames:
            path = path.replace(old, new)
        return path[:-1]

    def diff_module(self, module):
        """The model-local module path under which a 1-D tensor of canonical module `module` (its bias or
        norm scale) is patched, or None when it is not the diffusion model's (or no client has it)."""
        return None if module in self.unloaded_norms else module

    def from_layout(self, native, layout):
        """(canonical key, part index, part count) for a prefix-stripped key of `layout`, or None to skip."""
        return native, 0, 1

    def stored_layout(self, layout, sharded):
        """The layout a detected `layout` is stored in, where the container tells (`sharded`: an index's
        shards); the detected one for most families."""
        return layout

    def other_layouts(self, layout):
        """Layouts with the same keys and shapes as `layout` that a file may really be in (tried on a pair
        whose rows disagree at `pair_probe`)."""
        return []

    def pair_probe(self, shapes):
        """(canonical key, rows) that tells `other_layouts` apart on a pair, or None."""
        return None

    def row_order(self, key, layout, shape_of):
        """Segments (start, stop) of canonical weight `key` as its parts are stored concatenated, in the
        order that makes the canonical rows, or None when stored in order. `shape_of(canonical key)` gives
        the stored (concatenated) shapes."""
        return None

    def canonical_map(self, keys, layout, prefix):
        """The CanonicalMap of a checkpoint's keys (a {key: shape} dict where the arch reorders rows)."""
        cmap = CanonicalMap()
        for key in keys:
            if key.startswith(prefix):
                mapped = self.from_layout(key[len(prefix):], layout)
                if mapped is not None:
                    cmap.add(mapped[0], key, mapped[1], mapped[2])
        shapes = keys if isinstance(keys, dict) else None

        def shape_of(canonical):
            if shapes is None:
                raise ValueError(f"{self.title}: the canonical map needs the checkpoint's shapes")
            parts = [tuple(shapes[s]) for s in cmap.sources[canonical]]
            return (sum(p[0] for p in parts),) + parts[0][1:]
        for key, sources in cmap.sources.items():
            if None not in sources:
                order = self.row_order(key, layout, shape_of)
                if order is not None:
                    cmap.orders[key] = tuple(order)
        return cmap

    def lora_modules(self, target, fmt):
        if fmt == "kohya":
            return [LoraModule(kohya_name("lora_unet", self.comfy_module(target.module)))]
        if fmt == "comfy":
            return [LoraModule("diffusion_model." + self.comfy_module(target.module))]
        return self.diffusers_modules(target)

    def diffusers_modules(self, target):
        return [LoraModule("transformer." + target.module, None, PEFT_SUFFIXES, False)]
