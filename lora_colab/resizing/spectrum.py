"""One LoRA layer decomposed: its exact SVD from the factors (QR core, no ΔW formed), or from the rebuilt ΔW
for LoHa/LoKr/Tucker/diff layers, with its DoRA magnitude."""

from dataclasses import dataclass, field

import torch

from ..arch.stable_diffusion import lora_conv_shape
from ..lowrank.factor import low_rank


MAX_REBUILT_RANK = 512  # LoHa/LoKr/Tucker/diff layers are rebuilt as ΔW and factored up to this rank


@dataclass
class Spectrum:
    """One layer decomposed: ΔW = U diag(σ) Vᵀ (σ of the effective, scaled delta), and how it is written:
    `name` and `suffixes` (down, up) in the output's spelling, an `X.alpha` tensor when `has_alpha` (alpha =
    in_scale · rank, so the input's alpha/rank is kept), a DoRA magnitude (flat) on its axis ("out" or "in")
    under `magnitude_suffix` in `magnitude_shape`."""

    name: str
    kind: str
    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    out_shape: tuple
    old_rank: int
    has_alpha: bool
    in_scale: float          # alpha/rank of the input layer (kept by the output)
    suffixes: tuple
    magnitude: torch.Tensor = None
    magnitude_axis: str = None
    magnitude_suffix: str = None
    magnitude_shape: tuple = None
    base: tuple = None       # (canonical key, rows) in the base checkpoint
    refs: dict = field(default_factory=dict)

    @property
    def unit_params(self):
        return self.u.shape[0] + self.v.shape[0]


def qr_core(up, down):
    """Exact SVD of up @ down without forming it: QR of up and of downᵀ, SVD of the small core."""
    qb, rb = torch.linalg.qr(up)
    qa, ra = torch.linalg.qr(down.T)
    um, s, vmh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return qb @ um, s, qa @ vmh.T


def decompose(lora, layer, device):
    """Spectrum of one LoRA layer."""
    if layer.kind == "lora":
        up, down, shape = lora.factors(layer, device)
        u, s, v = qr_core(up, down)
        old_rank = down.shape[0]
        in_scale = lora.scale(layer, old_rank)
        suffixes = layer.suffixes
    else:
        delta, shape = lora.delta(layer, device)
        u, s, v = low_rank(delta, min(MAX_REBUILT_RANK, *delta.shape))
        old_rank, in_scale, suffixes = 0, 1.0, (".lora_down.weight", ".lora_up.weight")
    if len(shape) == 2 and layer.kind == "loha":  # LoHa stores a convolution's factors flattened
        shape = lora_conv_shape(layer.name, shape)
    sp = Spectrum(layer.name, layer.kind, u.cpu(), s.cpu(), v.cpu(), tuple(shape), old_rank,
                  layer.has_alpha or layer.kind != "lora", in_scale, tuple(suffixes))
    found = lora.magnitude(layer, u.shape[0])
    if found is not None:
        key = layer.magnitude_key
        sp.magnitude, sp.magnitude_axis = found
        sp.magnitude_suffix, sp.magnitude_shape = key[len(layer.name):], tuple(lora.ckpt.shape(key))
    return sp
