"""One LoRA layer decomposed: its exact SVD from the factors (QR core, no ΔW formed), or from the rebuilt ΔW
for LoHa/LoKr/Tucker/diff layers."""

from dataclasses import dataclass, field

import torch

from ..lowrank.factor import low_rank


MAX_REBUILT_RANK = 512  # LoHa/LoKr/Tucker/diff layers are rebuilt as ΔW and factored up to this rank


@dataclass
class Spectrum:
    """One layer decomposed: ΔW = U diag(σ) Vᵀ (σ of the effective, alpha-scaled delta)."""

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
    dora_key: str = None
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
    else:
        delta, shape = lora.delta(layer, device)
        u, s, v = low_rank(delta, min(MAX_REBUILT_RANK, *delta.shape))
        old_rank, in_scale = 0, 1.0
    return Spectrum(layer.name, layer.kind, u.cpu(), s.cpu(), v.cpu(), shape, old_rank,
                    layer.has_alpha or layer.kind != "lora", in_scale, layer.suffixes
                    if layer.kind == "lora" else (".lora_down.weight", ".lora_up.weight"),
                    layer.tensors.get("dora_scale"))
