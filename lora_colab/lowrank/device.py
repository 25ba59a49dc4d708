"""Where the low-rank work runs: 'auto' is the GPU when torch can use one, else the CPU."""

import torch

from ..errors import LoraColabError


def resolve_device(device):
    """'auto' -> 'cuda' when a GPU is usable, else 'cpu'."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoraColabError("device 'cuda' asked for, but torch sees no CUDA GPU (use --device cpu)")
    return device
