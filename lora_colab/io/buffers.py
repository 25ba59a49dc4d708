"""Memory for tensor bytes: uninitialised huge-page CPU buffers and writable views of tensors."""

import ctypes
import sys

import torch

_HUGE = 2 << 20
_MADV_HUGEPAGE = 14


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


_MADVISE = _load_madvise()


def empty_bytes(nbytes):
    """An uninitialised uint8 CPU tensor; large ones ask Linux for huge pages, which makes first-touch
    page faults (the main cost of reading into fresh memory) several times cheaper."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if _MADVISE is not None and nbytes >= 4 * _HUGE:
        start = (buf.data_ptr() + _HUGE - 1) & ~(_HUGE - 1)
        length = (buf.data_ptr() + nbytes - start) & ~(_HUGE - 1)
        _MADVISE(start, length, _MADV_HUGEPAGE)  # advisory: failure just means normal pages
    return buf


def byte_view(tensor):
    """A writable memoryview over a contiguous CPU tensor's bytes (no numpy needed). The view keeps the
    tensor alive: `byte_view(x.cpu())` of a GPU tensor stays valid after the temporary copy's last name."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("byte_view needs a contiguous CPU tensor")
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray(0))
    array = (ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())
    array._tensor = tensor  # the memory belongs to the tensor: hold it as long as the view lives
    return memoryview(array).cast("B")
