"""Fuzz targets shared by the bounded test run and bench/fuzz.py: each must end in an accepted result or
a LoraColabError, quickly and without large allocations."""

import json
import os
import struct
import tempfile

from lora_colab import LoraColabError, open_checkpoint
from lora_colab.arch.lora_keys import scan_layers
from lora_colab.lora.files import LoraFile


def write(data):
    fd, path = tempfile.mkstemp(suffix=".safetensors")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def parse_bytes(data):
    """Arbitrary bytes as a safetensors file: opened, every tensor read, or a CheckpointError."""
    path = write(data)
    try:
        with open_checkpoint(path) as ckpt:
            for key in ckpt.keys():
                ckpt.read(key)
    except LoraColabError:
        pass
    finally:
        os.unlink(path)


def parse_header(header, data_len):
    """A JSON header of any shape followed by `data_len` zero bytes."""
    raw = json.dumps(header).encode()
    parse_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_len)


def parse_lora(keys):
    """Any set of tensor names as a LoRA file: grouped into layers, each layer's ΔW built, or an error."""
    layers, _ = scan_layers(keys)
    tensors = {k: {"dtype": "F32", "shape": [2, 2], "data_offsets": [16 * i, 16 * i + 16]}
               for i, k in enumerate(keys)}
    raw = json.dumps(tensors).encode()
    path = write(struct.pack("<Q", len(raw)) + raw + b"\0" * (16 * len(keys)))
    try:
        with LoraFile(path) as lora:
            for layer in lora.layers.values():
                try:
                    lora.delta(layer)
                except LoraColabError:
                    pass
                except RuntimeError:  # shapes that do not multiply: must surface as our error instead
                    raise
    except LoraColabError:
        pass
    finally:
        os.unlink(path)
    return layers
