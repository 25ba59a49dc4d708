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


@dataclass(frozen=True)
class FluxConfig:
    """Flux.1 [dev] transformer dimensions (BFL single-file names); the defaults are a small demo's."""

    dim: int = 192
    heads: int = 4
    double: int = 2
    single: int = 2
    in_channels: int = 64
    context: int = 128
    vector: int = 96


def flux_specs(cfg=FluxConfig()):
    """[(key, shape)] of a Flux.1 [dev] transformer in BFL's single-file layout."""
    d, hd, mlp = cfg.dim, cfg.dim // cfg.heads, 4 * cfg.dim

    def linear(name, out, inp, bias=True):
        return [(f"{name}.weight", (out, inp))] + ([(f"{name}.bias", (out,))] if bias else [])
    specs = (linear("img_in", d, cfg.in_channels) + linear("txt_in", d, cfg.context)
             + linear("time_in.in_layer", d, 256) + linear("time_in.out_layer", d, d)
             + linear("vector_in.in_layer", d, cfg.vector) + linear("vector_in.out_layer", d, d)
             + linear("guidance_in.in_layer", d, 256) + linear("guidance_in.out_layer", d, d))
    for i in range(cfg.double):
        for stream in ("img", "txt"):
            b = f"double_blocks.{i}.{stream}"
            specs += (linear(f"{b}_mod.lin", 6 * d, d) + linear(f"{b}_attn.qkv", 3 * d, d)
                      + [(f"{b}_attn.norm.query_norm.scale", (hd,)), (f"{b}_attn.norm.key_norm.scale", (hd,))]
                      + linear(f"{b}_attn.proj", d, d) + linear(f"{b}_mlp.0", mlp, d) + linear(f"{b}_mlp.2", d, mlp))
    for i in range(cfg.single):
        b = f"single_blocks.{i}"
        specs += (linear(f"{b}.linear1", 3 * d + mlp, d) + linear(f"{b}.linear2", d, d + mlp)
                  + [(f"{b}.norm.query_norm.scale", (hd,)), (f"{b}.norm.key_norm.scale", (hd,))]
                  + linear(f"{b}.modulation.lin", 3 * d, d))
    return specs + linear("final_layer.adaLN_modulation.1", 2 * d, d) + linear("final_layer.linear", cfg.in_channels, d)


@dataclass(frozen=True)
class SDXLConfig:
    """SDXL dimensions (SGM single-file names: UNet, CLIP-L, OpenCLIP bigG); the defaults are a small demo's
    (the real model: channels 320, context 2048, depths (0, 2, 10), CLIPs of 768 and 1280 wide)."""

    channels: int = 32
    depths: tuple = (0, 1, 1)
    context: int = 64       # CLIP-L width + bigG width
    clip: int = 32
    bigg: int = 32
    clip_layers: int = 2
    adm: int = 96           # the added-condition input width (pooled bigG + the size embeddings)


def sdxl_specs(cfg=SDXLConfig()):
    """[(key, shape)] of an SDXL single file: the SGM UNet (three levels, two ResNets each, transformers where
    `depths` says), CLIP-L in HF names and OpenCLIP bigG with its fused in_proj."""
    return _sgm_unet_specs(cfg) + _clip_l_specs(cfg) + _bigg_specs(cfg)


def _sgm_resnet(name, inp, out, emb):
    block = [(f"{name}.in_layers.0.weight", (inp,)), (f"{name}.in_layers.0.bias", (inp,)),
             (f"{name}.in_layers.2.weight", (out, inp, 3, 3)), (f"{name}.in_layers.2.bias", (out,)),
             (f"{name}.emb_layers.1.weight", (out, emb)), (f"{name}.emb_layers.1.bias", (out,)),
             (f"{name}.out_layers.0.weight", (out,)), (f"{name}.out_layers.0.bias", (out,)),
             (f"{name}.out_layers.3.weight", (out, out, 3, 3)), (f"{name}.out_layers.3.bias", (out,))]
    return block + ([(f"{name}.skip_connection.weight", (out, inp, 1, 1)), (f"{name}.skip_connection.bias", (out,))]
                    if inp != out else [])


def _sgm_transformer(name, ch, depth, context):
    block = [(f"{name}.norm.weight", (ch,)), (f"{name}.norm.bias", (ch,)), (f"{name}.proj_in.weight", (ch, ch)),
             (f"{name}.proj_in.bias", (ch,)), (f"{name}.proj_out.weight", (ch, ch)), (f"{name}.proj_out.bias", (ch,))]
    for j in range(depth):
        t = f"{name}.transformer_blocks.{j}"
        for attn, kv in (("attn1", ch), ("attn2", context)):
            block += [(f"{t}.{attn}.to_q.weight", (ch, ch)), (f"{t}.{attn}.to_k.weight", (ch, kv)),
                      (f"{t}.{attn}.to_v.weight", (ch, kv)), (f"{t}.{attn}.to_out.0.weight", (ch, ch)),
                      (f"{t}.{attn}.to_out.0.bias", (ch,))]
        block += [(f"{t}.ff.net.0.proj.weight", (8 * ch, ch)), (f"{t}.ff.net.0.proj.bias", (8 * ch,)),
                  (f"{t}.ff.net.2.weight", (ch, 4 * ch)), (f"{t}.ff.net.2.bias", (ch,))]
        block += [(f"{t}.norm{n}.{p}", (ch,)) for n in (1, 2, 3) for p in ("weight", "bias")]
    return block


def _sgm_unet_specs(cfg):
    c, emb = cfg.channels, 4 * cfg.channels
    u = "model.diffusion_model."
    specs = [(u + "time_embed.0.weight", (emb, c)), (u + "time_embed.0.bias", (emb,)),
             (u + "time_embed.2.weight", (emb, emb)), (u + "time_embed.2.bias", (emb,)),
             (u + "label_emb.0.0.weight", (emb, cfg.adm)), (u + "label_emb.0.0.bias", (emb,)),
             (u + "label_emb.0.2.weight", (emb, emb)), (u + "label_emb.0.2.bias", (emb,)),
             (u + "input_blocks.0.0.weight", (c, 4, 3, 3)), (u + "input_blocks.0.0.bias", (c,))]
    widths = [c * m for m in (1, 2, 4)]
    index, skips, ch = 1, [c], c
    for level, width in enumerate(widths):
        for _ in range(2):
            specs += _sgm_resnet(f"{u}input_blocks.{index}.0", ch, width, emb)
            ch = width
            if cfg.depths[level]:
                specs += _sgm_transformer(f"{u}input_blocks.{index}.1", ch, cfg.depths[level], cfg.context)
            skips.append(ch)
            index += 1
        if level < 2:
            specs += [(f"{u}input_blocks.{index}.0.op.weight", (ch, ch, 3, 3)), (f"{u}input_blocks.{index}.0.op.bias", (ch,))]
            skips.append(ch)
            index += 1
    specs += _sgm_resnet(f"{u}middle_block.0", ch, ch, emb)
    specs += _sgm_transformer(f"{u}middle_block.1", ch, cfg.depths[-1], cfg.context)
    specs += _sgm_resnet(f"{u}middle_block.2", ch, ch, emb)
    index = 0
    for level in reversed(range(3)):
        for slot in range(3):
            specs += _sgm_resnet(f"{u}output_blocks.{index}.0", ch + skips.pop(), widths[level], emb)
            ch = widths[level]
            sub = 1
            if cfg.depths[level]:
                specs += _sgm_transformer(f"{u}output_blocks.{index}.1", ch, cfg.depths[level], cfg.context)
                sub = 2
            if level > 0 and slot == 2:
                specs += [(f"{u}output_blocks.{index}.{sub}.conv.weight", (ch, ch, 3, 3)),
                          (f"{u}output_blocks.{index}.{sub}.conv.bias", (ch,))]
            index += 1
    return specs + [(u + "out.0.weight", (c,)), (u + "out.0.bias", (c,)), (u + "out.2.weight", (4, c, 3, 3)),
                    (u + "out.2.bias", (4,))]


def _clip_l_specs(cfg):
    te = "conditioner.embedders.0.transformer.text_model."
    w = cfg.clip
    specs = [(te + "embeddings.token_embedding.weight", (1000, w)), (te + "embeddings.position_embedding.weight", (77, w))]
    for i in range(cfg.clip_layers):
        layer = f"{te}encoder.layers.{i}."
        specs += [(f"{layer}self_attn.{p}.{x}", (w, w) if x == "weight" else (w,))
                  for p in ("q_proj", "k_proj", "v_proj", "out_proj") for x in ("weight", "bias")]
        specs += [(f"{layer}mlp.fc1.weight", (4 * w, w)), (f"{layer}mlp.fc1.bias", (4 * w,)),
                  (f"{layer}mlp.fc2.weight", (w, 4 * w)), (f"{layer}mlp.fc2.bias", (w,))]
        specs += [(f"{layer}layer_norm{n}.{x}", (w,)) for n in (1, 2) for x in ("weight", "bias")]
    return specs + [(te + "final_layer_norm.weight", (w,)), (te + "final_layer_norm.bias", (w,))]


def _bigg_specs(cfg):
    g, big = "conditioner.embedders.1.model.", cfg.bigg
    specs = [(g + "token_embedding.weight", (1000, big)), (g + "positional_embedding", (77, big)),
             (g + "ln_final.weight", (big,)), (g + "ln_final.bias", (big,)), (g + "text_projection", (big, big))]
    for i in range(cfg.clip_layers):
        r = f"{g}transformer.resblocks.{i}."
        specs += [(r + "attn.in_proj_weight", (3 * big, big)), (r + "attn.in_proj_bias", (3 * big,)),
                  (r + "attn.out_proj.weight", (big, big)), (r + "attn.out_proj.bias", (big,)),
                  (r + "mlp.c_fc.weight", (4 * big, big)), (r + "mlp.c_fc.bias", (4 * big,)),
                  (r + "mlp.c_proj.weight", (big, 4 * big)), (r + "mlp.c_proj.bias", (big,))]
        specs += [(f"{r}ln_{n}.{x}", (big,)) for n in (1, 2) for x in ("weight", "bias")]
    return specs


DEMO_FAMILIES = ("zimage", "sdxl", "flux")


def make_demo_pair(family, folder, rank=8, noise=0.0005, seed=0):
    """A small base/tuned pair of `family` ("zimage", "sdxl", "flux") with a planted rank-`rank` change (+
    noise) on every weight its LoRA targets: (base path, tuned path, PlantedPair). Z-Image's pair crosses
    layouts (a diffusers folder and a ComfyUI file); the others are two single files of the real names."""
    from pathlib import Path

    from ..arch import get

    if family == "zimage":
        return make_zimage_pair(folder, DEMO_ZIMAGE, rank=rank, noise=noise, seed=seed)
    specs = {"sdxl": sdxl_specs, "flux": flux_specs}[family]()
    targets = {t.key for t in get(family).targets(dict(specs))}  # the native single file is the canonical layout
    planted = PlantedPair(targets.__contains__, rank=rank, noise=noise, seed=seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for role, make in (("base", planted.base), ("tuned", planted.tuned)):
        paths.append(write_checkpoint(folder / f"{role}.safetensors", specs, make, torch.float16 if family == "sdxl"
                                      else torch.bfloat16))
    return paths[0], paths[1], planted
