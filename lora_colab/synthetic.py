"""Synthetic checkpoints with real layouts (for the demo, tests and benchmarks)."""

from dataclasses import dataclass

import torch

from .writer import SafetensorsWriter


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


DEMO_ZIMAGE = ZImageConfig(dim=128, n_layers=4, n_refiner_layers=1, n_heads=4, cap_feat_dim=64)


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
