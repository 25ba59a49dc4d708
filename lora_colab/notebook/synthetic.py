"""Synthetic checkpoints with real layouts (for the demo, tests and benchmarks)."""

from dataclasses import dataclass

import torch

from ..lora.writer import SafetensorsWriter


@dataclass(frozen=True)
class ZImageConfig:
    """Z-Image transformer dimensions; the defaults are the real model's."""

    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    cap_feat_dim: int = 2560
    in_channels: int = 16
    patch: int = 2

    @property
    def ffn(self):
        return int(self.dim / 3 * 8)

    @property
    def adaln(self):
        return min(self.dim, 256)


DEMO_ZIMAGE = ZImageConfig(dim=256, n_layers=4, n_refiner_layers=1, n_heads=4, cap_feat_dim=64)


def zimage_specs(cfg=ZImageConfig(), layout="single-file"):
    """[(key, shape)] of a Z-Image transformer in the ComfyUI single-file or the diffusers layout."""
    d, f, a, hd = cfg.dim, cfg.ffn, cfg.adaln, cfg.dim // cfg.n_heads
    patch_in = cfg.patch * cfg.patch * cfg.in_channels
    diffusers = layout == "diffusers"

    def block(name, modulated):
        attn = f"{name}.attention"
        if diffusers:
            specs = [(f"{attn}.norm_q.weight", (hd,)), (f"{attn}.norm_k.weight", (hd,))]
            specs += [(f"{attn}.to_{p}.weight", (d, d)) for p in "qkv"] + [(f"{attn}.to_out.0.weight", (d, d))]
        else:
            specs = [(f"{attn}.q_norm.weight", (hd,)), (f"{attn}.k_norm.weight", (hd,)),
                     (f"{attn}.qkv.weight", (3 * d, d)), (f"{attn}.out.weight", (d, d))]
        specs += [(f"{name}.feed_forward.w1.weight", (f, d)), (f"{name}.feed_forward.w2.weight", (d, f)),
                  (f"{name}.feed_forward.w3.weight", (f, d))]
        specs += [(f"{name}.{n}.weight", (d,)) for n in ("attention_norm1", "ffn_norm1", "attention_norm2",
                                                          "ffn_norm2")]
        if modulated:
            specs += [(f"{name}.adaLN_modulation.0.weight", (4 * d, a)), (f"{name}.adaLN_modulation.0.bias", (4 * d,))]
        return specs

    x_emb = "all_x_embedder.2-1" if diffusers else "x_embedder"
    final = "all_final_layer.2-1" if diffusers else "final_layer"
    specs = [("x_pad_token", (1, d)), ("cap_pad_token", (1, d)),
             (f"{x_emb}.weight", (d, patch_in)), (f"{x_emb}.bias", (d,)),
             ("t_embedder.mlp.0.weight", (1024, 256)), ("t_embedder.mlp.0.bias", (1024,)),
             ("t_embedder.mlp.2.weight", (a, 1024)), ("t_embedder.mlp.2.bias", (a,)),
             ("cap_embedder.0.weight", (cfg.cap_feat_dim,)), ("cap_embedder.1.weight", (d, cfg.cap_feat_dim)),
             ("cap_embedder.1.bias", (d,))]
    for i in range(cfg.n_refiner_layers):
        specs += block(f"noise_refiner.{i}", True)
    for i in range(cfg.n_refiner_layers):
        specs += block(f"context_refiner.{i}", False)
    for i in range(cfg.n_layers):
        specs += block(f"layers.{i}", True)
    if not diffusers:
        specs.append(("norm_final.weight", (d,)))
    specs += [(f"{final}.linear.weight", (patch_in, d)), (f"{final}.linear.bias", (patch_in,)),
              (f"{final}.adaLN_modulation.1.weight", (d, a)), (f"{final}.adaLN_modulation.1.bias", (d,))]
    return specs


def write_checkpoint(path, specs, make, dtype=torch.bfloat16, metadata=None):
    """Write [(key, shape)] to `path`, one tensor at a time, each from `make(key, shape)` (float32)."""
    with SafetensorsWriter(path, [(k, dtype, s) for k, s in specs], metadata) as writer:
        for key, shape in specs:
            writer.write(key, make(key, shape).to(dtype))
    return path


def _seeded(seed, key):
    import zlib
    return torch.Generator().manual_seed((seed * 7919 + zlib.crc32(key.encode())) % (2**63))


class PlantedPair:
    """A base/tuned pair over canonical weights: tuned = base + a planted rank-`rank` change (+ noise) on
    every weight `is_target` accepts. Each canonical tensor is regenerated from its own seed, so any
    layout can be written streaming, one tensor at a time."""

    def __init__(self, is_target, rank=8, delta_scale=0.02, noise=0.0, weight_scale=0.02, seed=0, decay=None):
        self.is_target, self.rank, self.delta_scale = is_target, rank, delta_scale
        self.noise, self.weight_scale, self.seed = noise, weight_scale, seed
        # a full-rank change with σᵢ ∝ i^-decay (a fine-tune's spectrum) instead of rank-`rank`; (lo, hi): each
        # layer's exponent drawn between them
        self.decay = decay

    def base(self, key, shape):
        return torch.randn(shape, generator=_seeded(self.seed, key)) * self.weight_scale

    def delta(self, key, shape):
        """The planted change (float32), zero for non-targets."""
        if not self.is_target(key) or len(shape) < 2:
            return torch.zeros(shape)
        gen = _seeded(self.seed + 1, key)
        rows, cols = shape[0], 1
        for d in shape[1:]:
            cols *= d
        if self.decay is not None:
            k = min(rows, cols)
            decay = self.decay
            if isinstance(decay, (tuple, list)):
                decay = decay[0] + (decay[1] - decay[0]) * float(torch.rand((), generator=gen))
            left = torch.linalg.qr(torch.randn(rows, k, generator=gen)).Q
            right = torch.linalg.qr(torch.randn(cols, k, generator=gen)).Q
            low = (left * torch.arange(1, k + 1, dtype=torch.float32) ** -decay) @ right.T
        else:
            r = min(self.rank, rows, cols)
            low = torch.randn(rows, r, generator=gen) @ torch.randn(r, cols, generator=gen)
        low *= self.delta_scale / max(float(low.pow(2).mean().sqrt()), 1e-30)
        if self.noise:
            low += torch.randn(rows, cols, generator=gen) * self.noise
        return low.reshape(shape)

    def tuned(self, key, shape):
        return self.base(key, shape) + self.delta(key, shape)


def write_layout(path, specs, canonical_of, make, dtype=torch.bfloat16, metadata=None):
    """Write `specs` [(key, shape)], where `canonical_of(key)` gives (canonical key, canonical shape,
    (row start, stop)) and `make(canonical key, canonical shape)` the canonical tensor."""
    cache = {}

    def build(key, shape):
        ckey, cshape, rows = canonical_of(key, shape)
        if ckey not in cache:
            cache.clear()
            cache[ckey] = make(ckey, cshape)
        tensor = cache[ckey]
        return tensor[rows[0]:rows[1]] if rows else tensor

    return write_checkpoint(path, specs, build, dtype, metadata)


def zimage_canonical_of(cfg):
    """Canonical (single-file) key, shape and rows of a Z-Image key in either layout."""
    import re

    d = cfg.dim
    native = dict(zimage_specs(cfg, "single-file"))

    def canonical_of(key, shape):
        hit = re.fullmatch(r"(.*\.attention)\.to_([qkv])\.weight", key)
        if hit:
            i = "qkv".index(hit.group(2))
            ckey = hit.group(1) + ".qkv.weight"
            return ckey, native[ckey], (i * d, (i + 1) * d)
        ckey = (key.replace("all_x_embedder.2-1", "x_embedder").replace("all_final_layer.2-1", "final_layer")
                .replace(".to_out.0.", ".out.").replace(".norm_q.", ".q_norm.").replace(".norm_k.", ".k_norm."))
        return ckey, native[ckey], None

    return canonical_of


def make_zimage_pair(folder, cfg=DEMO_ZIMAGE, rank=8, noise=0.0, delta_scale=0.02, seed=0, dtype=torch.bfloat16,
                     base_layout="diffusers", tuned_layout="single-file", decay=None):
    """Write a Z-Image base/tuned pair with a planted low-rank change on every default LoRA target.

    Returns (base path, tuned path, PlantedPair). The base is a diffusers folder (`transformer/`) and the
    tuned a ComfyUI single file by default, so the pair also exercises cross-layout pairing.
    """
    from pathlib import Path

    from ..arch import get

    folder = Path(folder)
    targets = {t.key for t in get("zimage").targets(dict(zimage_specs(cfg)), groups={"adaln"})}
    planted = PlantedPair(targets.__contains__, rank=rank, noise=noise, delta_scale=delta_scale, seed=seed,
                          decay=decay)
    canonical_of = zimage_canonical_of(cfg)
    paths = []
    for role, layout, make in (("base", base_layout, planted.base), ("tuned", tuned_layout, planted.tuned)):
        if layout == "diffusers":
            path = folder / role / "transformer" / "diffusion_pytorch_model.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_layout(path, zimage_specs(cfg, layout), canonical_of, make, dtype)
            paths.append(folder / role)
        else:
            path = folder / f"{role}.safetensors"
            write_layout(path, zimage_specs(cfg, layout), canonical_of, make, dtype)
            paths.append(path)
    return paths[0], paths[1], planted
