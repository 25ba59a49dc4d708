"""Read LoRA files: their layers (grouped by arch.lora_keys, whatever the trainer's spelling) as factors or as
full matrices."""

import torch

from ..arch.lora_keys import scan_layers
from ..closeable import Closeable
from ..io.opener import open_checkpoint
from ..errors import CheckpointError


class LoraFile(Closeable):
    """An open LoRA file: its layers, metadata, and each layer's ΔW as factors or as a full matrix."""

    def __init__(self, source, token=None):
        self.ckpt = open_checkpoint(source, token)
        self.path = self.ckpt.path
        self.metadata = dict(self.ckpt.metadata)
        self.layers, self.other_keys = scan_layers(self.ckpt.keys())
        if not self.layers:
            self.ckpt.close()
            raise CheckpointError(self.path, "no LoRA layers found (no lora_down/lora_up, lora_A/lora_B, LoHa, "
                                             "LoKr or diff tensors)")

    def read(self, key, device=None):
        return self.ckpt.read(key, dtype=torch.float32, device=device)

    def scale(self, layer, rank):
        """alpha / rank of a layer (1.0 without alpha)."""
        if not layer.has_alpha:
            return 1.0
        alpha = float(self.read(layer.tensors["alpha"]).reshape(-1)[0])
        return alpha / rank if rank else 1.0

    def factors(self, layer, device=None):
        """(up [n, r], down [r, m], out_shape) with ΔW = up @ down, for plain LoRA layers."""
        down = self.read(layer.tensors["down"], device)
        up = self.read(layer.tensors["up"], device)
        rank = down.shape[0] if down.dim() else 0
        if down.dim() < 2 or up.dim() < 2 or up.shape[1] != rank or up[0].numel() != rank:
            raise CheckpointError(self.path, f"up {list(up.shape)} does not match down {list(down.shape)}",
                                  layer.tensors["up"])
        out_shape = (up.shape[0],) + tuple(down.shape[1:])
        return up.reshape(up.shape[0], rank) * self.scale(layer, rank), down.reshape(rank, -1), out_shape

    def delta(self, layer, device=None):
        """Full ΔW (2-D, float32) and its weight shape, for any supported kind."""
        try:
            return self._delta(layer, device)
        except CheckpointError:
            raise
        except (RuntimeError, ValueError) as exc:  # factors whose shapes do not fit together (einsum: ValueError)
            raise CheckpointError(self.path, f"{layer.kind} tensors do not fit together "
                                             f"({str(exc).splitlines()[0][:120]})", layer.name) from None

    def _delta(self, layer, device):
        kind, t = layer.kind, layer.tensors
        if kind == "lora":
            up, down, shape = self.factors(layer, device)
            return up @ down, shape
        if kind == "tucker":  # up [n,r,1,1], mid [r,r,kh,kw], down [r,m,1,1]
            up, mid, down = (self.read(t[r], device) for r in ("up", "lora_mid", "down"))
            rank = mid.shape[0]
            w = torch.einsum("i j k l, o i, j p -> o p k l", mid, up.flatten(1), down.flatten(1))
            return w.reshape(w.shape[0], -1) * self.scale(layer, rank), tuple(w.shape)
        if kind == "loha":
            w1 = self._pair(t, "hada_w1_a", "hada_w1_b", "hada_t1", device)
            w2 = self._pair(t, "hada_w2_a", "hada_w2_b", "hada_t2", device)
            rank = self.ckpt.shape(t["hada_w1_b"])[0]
            w = w1 * w2
            return w.reshape(w.shape[0], -1) * self.scale(layer, rank), tuple(w.shape)
        if kind == "lokr":
            w1 = self.read(t["lokr_w1"], device) if "lokr_w1" in t else \
                self.read(t["lokr_w1_a"], device) @ self.read(t["lokr_w1_b"], device)
            if "lokr_w2" in t:
                w2, rank = self.read(t["lokr_w2"], device), None
            else:
                b = self.read(t["lokr_w2_b"], device)
                rank = b.shape[0]
                w2 = (self.read(t["lokr_w2_a"], device) @ b.flatten(1)).reshape((-1,) + tuple(b.shape[1:]))
            w = torch.kron(w1.reshape(w1.shape + (1,) * (w2.dim() - w1.dim())), w2)
            scale = self.scale(layer, rank) if rank else 1.0
            return w.reshape(w.shape[0], -1) * scale, tuple(w.shape)
        if kind == "diff":
            w = self.read(t["diff"], device)
            return w.reshape(w.shape[0], -1), tuple(w.shape)
        raise CheckpointError(self.path, f"layer kind {kind!r} is not supported", layer.name)

    def _pair(self, t, a, b, mid, device):
        if mid in t:  # Tucker-style LoHa (LyCORIS): w = einsum(t, b, a)
            return torch.einsum("i j k l, j r, i p -> p r k l", self.read(t[mid], device),
                                self.read(t[b], device), self.read(t[a], device))
        return self.read(t[a], device) @ self.read(t[b], device).flatten(1)

    def close(self):
        self.ckpt.close()
