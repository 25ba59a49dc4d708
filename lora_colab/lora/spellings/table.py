"""The table each LoRA spelling fills in, and the rules all spellings share: which model component a name's
prefix stands for, the module path behind it, and the same module's name in another spelling."""

from dataclasses import dataclass, field

# the roles a LoRA module's tensors play, and the suffixes a spelling writes them with
ALPHA_KINDS = ("tensor", "adapter", "folded")


@dataclass(frozen=True)
class Spelling:
    """How one trainer or client spells a LoRA file.

    prefixes: ((prefix, component), ...) in the order names are read; the first prefix of a component is the
    one written. Components: "model" (the UNet or transformer), "te1".."te3" (text encoders). A prefix ending
    in `_` flattens the module path (`.` written as `_`: kohya's `lora_unet_input_blocks_4_1_...`), one ending
    in `.` keeps it dotted; `flat` says which for the empty prefix (bare names).
    namespace: whose module paths the names use: "native" (the model's single-file checkpoint), "diffusers"
    (its diffusers class), or "own" (the trainer's own model classes: names map through a base only).
    factors: the (down, up) suffixes written. alpha: "tensor" (`X.alpha`, scale alpha/rank), "adapter" (PEFT's
    r/lora_alpha in metadata or adapter_config.json), "folded" (no alpha: scale 1, the factors carry it).
    magnitude: the DoRA magnitude suffix written; magnitude_axes: the DoRA conventions it can carry ("out": one
    magnitude per output row, PEFT's; "in": per input column, OneTrainer's default).
    algorithms: the layer kinds its clients load ("lora", "tucker", "loha", "lokr", "diff"); whole: whether
    they load whole-tensor patches (`.diff`, `.diff_b`). folder: written as a `save_pretrained` folder.
    output: a spelling `resize --to` and `convert --to` write. detect(names, metadata, config): whether a
    file is in this spelling (names: its LoRA module names; config: a PEFT adapter_config.json or None).
    """

    name: str
    title: str
    clients: tuple = ()
    prefixes: tuple = ()
    flat: bool = False
    namespace: str = "native"
    factors: tuple = (".lora_down.weight", ".lora_up.weight")
    alpha: str = "tensor"
    magnitude: str = ".dora_scale"
    magnitude_axes: tuple = ("out", "in")
    algorithms: tuple = ("lora", "tucker", "loha", "lokr", "diff")
    whole: bool = True
    folder: bool = False
    output: bool = False
    detect: object = field(default=None, compare=False, repr=False)

    def split(self, name):
        """(prefix, component, module path) of a module name in this spelling, or None."""
        for prefix, component in self.prefixes:
            if name.startswith(prefix) and len(name) > len(prefix):
                return prefix, component, name[len(prefix):]
        return None

    def flattens(self, prefix):
        """Whether module paths behind `prefix` are flattened."""
        return prefix.endswith("_") or (not prefix and self.flat)

    def join(self, component, path, like="", flat=False):
        """This spelling's name for module `path` of `component`, or None where it has no prefix for that
        component or would have to unflatten a `flat` path. `like`: the prefix the name came with, to choose
        between this spelling's prefixes of one component (`unet.` or `transformer.`)."""
        choices = [prefix for prefix, comp in self.prefixes if comp == component]
        token = like.strip("._").rsplit("_", 1)[-1].rsplit(".", 1)[-1] if like else ""
        prefix = (like if like in choices else
                  next((p for p in choices if token and token in p), choices[0] if choices else None))
        if prefix is None or (flat and not self.flattens(prefix)):
            return None
        return prefix + (path.replace(".", "_") if self.flattens(prefix) else path)

    def starts(self, name):
        return self.split(name) is not None


def share(names, test):
    """The fraction of `names` that pass `test` (0 for none)."""
    names = list(names)
    return sum(map(test, names)) / len(names) if names else 0.0


def rename(name, source, target):
    """`name` of spelling `source` as spelling `target` spells it, or None where that takes the base
    checkpoint's module paths (another namespace, or flattened paths to dotted ones)."""
    if source == target:
        return name
    parsed = source.split(name)
    if parsed is None or "own" in (source.namespace, target.namespace) or source.namespace != target.namespace:
        return None
    prefix, component, path = parsed
    return target.join(component, path, like=prefix, flat=source.flattens(prefix))
