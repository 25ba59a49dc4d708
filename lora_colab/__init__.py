"""lora_colab: memory-safe LoRA extraction and resizing for diffusion models."""

__version__ = "0.1.0"

from .errors import CheckpointError, LoraColabError
from .checkpoint import Checkpoint, SafetensorsFile, open_checkpoint
from .writer import SafetensorsWriter, save_file
from .canonical import open_canonical
from .extractor import extract
from .report import ExtractReport, LayerReport
from .resizer import ResizeReport, resize

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
    "ResizeReport",
    "open_canonical",
    "resize",
    "open_checkpoint",
    "save_file",
]
