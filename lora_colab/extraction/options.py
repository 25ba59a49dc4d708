"""What an extraction was asked, checked once at the door: `ExtractOptions` (frozen) and the output path."""

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

from ..dtypes import parse_dtype
from ..errors import OptionError
from .recipe import parse_extract_recipe


@dataclass(frozen=True)
class ExtractOptions:
    """Every choice that shapes the LoRA, validated: build it with `ExtractOptions.checked(...)`.

    rank/conv_rank: the caps of linear layers and k×k convolutions (conv_rank None: no LoCon); alpha/conv_alpha:
    None = one alpha for the file (the cap); recipe: a parsed extraction Recipe (or None); dtype: a torch dtype
    (None: the family's default); device: as asked ("auto", "cpu", "cuda"...), resolved when the run starts.
    """

    rank: int = 32
    alpha: float = None
    clamp_quantile: float = 0.99
    conv_rank: int = None
    conv_alpha: float = None
    text_encoders: bool = True
    min_diff: float = 0.0
    format: str = "auto"
    dtype: object = None
    device: object = None
    niter: int = 2
    oversample: int = 8
    energy: float = None
    scale: float = 1.0
    groups: tuple = ()
    seed: int = 0
    kohya_hashes: bool = True
    title: str = None
    on_nonfinite: str = "stop"
    bias_diff: bool = None
    recipe: object = None
    resume: bool = True
    restart: bool = False

    @classmethod
    def checked(cls, rank=None, recipe=None, energy=None, dtype=None, device="auto", groups=(), **rest):
        """The options of `extract`'s keywords, each checked (one line naming the option) before any input
        is read; a recipe's own `rank=` sets the cap."""
        recipe_obj = None
        if recipe:
            recipe_obj, rank = parse_extract_recipe(recipe, rank, energy)
        options = cls(rank=32 if rank is None else rank, recipe=recipe_obj, energy=energy, groups=tuple(groups),
                      device=device, **rest)
        options._check()
        return replace(options, dtype=parse_dtype(dtype))

    def cap(self, target):
        """The rank cap of a target: conv_rank for k×k convolutions, else rank."""
        return self.conv_rank if target.kind == "conv" else self.rank

    def alpha_for(self, target, rank):
        """The alpha given, else one value for the whole file (the rank cap): diffusers drops per-module alphas
        of kohya SD/SDXL files whose ranks differ (see resizing.output.common_alpha)."""
        given = (self.conv_alpha if target.kind == "conv" else self.alpha) or None
        return float(given if given is not None else (self.rank or rank))

    def identity(self, fmt, dtype):
        """The options a journal's finished layers depend on (`fmt`, `dtype`: as resolved for the model)."""
        return dict(rank=self.rank, alpha=self.alpha, conv_rank=self.conv_rank, conv_alpha=self.conv_alpha,
                    clamp_quantile=self.clamp_quantile, energy=self.energy, min_diff=self.min_diff, format=fmt,
                    dtype=str(dtype), niter=self.niter, oversample=self.oversample, seed=self.seed,
                    scale=self.scale, groups=sorted(self.groups), text_encoders=self.text_encoders,
                    recipe=self.recipe.text if self.recipe else None)

    def _check(self):
        """Refuse values that would crash later or write a useless file; one line naming the option."""
        _positive_int("rank", self.rank)
        if self.conv_rank is not None:
            _positive_int("conv_rank", self.conv_rank)
        _positive_int("niter", self.niter, zero=True)
        _positive_int("oversample", self.oversample, zero=True)
        for name, value in (("alpha", self.alpha), ("conv_alpha", self.conv_alpha)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise OptionError(f"{name} must be a finite number > 0, got {value}")
        scale = self.scale
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise OptionError(f"scale must be a finite number > 0 (1 = the full difference, 0.5 = half strength), "
                              f"got {scale}")
        if self.clamp_quantile is not None and not 0.5 <= self.clamp_quantile <= 1.0:
            raise OptionError(f"clamp_quantile must be in [0.5, 1.0] (or None), got {self.clamp_quantile}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise OptionError(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise OptionError(f"energy must be in (0, 1], got {self.energy}")
        if not (math.isfinite(self.min_diff) and self.min_diff >= 0):
            raise OptionError(f"min_diff must be >= 0, got {self.min_diff}")


def _positive_int(name, value, zero=False):
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero else 1):
        raise OptionError(f"{name} must be a {'non-negative' if zero else 'positive'} integer, got {value!r}")


def check_output_file(out, what="output"):
    """The path to write a file at: refused at once (before any input is read) when it is a folder or
    lies under a file."""
    out = Path(os.fspath(out)).expanduser()
    if out.is_dir():
        raise OptionError(f"{out}: is a folder; the {what} is a file, e.g. {out / 'lora.safetensors'}")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise OptionError(f"{out}: {parent} is a file, not a folder")
    return out


def with_suffix(out):
    """(`out` ending in .safetensors, a note when the suffix was added): ComfyUI, A1111/Forge and diffusers
    list and load only .safetensors files."""
    if out.suffix.lower() == ".safetensors":
        return out, None
    named = out.with_name(out.name + ".safetensors")
    return named, f"{out.name} has no .safetensors suffix, which the clients look for: writing {named.name}"
