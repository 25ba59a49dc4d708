"""The fallback for a diffusers model of any class without a table of its own: a folder whose `config.json`
names the class. Its LoRA is spelled as diffusers names the model's modules (`transformer.<module>`,
lora_A/B: the PEFT spelling the pipeline's own `load_lora_weights` takes), so every model diffusers loads
LoRAs for is supported without new code. Targets are the generic fallback's 2-D weights; where diffusers is
installed, the class is built on the meta device from the config (no memory) and only the layers PEFT
patches as linear or convolution layers are kept (an nn.Embedding takes other factor names)."""

from .common import PEFT_SUFFIXES, LoraModule
from .generic import Generic


class DiffusersModel(Generic):
    """A Generic architecture named for one diffusers class (`info`: the folder's DiffusersFolder)."""

    auto_format = "diffusers"
    default_dtype = "bf16"

    def __init__(self, info):
        self.info = info
        self.name = f"diffusers:{info.model_class}"
        self.title = info.describe()
        self.base_model_version = info.model_class
        self.modelspec_architecture = f"{info.model_class}/lora"
        self.component = info.component or ("unet" if "UNet" in info.model_class else "transformer")
        self._layers = None

    def targets(self, shapes, groups=frozenset(), conv=False, text_encoders=True):
        found = super().targets(shapes, groups, conv, text_encoders)
        layers = self.layer_kinds()
        if layers is None:
            return found
        return [t for t in found if layers.get(t.module) in ("linear", "conv")]

    def layer_kinds(self):
        """{module: "linear" | "conv" | "other"} of the class built on the meta device from its config, or
        None where diffusers (or the class, or its config) is not at hand."""
        if self._layers is None:
            self._layers = _layer_kinds(self.info) or {}
        return self._layers or None

    def diffusers_modules(self, target):
        return [LoraModule(f"{self.component}.{target.module}", None, PEFT_SUFFIXES, False)]

    def format_notes(self, fmt, groups):
        loader = (f"{self.info.pipeline_class}.load_lora_weights" if self.info.pipeline_class
                  else f"the load_lora_weights of a diffusers pipeline holding a {self.info.model_class}")
        if fmt == "diffusers":
            return [f"{self.info.model_class} has no table here: the LoRA uses diffusers' own module names "
                    f"({self.component}.<module>, lora_A/B), which {loader} takes; ComfyUI and kohya's tools name "
                    f"this model's layers their own way and will not load it"]
        return [f"{self.info.model_class} has no table here and no client is known to load its {fmt} spelling "
                f"of diffusers' names: --format diffusers (the auto spelling) loads through {loader}"]


def _layer_kinds(info):
    try:
        import torch
        import diffusers
        cls = getattr(diffusers, info.model_class)
        config = {k: v for k, v in (info.config or {}).items() if not k.startswith("_")}
        with torch.device("meta"):
            model = cls.from_config(config)
    except Exception:  # noqa: BLE001 - no diffusers, an unknown class or a config it refuses: names decide
        return None
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            kinds[name] = "linear"
        elif isinstance(module, torch.nn.Conv2d) and type(module) is torch.nn.Conv2d:
            kinds[name] = "conv"
        elif name:
            kinds[name] = "other"
    return kinds


def loader_problem(info):
    """Why diffusers cannot load a LoRA for this folder's model, in a phrase; None where it can (or where
    diffusers is not installed to ask)."""
    try:
        import diffusers
        from diffusers.loaders.lora_base import LoraBaseMixin
    except Exception:  # noqa: BLE001 - not installed (or broken): nothing to ask
        return None
    cls = getattr(diffusers, info.model_class, None)
    if not isinstance(cls, type):
        return (f"its config.json names {info.model_class}, which is no class of diffusers {diffusers.__version__}: "
                f"give a diffusers model or pipeline folder, or the model's single file")
    if not hasattr(cls, "load_lora_adapter"):
        return f"diffusers cannot load a LoRA into a {info.model_class} (the class has no LoRA loader)"
    pipeline = getattr(diffusers, info.pipeline_class, None) if info.pipeline_class else None
    if isinstance(pipeline, type) and not issubclass(pipeline, LoraBaseMixin):
        return f"its pipeline {info.pipeline_class} has no LoRA loader: diffusers cannot load a LoRA into it"
    return None
