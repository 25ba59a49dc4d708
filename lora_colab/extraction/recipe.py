"""Extraction with a recipe (base-aware rank): during the one pass each layer is decomposed up to its rank
cap, its singular vectors spilled to disk and its spectrum kept with the base weight's references (read
while the base weight is in memory anyway); after the pass the resizer's selection chooses the directions
across all layers (thresholds, an exact `size=`, kohya's methods) and only those are written."""

from dataclasses import dataclass, field

import torch

from ..errors import OptionError
from ..lowrank.factor import base_references
from ..lowrank.recipes import CHECKPOINT_KEYS, RecipeError, parse_recipes
from ..lowrank.selection import Selection
from ..lora.writer import SpillWriter


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

    def __init__(self, recipe, out, unit_params, journal=None):
        self.recipe = recipe
        self.needs = [key for key in CHECKPOINT_KEYS if key in recipe.weights]
        if "spn_ckpt" in self.needs and "fro_ckpt" not in self.needs:
            self.needs.append("fro_ckpt")  # cheap, and with it the pair goes to the resizer's norm cache
        self.layers = []
        self._unit_params = unit_params
        self._journal = journal  # resumable runs keep the vectors in the run's journal
        self._spill = None if journal is not None else SpillWriter(out.with_name(out.name + ".factors"))
        self._journaled = 0
        self.selection = None

    def collect(self, piece, report, u, s, v, total_sq, base_weight):
        """Keep one piece's spectrum (and the references of its rows of the base weight, `base_weight`); its
        vectors go to the spill file."""
        i = len(self.layers)
        layer = _Layer(report.name, s.double().cpu(), total_sq, self._unit_params(piece), piece, report)
        if self.needs:
            layer.refs = base_references(base_weight, u, v, self.needs)
            layer.base = (piece.target.key, None if piece.whole else piece.rows)
        for name, tensor in ((f"{i}.u", u), (f"{i}.v", v)):
            tensor = tensor.float().cpu().contiguous()
            self._journal.add_scratch(name, tensor) if self._journal is not None else self._spill.add(name, tensor)
        self.layers.append(layer)

    def journal_info(self):
        """{piece label: what `restore` needs} of the pieces collected since the last call (one target's)."""
        info = {}
        for layer in self.layers[self._journaled:]:
            info[layer.report.name] = {"s": layer.s.tolist(), "total_sq": layer.total_sq,
                                       "refs": {k: _plain(v) for k, v in layer.refs.items()},
                                       "base": None if layer.base is None else [layer.base[0], layer.base[1]]}
        self._journaled = len(self.layers)
        return info

    def restore(self, piece, report, info):
        """Take back one piece collected by an interrupted run (its vectors are in the journal)."""
        layer = _Layer(report.name, torch.tensor(info["s"], dtype=torch.float64), info["total_sq"],
                       self._unit_params(piece), piece, report, refs={k: _tensor(v) for k, v in info["refs"].items()})
        if info["base"] is not None:
            key, rows = info["base"]
            layer.base = (key, None if rows is None else tuple(rows))
        self.layers.append(layer)
        self._journaled = len(self.layers)

    def select(self, fixed_specs, specs_of, metadata_fn, kohya_hashes):
        """[kept direction indices] per collected layer."""
        self.selection = Selection(self.layers, self.recipe, None, fixed_specs, specs_of, metadata_fn,
                                   kohya_hashes=kohya_hashes)
        return self.selection.choose()

    def directions(self, i, keep):
        """(U, S, V) of layer i's kept directions, float32."""
        layer = self.layers[i]
        read = self._journal.read_scratch if self._journal is not None else self._spill.read
        return read(f"{i}.u")[:, keep], layer.s[keep].float(), read(f"{i}.v")[:, keep]

    def base_norms(self):
        """{canonical key: (spectral norm, Frobenius norm)} of the base weights seen (for the norm cache)."""
        return {layer.target.key: (layer.refs["spn_ckpt"], layer.refs["fro_ckpt"]) for layer in self.layers
                if "spn_ckpt" in layer.refs and layer.piece.whole}

    def close(self):
        if self._spill is not None:
            self._spill.abort()


def _plain(value):
    """A reference as JSON holds it (float32 tensors as lists: exact)."""
    return {"float32": value.tolist()} if isinstance(value, torch.Tensor) else value


def _tensor(value):
    return torch.tensor(value["float32"], dtype=torch.float32) if isinstance(value, dict) else value
