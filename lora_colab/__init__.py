"""lora_colab: memory-safe LoRA extraction and resizing for diffusion models.

Quick start::

    import lora_colab
    report = lora_colab.extract("base.safetensors", "tuned.safetensors", "lora.safetensors", rank=32)
    print(report)                      # per-layer ranks, errors, the file written
    lora_colab.resize("base.safetensors", ["lora.safetensors"], "out/", "spn_ckpt=1,thr=-1.2")
    lora_colab.convert("base.safetensors", ["lora.safetensors"], "diffusers")  # the spelling a client loads

Sources may be paths, URLs or Hub files (`owner/repo:file`), read in place; `lora-colab --help` and the
README list the rest. The public names are imported on first use, so `lora-colab --help` and
`import lora_colab.errors` do not load torch.

The rooms, in the order data flows: `io` (byte sources, containers, dequantization) -> `arch` (model
families as tables, the canonical view of a checkpoint) -> `lowrank` (factorisation, scoring, recipes) ->
`extraction` and `resizing` -> `lora` (formats, readers, writers, journals); `notebook` is the face the
notebooks call; at the root only what every room shares (errors, dtypes, memory, progress, configs, the CLI).
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "CheckpointError": "errors", "LoraColabError": "errors", "OptionError": "errors", "SourceError": "errors",
    "Checkpoint": "io.checkpoint", "SafetensorsFile": "io.checkpoint", "open_checkpoint": "io.opener",
    "locate": "io.locations",
    "SafetensorsWriter": "lora.writer", "save_file": "lora.writer",
    "open_canonical": "arch.canonical",
    "extract": "extraction.extractor",
    "ExtractReport": "extraction.report", "LayerReport": "extraction.report",
    "ResizeReport": "resizing.resizer", "resize": "resizing.resizer", "convert": "resizing.convert",
}

__all__ = ["__version__"] + sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lora_colab' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
