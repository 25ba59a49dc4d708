"""Resize recipes: `spn_ckpt=1,thr=-1.2:fro_ckpt,size=50:sv_fro=0.9,rank=64`."""

import re
from dataclasses import dataclass, field

from ..errors import LoraColabError

SCORE_KEYS = ("spn_ckpt", "spn_lora", "fro_ckpt", "fro_lora", "subspace", "params")
CHECKPOINT_KEYS = ("spn_ckpt", "fro_ckpt", "subspace")
KOHYA_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
VALUE_KEYS = ("thr", "size", "rescale", "rank") + KOHYA_METHODS


class RecipeError(LoraColabError, ValueError):
    """A recipe string that cannot be used; the message quotes it."""


@dataclass
class Recipe:
    """One way to choose which singular directions of each layer to keep."""

    text: str
    weights: dict = field(default_factory=dict)  # score key -> normalized weight
    raw_weights: dict = field(default_factory=dict)  # as written
    thr: float = None
    size: float = None        # MiB
    rescale: float = 1.0
    rank: int = None          # kohya fixed rank, or the cap of an sv_* method
    method: str = None        # sv_ratio / sv_fro / sv_cumulative
    param: float = None

    @property
    def needs_checkpoint(self):
        return any(k in self.weights for k in CHECKPOINT_KEYS)

    @property
    def is_kohya(self):
        return not self.weights

    def tag(self):
        """File-name fragment that says what the recipe did."""
        parts = [f"{k}{_num(v)}" for k, v in self.raw_weights.items()] if self.weights else []
        if self.method:
            parts.append(f"{self.method}{_num(self.param)}")
        if self.rank:
            parts.append(f"rank{self.rank}")
        if self.rescale != 1.0:
            parts.append(f"scale{_num(self.rescale)}")
        if self.size is not None:
            parts.append(f"size{_num(self.size)}")
        if self.thr is not None:
            parts.append(f"th{_num(self.thr)}")
        return re.sub(r"[^A-Za-z0-9_.+-]", "", "_".join(parts))

    def to_dict(self):
        return {"recipe": self.text, "weights": self.weights, "thr": self.thr, "size_mib": self.size,
                "rescale": self.rescale, "rank": self.rank, "method": self.method, "param": self.param}


def keep_all():
    """The recipe that keeps every direction (a conversion: the change as it is, in another spelling)."""
    return Recipe("all")


def _num(value):
    return f"{value:g}"


def parse_recipes(text):
    """Parse `:`-separated recipes; each a `,`-separated list of `key[=value]`."""
    recipes = [parse_recipe(part) for part in str(text).split(":") if part.strip()]
    if not recipes:
        raise RecipeError(f"no recipe in {text!r}")
    return recipes


def parse_recipe(text):
    text = text.strip()
    raw, values = {}, {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, eq, value = item.partition("=")
        key = key.strip()
        if key in SCORE_KEYS:
            raw[key] = _float(value, key, text) if eq else 1.0
        elif key in VALUE_KEYS:
            if not eq:
                raise RecipeError(f"recipe {text!r}: {key} needs a value ({key}=...)")
            values[key] = _float(value, key, text)
        else:
            raise RecipeError(f"recipe {text!r}: unknown key {key!r} (score keys: {', '.join(SCORE_KEYS)}; "
                              f"selection: thr, size; kohya: rank, {', '.join(KOHYA_METHODS)}; rescale)")
    recipe = Recipe(text)
    recipe.rescale = values.get("rescale", 1.0)
    if recipe.rescale <= 0:
        raise RecipeError(f"recipe {text!r}: rescale must be > 0")
    methods = [k for k in KOHYA_METHODS if k in values]
    if "rank" in values:
        recipe.rank = int(values["rank"])
        if recipe.rank < 1 or recipe.rank != values["rank"]:
            raise RecipeError(f"recipe {text!r}: rank must be a positive integer")
    if raw:
        if methods or "rank" in values:
            raise RecipeError(f"recipe {text!r}: score weights and kohya methods (rank, sv_*) do not mix")
        total = sum(raw.values())
        if total == 0:
            raise RecipeError(f"recipe {text!r}: score weights sum to 0")
        recipe.weights = {k: v / total for k, v in raw.items()}
        recipe.raw_weights = raw
        if ("thr" in values) == ("size" in values):
            raise RecipeError(f"recipe {text!r}: give exactly one selection, thr=... or size=... (MiB)")
        recipe.thr = values.get("thr")
        recipe.size = values.get("size")
        if recipe.size is not None and recipe.size <= 0:
            raise RecipeError(f"recipe {text!r}: size must be > 0 MiB")
        return recipe
    if len(methods) > 1:
        raise RecipeError(f"recipe {text!r}: choose one of {', '.join(methods)}")
    if "thr" in values or "size" in values:
        raise RecipeError(f"recipe {text!r}: thr/size need score weights (e.g. spn_ckpt=1,thr=-1.2)")
    if methods:
        recipe.method, recipe.param = methods[0], values[methods[0]]
        if recipe.method == "sv_ratio" and recipe.param < 1:
            raise RecipeError(f"recipe {text!r}: sv_ratio must be >= 1 (keeps σ > σ1/ratio)")
        if recipe.method != "sv_ratio" and not 0 < recipe.param <= 1:
            raise RecipeError(f"recipe {text!r}: {recipe.method} must be in (0, 1]")
    elif recipe.rank is None:
        raise RecipeError(f"recipe {text!r}: no selection: add thr= or size= with score weights, or rank=/sv_*")
    return recipe


def _float(value, key, text):
    try:
        return float(value)
    except ValueError:
        raise RecipeError(f"recipe {text!r}: {key}={value!r} is not a number") from None
