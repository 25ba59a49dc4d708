"""Extraction with a recipe (base-aware rank): during the one pass each layer is decomposed up to its rank
cap, its singular vectors spilled to disk and its spectrum kept with the base weight's references (read
while the base weight is in memory anyway); after the pass the resizer's selection chooses the directions
across all layers (thresholds, an exact `size=`, kohya's methods) and only those are written."""

from dataclasses import dataclass, field

import torch

from .errors import OptionError
from .lowrank import base_references
from .recipes import CHECKPOINT_KEYS, RecipeError, parse_recipes
from .selection import Selection
from .writer import SpillWriter


def parse_extract_recipe(text, rank, energy):
    """(Recipe, rank cap) for extraction: the cap is `rank` (32 when not given), and a recipe's own `rank=`
    must fit under it; refuses several recipes and choices that conflict."""
    recipes = parse_recipes(text)
    if len(recipes) > 1:
        raise RecipeError(f"recipe {text!r}: extraction takes one recipe (the resizer takes several)")
    recipe = recipes[0]
    if energy is not None:
        raise OptionError(f"energy and recipe {recipe.text!r} both choose the ranks: give one")
    cap = rank or 32
    if recipe.rank is not None and recipe.rank > cap:
        given = f"--rank {rank}" if rank else "--rank, 32 by default"
        raise OptionError(f"recipe {recipe.text!r} keeps up to {recipe.rank} directions per layer, above the rank "
                          f"cap ({given}): give --rank {recipe.rank} too")
    return recipe, cap


@dataclass
class _Layer:
    """One decomposed piece (a written module) awaiting the selection (what Selection's scores read)."""

    name: str
    s: torch.Tensor
    total_sq: float
    unit_params: int
    piece: object
    report: object
    refs: dict = field(default_factory=dict)
    base: tuple = None  # (canonical key, rows) when the base references are known

    @property
    def target(self):
        return self.piece.target


class RecipeExtraction:
    """Collects decomposed layers, then selects and hands back the kept directions."""

    def __init__(self, recipe, out, unit_params):
        self.recipe = recipe
        self.needs = [key for key in CHECKPOINT_KEYS if key in recipe.weights]
        if "spn_ckpt" in self.needs and "fro_ckpt" not in self.needs:
            self.needs.append("fro_ckpt")  # cheap, and with it the pair goes to the resizer's norm cache
        self.layers = []
        self._unit_params = unit_params
        self._spill = SpillWriter(out.with_name(out.name + ".factors"))
        self.selection = None

    def collect(self, piece, report, u, s, v, total_sq, base_weight):
        """Keep one piece's spectrum (and the references of its rows of the base weight, `base_weight`); its
        vectors go to the spill file."""
        i = len(self.layers)
        layer = _Layer(report.name, s.double().cpu(), total_sq, self._unit_params(piece), piece, report)
        if self.needs:
            layer.refs = base_references(base_weight, u, v, self.needs)
            layer.base = (piece.target.key, None if piece.whole else piece.rows)
        self._spill.add(f"{i}.u", u.float().cpu().contiguous())
        self._spill.add(f"{i}.v", v.float().cpu().contiguous())
        self.layers.append(layer)

    def select(self, fixed_specs, specs_of, metadata_fn, kohya_hashes):
        """[kept direction indices] per collected layer."""
        self.selection = Selection(self.layers, self.recipe, None, fixed_specs, specs_of, metadata_fn,
                                   kohya_hashes=kohya_hashes)
        return self.selection.choose()

    def directions(self, i, keep):
        """(U, S, V) of layer i's kept directions, float32."""
        layer = self.layers[i]
        return (self._spill.read(f"{i}.u")[:, keep], layer.s[keep].float(), self._spill.read(f"{i}.v")[:, keep])

    def base_norms(self):
        """{canonical key: (spectral norm, Frobenius norm)} of the base weights seen (for the norm cache)."""
        return {layer.target.key: (layer.refs["spn_ckpt"], layer.refs["fro_ckpt"]) for layer in self.layers
                if "spn_ckpt" in layer.refs and layer.piece.whole}

    def close(self):
        self._spill.abort()
