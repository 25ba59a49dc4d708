"""lora_colab: memory-safe LoRA extraction and resizing for diffusion models."""

__version__ = "0.1.0"

from .errors import CheckpointError, LoraColabError
from .checkpoint import Checkpoint, SafetensorsFile, open_checkpoint
from .writer import SafetensorsWriter, save_file

__all__ = [
    "__version__",
    "Checkpoint",
    "CheckpointError",
    "LoraColabError",
    "SafetensorsFile",
    "SafetensorsWriter",
    "open_checkpoint",
    "save_file",
]
