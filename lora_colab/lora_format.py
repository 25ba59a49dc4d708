"""LoRA tensors and metadata as each format spells them: names, factor shapes, alpha, kohya metadata."""

import datetime
import json
import math

import torch

from . import __version__
from .arch import resolve_format


def factor_shapes(target, rank):
    """(down shape, up shape) for a target: 2-D for linears, 4-D for 1×1 and k×k convolutions."""
    out_features, in_features = target.shape[0], target.shape[1]
    if target.kind == "conv":
        return (rank, in_features) + tuple(target.shape[2:]), (out_features, rank, 1, 1)
    if target.conv1x1:
        return (rank, in_features, 1, 1), (out_features, rank, 1, 1)
    return (rank, in_features), (out_features, rank)


def module_specs(arch, fmt, target, rank, dtype):
    """[(name, dtype, shape)] of every tensor written for `target` at `rank`."""
    down_shape, up_shape = factor_shapes(target, rank)
    specs = []
    for module in arch.lora_modules(target, resolve_format(arch, fmt)):
        rows = module.rows or (0, up_shape[0])
        down_suffix, up_suffix = module.factor_suffixes
        specs.append((module.name + down_suffix, dtype, down_shape))
        specs.append((module.name + up_suffix, dtype, (rows[1] - rows[0],) + up_shape[1:]))
        if module.alpha:
            specs.append((module.name + ".alpha", torch.float32, ()))
    return specs


def module_tensors(arch, fmt, target, down, up, alpha, dtype):
    """{name: tensor} for `target` from 2-D float factors (up @ down · alpha/rank = the delta).

    Formats without alpha (PEFT) fold alpha/rank into the factors, √ to each side.
    """
    rank = down.shape[0]
    if alpha is None or not alpha > 0:
        raise ValueError(f"{target.module}: alpha must be > 0, got {alpha}")
    down_shape, up_shape = factor_shapes(target, rank)
    tensors = {}
    for module in arch.lora_modules(target, resolve_format(arch, fmt)):
        d, u = down, up
        if module.rows:
            u = u[module.rows[0]:module.rows[1]]
        if not module.alpha:
            s = math.sqrt(alpha / rank)
            d, u = d * s, u * s
        down_suffix, up_suffix = module.factor_suffixes
        tensors[module.name + down_suffix] = d.reshape(down_shape).to(dtype).contiguous()
        tensors[module.name + up_suffix] = u.reshape((u.shape[0],) + up_shape[1:]).to(dtype).contiguous()
        if module.alpha:
            tensors[module.name + ".alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return tensors


def _number(value):
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def build_metadata(arch, fmt, ranks, alphas, title, conv_ranks=(), conv_alphas=(), comment="", extra=None):
    """kohya/modelspec metadata; `ranks`/`alphas` list every linear module's, `conv_*` every conv's."""
    ranks, alphas = list(ranks), list(alphas)
    same = len(set(ranks)) <= 1 and len(set(alphas)) <= 1
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": _number(ranks[0]) if ranks and same else "Dynamic",
        "ss_network_alpha": _number(alphas[0]) if alphas and same else "Dynamic",
        "ss_base_model_version": arch.base_model_version,
        "ss_v2": "False",
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch.modelspec_architecture,
        "modelspec.title": title,
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "lora_colab.version": __version__,
        "lora_colab.format": resolve_format(arch, fmt),
    }
    if arch.implementation:
        meta["modelspec.implementation"] = arch.implementation
    if arch.resolution:
        meta["modelspec.resolution"] = arch.resolution
    if conv_ranks:
        conv_same = len(set(conv_ranks)) <= 1 and len(set(conv_alphas)) <= 1
        meta["ss_network_args"] = json.dumps({
            "conv_dim": _number(conv_ranks[0]) if conv_same else "Dynamic",
            "conv_alpha": _number(conv_alphas[0]) if conv_same else "Dynamic"})
    if comment:
        meta["ss_training_comment"] = comment
    meta.update(extra or {})
    return meta
