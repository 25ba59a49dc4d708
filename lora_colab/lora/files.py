"""Read LoRA files: their layers (grouped by arch.lora_keys, whatever the trainer's spelling), each layer's
scale by its trainer's own rule (`X.alpha`, PEFT's adapter config, or 1), and its ΔW as factors or as a full
matrix, with its DoRA magnitude."""

import torch

from ..arch.lora_keys import scan_layers
from ..closeable import Closeable
from ..errors import CheckpointError, LoraColabError
from ..io.locations import locate
from ..io.opener import open_checkpoint, resolve_folder, small_json
from . import spellings
from .spellings.adapter_config import CONFIG_NAME, AdapterConfig, read_metadata


class LoraFile(Closeable):
    """An open LoRA file (or PEFT `save_pretrained` folder): its layers, metadata, spelling, and each layer's
    ΔW as factors or as a full matrix."""

    def __init__(self, source, token=None):
        location = locate(source, token)  # once: the file and the config beside it
        self.ckpt = open_checkpoint(location, token)
        self.path = self.ckpt.path
        self.metadata = dict(self.ckpt.metadata)
        self.layers, self.other_keys = scan_layers(self.ckpt.keys())
        if not self.layers:
            self.ckpt.close()
            raise CheckpointError(self.path, "no LoRA layers found (no lora_down/lora_up, lora_A/lora_B, LoHa, "
                                             "LoKr or diff tensors)")
        self.peft_config = _folder_config(location)
        self.adapters = ({"base_model.model": AdapterConfig.from_dict(self.peft_config)}
                         if self.peft_config is not None else read_metadata(self.metadata))
        self.spelling = spellings.detect(self.layers, self.metadata, self.peft_config)

    def read(self, key, device=None):
        return self.ckpt.read(key, dtype=torch.float32, device=device)

    def adapter(self, name):
        """(PEFT AdapterConfig, module path) that scales module `name`, or (None, name)."""
        for prefix, config in self.adapters.items():
            if not prefix:
                return config, name
            if name.startswith(prefix + "."):
                return config, name[len(prefix) + 1:]
        return None, name

    def scale(self, layer, rank):
        """The layer's scale as its trainer applies it: alpha/rank with an `X.alpha` tensor, else PEFT's
        lora_alpha/r (or /√r with rslora, per-module patterns) from the adapter config, else 1."""
        if layer.has_alpha:
            alpha = float(self.read(layer.tensors["alpha"]).reshape(-1)[0])
            return alpha / rank if rank else 1.0
        config, path = self.adapter(layer.name)
        if config is None or not rank:
            return 1.0
        said = config.rank_of(path)
        if said != rank:
            raise CheckpointError(self.path, f"the adapter config gives r={said} but the factors have rank "
                                             f"{rank} (stale metadata: PEFT and diffusers refuse this file)",
                                  layer.name)
        return config.scale(path)

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

    def magnitude(self, layer, rows):
        """(magnitude, axis) of a DoRA layer whose change has `rows` output rows, or None: axis "out" (one
        magnitude per output row: PEFT, ai-toolkit, LyCORIS's default) or "in" (per input column:
        OneTrainer's default), told by the tensor's shape as ComfyUI tells it."""
        key = layer.magnitude_key
        if key is None:
            return None
        m = self.read(key)
        if "magnitude" in layer.tensors:  # PEFT: [out] (linear) or [1, out, 1, 1] (conv)
            return m.reshape(-1), "out"
        if m.shape[0] == rows and (rows != 1 or m.dim() == 1):
            return m.reshape(-1), "out"
        return m.reshape(-1), "in"

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
            return self._lokr(t, layer, device)
        if kind == "diff":
            w = self.read(t["diff"], device)
            return w.reshape(w.shape[0], -1), tuple(w.shape)
        raise CheckpointError(self.path, f"layer kind {kind!r} is not supported", layer.name)

    def _lokr(self, t, layer, device):
        """LoKr's ΔW = scale · w1 ⊗ w2 (w1, w2 whole or low-rank; w2 Tucker with lokr_t2), scaled as LyCORIS's
        forward and ComfyUI scale it: alpha over the rank of w2's factors, else w1's, else 1."""
        rank = None
        if "lokr_w1" in t:
            w1 = self.read(t["lokr_w1"], device)
        else:
            b = self.read(t["lokr_w1_b"], device)
            w1, rank = self.read(t["lokr_w1_a"], device) @ b, b.shape[0]
        if "lokr_w2" in t:
            w2 = self.read(t["lokr_w2"], device)
        else:
            a, b = self.read(t["lokr_w2_a"], device), self.read(t["lokr_w2_b"], device)
            rank = b.shape[0]
            if "lokr_t2" in t:  # Tucker: t2 [r, r, kh, kw], a [r, out], b [r, in]
                w2 = torch.einsum("i j k l, j r, i p -> p r k l", self.read(t["lokr_t2"], device), b, a)
            else:
                w2 = (a @ b.flatten(1)).reshape((-1,) + tuple(b.shape[1:]))
        w = torch.kron(w1.reshape(w1.shape + (1,) * (w2.dim() - w1.dim())), w2.contiguous())
        scale = self.scale(layer, rank) if rank else 1.0
        return w.reshape(w.shape[0], -1) * scale, tuple(w.shape)

    def _pair(self, t, a, b, mid, device):
        if mid in t:  # Tucker-style LoHa (LyCORIS): w = einsum(t, b, a)
            return torch.einsum("i j k l, j r, i p -> p r k l", self.read(t[mid], device),
                                self.read(t[b], device), self.read(t[a], device))
        return self.read(t[a], device) @ self.read(t[b], device).flatten(1)

    def close(self):
        self.ckpt.close()


def _folder_config(location):
    """A PEFT `adapter_config.json` beside the LoRA's file (a `save_pretrained` folder), or None."""
    try:
        if location.is_dir():
            location = resolve_folder(location)
        config = small_json(location.sibling(CONFIG_NAME))
    except (OSError, ValueError, LoraColabError, NotImplementedError):
        return None
    return config if isinstance(config, dict) and ("r" in config or "peft_type" in config) else None
