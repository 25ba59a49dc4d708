"""The fallback for a diffusers model of any class without a table of its own: a folder whose `config.json`
names the class. Its LoRA is spelled as diffusers names the model's modules (`transformer.<module>`,
lora_A/B: the PEFT spelling the pipeline's own `load_lora_weights` takes), so every model diffusers loads
LoRAs for is supported without new code. Targets are the generic fallback's 2-D weights; where diffusers is
installed, the class is built on the meta device from the config (no memory) and only the layers PEFT
patches as linear or convolution layers are kept (an nn.Embedding takes other factor names).

Given a pipeline's own folder, every component its LoRA loader loads in one call (the transformer, text
encoders, Anima's text conditioner...) is read and written under its prefix, in one file; a component it
loads only from a file of its own (Wan's transformer_2, by `load_into_transformer_2=True`) is named in the
report, to extract from its folder."""

import inspect
from dataclasses import replace
from functools import lru_cache

from .common import PEFT_SUFFIXES, LoraModule
from .generic import Generic


class DiffusersModel(Generic):
    """A Generic architecture named for one diffusers class (`info`: the folder's DiffusersFolder)."""

    auto_format = "diffusers"
    default_dtype = "bf16"

    def __init__(self, info, components=()):
        self.info = info
        self.name = f"diffusers:{info.model_class}"
        self.component = info.component or ("unet" if "UNet" in info.model_class else "transformer")
        self.others = tuple(components)  # components read with the model, every key prefixed by its component
        # the prefix each component's modules are written under: the one the pipeline's loader reads it by
        self.prefixes = {c: loader_prefix(info.pipeline_class, c) or _transformer_name(info.pipeline_class)
                         for c in (self.component,) + self.others}
        self.title = info.describe() + (f" with its {', '.join(self.others)}" if self.others else "")
        self.base_model_version = info.model_class
        self.modelspec_architecture = f"{info.model_class}/lora"
        self._layers = None

    def split(self, module):
        """(component, module path inside it) of a target module."""
        if self.others:
            component, _, inner = module.partition(".")
            return component, inner
        return self.component, module

    def targets(self, shapes, groups=frozenset(), conv=False, text_encoders=True):
        found = super().targets(shapes, groups, conv, text_encoders)
        if self.others:
            found = [replace(t, component=self._role(t.module)) for t in found]
            if not text_encoders:
                found = [t for t in found if not t.component.startswith("text_encoder")]
        layers = self.layer_kinds()
        if layers is None:
            return found
        return [t for t in found if layers.get(t.module, "linear" if self._unbuilt(t.module) else None)
                in ("linear", "conv")]

    def _role(self, module):
        component = self.split(module)[0]
        return "model" if component == self.component else component

    def _unbuilt(self, module):
        """Whether the module's component could not be built to ask (names alone decide there)."""
        return self.others and self.split(module)[0] not in self._built

    def layer_kinds(self):
        """{module: "linear" | "conv" | "other"} of the class(es) built on the meta device from their configs
        (module paths prefixed by component where several are read), or None where none could be built."""
        if self._layers is None:
            self._layers, self._built = {}, set()
            for component in self.prefixes:
                if component == self.component:
                    kinds = _layer_kinds(self.info.model_class, self.info.config)
                else:
                    kinds = _layer_kinds(None, self.info.component_config(component))
                if kinds is None:
                    continue
                self._built.add(component)
                prefix = f"{component}." if self.others else ""
                self._layers.update({prefix + name: kind for name, kind in kinds.items()})
        return self._layers or None

    def diffusers_modules(self, target):
        component, inner = self.split(target.module)
        return [LoraModule(f"{self.prefixes[component]}.{inner}", None, PEFT_SUFFIXES, False)]

    def format_notes(self, fmt, groups):
        info = self.info
        loader = (f"{info.pipeline_class}.load_lora_weights" if info.pipeline_class
                  else f"the load_lora_weights of a diffusers pipeline holding a {info.model_class}")
        if _transformers_model(info):  # a pipeline's text encoder
            return [f"the pipeline's {self.component} ({info.model_class}): the LoRA uses its own module names behind "
                    f"{self.prefixes[self.component]}., which {loader} takes (a file of its own)"]
        if fmt != "diffusers":
            return [f"{info.model_class} has no table here and no client is known to load its {fmt} spelling "
                    f"of diffusers' names: --format diffusers (the auto spelling) loads through {loader}"]
        names = ", ".join(f"{p}.<module>" for p in dict.fromkeys(self.prefixes.values()))
        notes = [f"{info.model_class} has no table here: the LoRA uses diffusers' own module names "
                 f"({names}, lora_A/B), which {loader} takes; ComfyUI and kohya's tools name "
                 f"this model's layers their own way and will not load it"]
        if loader_prefix(info.pipeline_class, self.component) is None:
            notes.append(f"this is the pipeline's {self.component}: load the file with "
                         f"load_lora_weights(..., load_into_{self.component}=True) ({loader} reads it under "
                         f"the {self.prefixes[self.component]}. names)")
        for component in loadable_components(info):
            if loader_prefix(info.pipeline_class, component) is None:
                notes.append(f"the pipeline's {component} is not in this file: {loader} loads it only from a "
                             f"file of its own (load_into_{component}=True); extract it from the {component}/ "
                             f"folders of both pipelines")
        return notes


def _transformers_model(info):
    """Whether the folder holds a transformers model (its config.json names `architectures`, no diffusers class)."""
    return isinstance(info.config, dict) and "_class_name" not in info.config and "architectures" in info.config


def _transformer_name(pipeline_class):
    return getattr(_diffusers_class(pipeline_class), "transformer_name", None) or "transformer"


def _diffusers_class(name):
    try:
        import diffusers
        return getattr(diffusers, name, None) if name else None
    except Exception:  # noqa: BLE001 - not installed (or broken)
        return None


@lru_cache(maxsize=None)  # (it may read the loader's source: once per pipeline class and component)
def loader_prefix(pipeline_class, component):
    """The prefix under which a pipeline's `load_lora_weights` takes `component`'s layers from one file (the
    loader's `<component>_name`, else the component's own name), or None where it loads that component only
    from a file of its own, under the transformer's names (`load_into_transformer_2=True`)."""
    pipeline = _diffusers_class(pipeline_class)
    name = getattr(pipeline, f"{component}_name", None)
    if isinstance(name, str):
        return name
    try:
        routed = f"load_into_{component}" in inspect.signature(pipeline.load_lora_weights).parameters or \
            f"load_into_{component}" in inspect.getsource(pipeline.load_lora_weights)
    except (TypeError, OSError, AttributeError):  # no pipeline class, or its source is not at hand
        routed = False
    return None if routed else component


def loadable_components(info):
    """Components other than `info`'s own that the pipeline's LoRA loader loads (its
    `_lora_loadable_modules`) and that the pipeline folder given holds weights for."""
    pipeline = _diffusers_class(info.pipeline_class)
    if info.pipeline_folder is None or pipeline is None:
        return []
    return [c for c in getattr(pipeline, "_lora_loadable_modules", []) if c != info.component and info.has_weights(c)]


def together(info):
    """The loadable components read and written with `info`'s own, in one file (their loader takes them in the
    same call, by prefix)."""
    return [c for c in loadable_components(info) if loader_prefix(info.pipeline_class, c) is not None]


def _layer_kinds(model_class, config):
    """{module: kind} of a diffusers class (`model_class`) or, without one, of the transformers class a
    component's config names (`architectures`), built on the meta device; None where it cannot be."""
    try:
        import torch
        with torch.device("meta"):
            model = _build(model_class, config or {})
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


def _build(model_class, config):
    import diffusers
    if model_class is not None and hasattr(diffusers, model_class):
        return getattr(diffusers, model_class).from_config({k: v for k, v in config.items() if not k.startswith("_")})
    import transformers
    cls = getattr(transformers, config["architectures"][0])
    return cls(cls.config_class.from_dict(config))


def loader_problem(info):
    """Why diffusers cannot load a LoRA for this folder's model, in a phrase; None where it can (or where
    diffusers is not installed to ask)."""
    try:
        import diffusers
        from diffusers.loaders.lora_base import LoraBaseMixin
    except Exception:  # noqa: BLE001 - not installed (or broken): nothing to ask
        return None
    cls = getattr(diffusers, info.model_class, None)
    pipeline = getattr(diffusers, info.pipeline_class, None) if info.pipeline_class else None
    if _transformers_model(info) and info.component in getattr(pipeline, "_lora_loadable_modules", ()):
        return None  # a transformers model of a pipeline whose loader takes its LoRA (a text encoder)
    if not isinstance(cls, type):
        return (f"its config.json names {info.model_class}, which is no class of diffusers {diffusers.__version__}: "
                f"give a diffusers model or pipeline folder, or the model's single file")
    if not hasattr(cls, "load_lora_adapter"):
        return f"diffusers cannot load a LoRA into a {info.model_class} (the class has no LoRA loader)"
    if isinstance(pipeline, type) and not issubclass(pipeline, LoraBaseMixin):
        return f"its pipeline {info.pipeline_class} has no LoRA loader: diffusers cannot load a LoRA into it"
    return None
