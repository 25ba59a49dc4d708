"""LoRA tensors and metadata as each format spells them: names, factor shapes, alpha, kohya metadata."""

import datetime
import json
import math
import os
from dataclasses import dataclass

import torch

from .. import __version__
from ..arch import resolve_format


def factor_shapes(target, rank):
    """(down shape, up shape) for a target: 2-D for linears, 4-D for 1×1 and k×k convolutions."""
    out_features, in_features = target.shape[0], target.shape[1]
    if target.kind == "conv":
        return (rank, in_features) + tuple(target.shape[2:]), (out_features, rank, 1, 1)
    if target.conv1x1:
        return (rank, in_features, 1, 1), (out_features, rank, 1, 1)
    return (rank, in_features), (out_features, rank)


@dataclass(frozen=True)
class Piece:
    """One written LoRA module of a target and the rows of the target's difference it holds: the unit that
    is decomposed on its own. A fused weight written as several modules (row slices: bigG's q/k/v, Flux's
    qkv as to_q/to_k/to_v) is several pieces, each the best rank-r approximation of its own change."""

    target: object
    module: object  # LoraModule
    rows: tuple     # (start, stop) of the target's output rows

    @property
    def whole(self):
        return self.rows == (0, self.target.shape[0])

    @property
    def shape(self):
        return (self.rows[1] - self.rows[0],) + tuple(self.target.shape[1:])

    @property
    def label(self):
        """The name reports show: the target's module; for a slice the split's own module path, or the fused
        module's path and the split's short name (`layers.0.attention.qkv.to_q`)."""
        if self.whole:
            name = self.target.module
        else:
            split = next((n for n, a, b in self.target.splits if (a, b) == self.rows), None)
            name = (f"{self.target.module}[{self.rows[0]}:{self.rows[1]}]" if split is None
                    else split if "." in split else f"{self.target.module}.{split}")
        return name + (f" [{self.target.component}]" if self.target.component != "model" else "")


def pieces(arch, fmt, target):
    """The Pieces `target` is written as in `fmt`: one per LoRA module."""
    rows = target.shape[0]
    return [Piece(target, module, tuple(module.rows) if module.rows else (0, rows))
            for module in arch.lora_modules(target, resolve_format(arch, fmt))]


def piece_specs(piece, rank, dtype):
    """[(name, dtype, shape)] of the tensors one piece is written as at `rank`."""
    down_shape, up_shape = factor_shapes(piece.target, rank)
    module = piece.module
    down_suffix, up_suffix = module.factor_suffixes
    specs = [(module.name + down_suffix, dtype, down_shape),
             (module.name + up_suffix, dtype, (piece.shape[0],) + up_shape[1:])]
    if module.alpha:
        specs.append((module.name + ".alpha", torch.float32, ()))
    return specs


def piece_tensors(piece, down, up, alpha, dtype):
    """{name: tensor} of one piece from 2-D float factors of its own rows (up @ down · alpha/rank = its
    delta). Formats without alpha (PEFT) fold alpha/rank into the factors, √ to each side."""
    rank = down.shape[0]
    if alpha is None or not alpha > 0:
        raise ValueError(f"{piece.label}: alpha must be > 0, got {alpha}")
    down_shape, up_shape = factor_shapes(piece.target, rank)
    module = piece.module
    if not module.alpha:
        s = math.sqrt(alpha / rank)
        down, up = down * s, up * s
    if module.order is not None:  # the module holds the piece's rows in another order
        first = piece.rows[0]
        up = torch.cat([up[a - first:b - first] for a, b in module.order])
    down_suffix, up_suffix = module.factor_suffixes
    tensors = {module.name + down_suffix: down.reshape(down_shape).to(dtype).contiguous(),
               module.name + up_suffix: up.reshape((up.shape[0],) + up_shape[1:]).to(dtype).contiguous()}
    if module.alpha:
        tensors[module.name + ".alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return tensors


def module_specs(arch, fmt, target, rank, dtype):
    """[(name, dtype, shape)] of every tensor written for `target` at `rank` (every piece at that rank)."""
    return [spec for piece in pieces(arch, fmt, target) for spec in piece_specs(piece, rank, dtype)]


def module_tensors(arch, fmt, target, down, up, alpha, dtype):
    """{name: tensor} for `target` from 2-D float factors of the whole target (up @ down · alpha/rank = the
    delta): each piece takes its rows of `up` and the shared `down`."""
    tensors = {}
    for piece in pieces(arch, fmt, target):
        tensors.update(piece_tensors(piece, down, up[piece.rows[0]:piece.rows[1]], alpha, dtype))
    return tensors


def _number(value):
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _now():
    """The time a file is written, to the second (UTC): SOURCE_DATE_EPOCH's where set, as reproducible builds
    ask, so the same run writes the same bytes."""
    fixed = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    when = (datetime.datetime.fromtimestamp(int(fixed), datetime.timezone.utc) if fixed.isdigit()
            else datetime.datetime.now(datetime.timezone.utc))
    return when.replace(microsecond=0).isoformat()


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
        "modelspec.date": _now(),
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
