"""lora_colab: memory-safe LoRA extraction and resizing for diffusion models.

Quick start::

    import lora_colab
    report = lora_colab.extract("base.safetensors", "tuned.safetensors", "lora.safetensors", rank=32)
    print(report)                      # per-layer ranks, errors, the file written
    lora_colab.resize("base.safetensors", ["lora.safetensors"], "out/", "spn_ckpt=1,thr=-1.2")

Sources may be paths, URLs or Hub files (`owner/repo:file`), read in place; `lora-colab --help` and the
README list the rest. The public names are imported on first use, so `lora-colab --help` and
`import lora_colab.errors` do not load torch.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "CheckpointError": "errors", "LoraColabError": "errors", "OptionError": "errors", "SourceError": "errors",
    "Checkpoint": "io.checkpoint", "SafetensorsFile": "io.checkpoint", "open_checkpoint": "io.checkpoint",
    "locate": "io.locations",
    "SafetensorsWriter": "writer", "save_file": "writer",
    "open_canonical": "canonical",
    "extract": "extractor",
    "ExtractReport": "report", "LayerReport": "report",
    "ResizeReport": "resizer", "resize": "resizer",
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
