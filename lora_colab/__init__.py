"""lora_colab: memory-safe LoRA extraction and resizing for diffusion models."""

__version__ = "0.1.0"

from .errors import CheckpointError, LoraColabError
from .checkpoint import Checkpoint, SafetensorsFile, open_checkpoint
from .writer import SafetensorsWriter, save_file
from .canonical import open_canonical
from .extract import extract
from .report import ExtractReport, LayerReport

__all__ = [
    "__version__",
    "Checkpoint",
    "CheckpointError",
    "LoraColabError",
    "SafetensorsFile",
    "SafetensorsWriter",
    "ExtractReport",
    "LayerReport",
    "extract",
    "open_canonical",
    "open_checkpoint",
    "save_file",
]
