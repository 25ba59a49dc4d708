"""Which singular directions to keep: each direction's score under a recipe (relative to the LoRA itself
and to the base checkpoint's weights) and the choice across all layers, by threshold, by an exact file
size, or per layer by kohya's methods. Shared by the resizer and by extraction with a recipe.

A spectrum here is anything with `name`, `s` (σ, descending), `refs` ({"spn_ckpt", "fro_ckpt": floats,
"subspace": per-direction tensor}), `base` (None when no base weight is known), `unit_params` (the
parameters one direction costs) and, optionally, `total_sq` (‖ΔW‖² when `s` is a truncated spectrum).
"""

import math

import torch

from ..errors import LoraColabError
from ..io.safetensors import planned_size

_TINY = 1e-30


def subspace_reference(spectrum, base):
    """|uᵢᵀ W vᵢ| per direction, W the base weight the layer patches."""
    w = base.weight(*spectrum.base).cpu()
    return ((spectrum.u.T @ w) * spectrum.v.T).sum(dim=1).abs()


def scores(spectrum, recipe, base):
    """log10 score of each direction for a score recipe (None when a needed reference is missing)."""
    s = spectrum.s.double().clamp_min(_TINY)
    score = torch.log10(recipe.rescale * s)
    for key, weight in recipe.weights.items():
        if key == "spn_lora":
            ref = s[0]
        elif key == "fro_lora":
            ref = s.norm()
        elif key == "params":
            ref = torch.tensor(float(spectrum.unit_params), dtype=torch.float64)
        elif spectrum.base is None:
            return None
        elif key == "subspace":
            if "subspace" not in spectrum.refs:
                spectrum.refs["subspace"] = subspace_reference(spectrum, base)
            ref = spectrum.refs["subspace"].double()
        else:
            ref = torch.tensor(spectrum.refs[key], dtype=torch.float64)
        score = score - weight * torch.log10(torch.as_tensor(ref).clamp_min(_TINY))
    return score


def kohya_rank(s, recipe, total_sq=None):
    """Directions kept by kohya's methods, counted correctly (kohya keeps one too many). `total_sq`:
    ‖ΔW‖² when `s` holds only the top directions (sv_fro is then a fraction of the whole difference)."""
    n = s.numel()
    if recipe.method is None:
        k = n
    elif recipe.method == "sv_ratio":
        k = int((s > s[0] / recipe.param).sum())
    elif recipe.method == "sv_fro":
        total = total_sq if total_sq is not None else float((s.double() ** 2).sum())
        frac = torch.cumsum(s.double() ** 2, 0) / total
        k = int((frac < recipe.param ** 2 - 1e-12).sum()) + 1
    else:
        frac = torch.cumsum(s.double(), 0) / s.double().sum()
        k = int((frac < recipe.param - 1e-12).sum()) + 1
    k = max(1, min(k, n))
    return min(k, recipe.rank) if recipe.rank else k


class Selection:
    """Per-layer kept direction indices for one recipe, and the exact size of the file they make.

    fixed_specs: [(name, dtype, shape)] written whatever is kept (pass-through tensors);
    specs_of(i, k): the tensors layer i is written as at rank k; metadata_fn(keep): the file's metadata.
    """

    def __init__(self, spectra, recipe, base, fixed_specs, specs_of, metadata_fn, kohya_hashes=True):
        self.spectra, self.recipe, self.base = spectra, recipe, base
        self.kohya_hashes = kohya_hashes
        self.fixed_specs, self.specs_of, self.metadata_fn = list(fixed_specs), specs_of, metadata_fn
        self.unscored = []  # layers kept unchanged: no base weight for a base-relative recipe
        self.threshold = None
        self.all_scores = []

    def specs(self, keep):
        specs = list(self.fixed_specs)
        for i, idx in enumerate(keep):
            if idx is not None and idx.numel():
                specs.extend(self.specs_of(i, idx.numel()))
        return specs

    def size(self, keep):
        return planned_size(self.specs(keep), self.metadata_fn(keep), kohya_hashes=self.kohya_hashes)

    def _unit_bytes(self, i):
        """Bytes one more direction of layer i adds at least (its factors' row and column)."""
        return sum(torch.empty((), dtype=dtype).element_size() * math.prod(shape)
                   for _, dtype, shape in self.specs_of(i, 1) if len(shape) >= 2)

    def choose(self):
        """[LongTensor of kept direction indices] per layer."""
        recipe = self.recipe
        if recipe.is_kohya:
            return [torch.arange(kohya_rank(sp.s, recipe, getattr(sp, "total_sq", None))) for sp in self.spectra]
        per_layer = []
        for sp in self.spectra:
            sc = scores(sp, recipe, self.base)
            if sc is None:
                self.unscored.append(sp.name)
            per_layer.append(sc)
        scored = [sc for sc in per_layer if sc is not None]
        self.all_scores = torch.cat(scored) if scored else torch.empty(0, dtype=torch.float64)
        full = [torch.arange(sp.s.numel()) for sp in self.spectra]
        if recipe.thr is not None:
            self.threshold = recipe.thr
            return [f if sc is None else (sc >= recipe.thr).nonzero().flatten() for f, sc in zip(full, per_layer)]
        return self._fit_size(per_layer, full)

    def _fit_size(self, per_layer, full):
        """Keep directions in score order while the exact file size stays within the target."""
        target = int(self.recipe.size * 2**20)
        order = []  # (score, layer, index)
        for li, sc in enumerate(per_layer):
            if sc is not None:
                order.extend((float(v), li, i) for i, v in enumerate(sc.tolist()))
        order.sort(key=lambda t: -t[0])

        def keep_of(n_first):
            chosen = [[] for _ in per_layer]
            for _, li, i in order[:n_first]:
                chosen[li].append(i)
            return [f if sc is None else torch.tensor(sorted(c), dtype=torch.long)
                    for f, sc, c in zip(full, per_layer, chosen)]

        lo, hi = 0, len(order)  # largest prefix that fits: binary search on exact sizes
        if self.size(keep_of(0)) > target:
            raise LoraColabError(f"recipe {self.recipe.text!r}: even an empty LoRA (header, metadata, "
                                 f"pass-through tensors) exceeds {self.recipe.size:g} MiB")
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.size(keep_of(mid)) <= target:
                lo = mid
            else:
                hi = mid - 1
        keep = keep_of(lo)
        # then every later direction that still fits, in score order
        current = self.size(keep)
        units = {}
        for score, li, i in order[lo:]:
            if li not in units:
                units[li] = self._unit_bytes(li)
            if current + units[li] > target:
                continue
            trial = list(keep)
            trial[li] = torch.tensor(sorted(trial[li].tolist() + [i]), dtype=torch.long)
            size = self.size(trial)
            if size <= target:
                keep, current = trial, size
        kept_scores = [sc[idx] for sc, idx in zip(per_layer, keep) if sc is not None and idx.numel()]
        self.threshold = float(torch.cat(kept_scores).min()) if kept_scores else None
        return keep

