"""Where the low-rank work runs: 'auto' is the GPU when torch can use one, else the CPU."""

import torch

from ..errors import LoraColabError, OptionError

DEVICES = "cpu, cuda (or cuda:N) or auto"


def resolve_device(device):
    """'auto' -> 'cuda' when a GPU is usable, else 'cpu'; 'cpu', 'cuda', 'cuda:N' as given. Any other device
    (tpu, mps, xla, meta, ...) is one line before any file is touched: the factorisations run on these two."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise OptionError(f"unknown device {device!r}: use {DEVICES}") from None
    if device.type not in ("cpu", "cuda"):
        raise OptionError(f"device {device.type!r} is not supported: use {DEVICES}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoraColabError("device 'cuda' asked for, but torch sees no CUDA GPU (use --device cpu)")
    return device
