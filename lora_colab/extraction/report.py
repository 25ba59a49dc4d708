"""What an extraction did, per layer and in total, as data and as text."""

from dataclasses import asdict, dataclass, field

from ..memory import fmt_bytes


@dataclass
class LayerReport:
    """One target layer: its rank and how well the LoRA reproduces the difference."""

    name: str
    shape: tuple
    rank: int = 0
    energy: float = 0.0        # ‖ΔW_r‖² / ‖ΔW‖²
    rel_error: float = 0.0     # ‖ΔW − ΔW_r‖ / ‖ΔW‖, against the unclamped difference
    clamp_change: float = 0.0  # ‖P − P_clamped‖ / ‖P‖: how much the clamp changed the LoRA
    clipped: float = 0.0       # fraction of up rows and down columns the clamp scaled down
    max_abs_diff: float = 0.0
    seconds: float = 0.0
    skipped: str = ""          # why the layer has no LoRA ("" when it has one)
    diff_norm: float = 0.0     # ‖ΔW‖
    quant_noise: float = 0.0   # estimated ‖rounding noise of quantized inputs‖ / ‖ΔW‖ (0: none quantized)
    singular_values: list = field(default_factory=list)  # the kept σ (of the difference)

    def to_dict(self):
        return asdict(self)


def layer_from_dict(data):
    """A LayerReport from its `to_dict()` (as a journal keeps it)."""
    return LayerReport(**{**data, "shape": tuple(data["shape"])})


@dataclass
class ExtractReport:
    """Totals and per-layer figures of one extraction; `str(report)` is a readable summary."""

    base: str
    tuned: str
    output: str = None
    architecture: str = ""
    format: str = ""
    dtype: str = ""
    device: str = ""
    scale: float = 1.0           # the strength the LoRA was written at (1 = the full difference)
    layers: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    output_bytes: int = 0
    peak_rss: int = 0
    peak_vram: int = 0
    wall_seconds: float = 0.0
    read_wait_seconds: float = 0.0
    purge_seconds: float = 0.0
    bytes_read: int = 0          # header and tensor bytes read from both models
    network_bytes: int = 0       # of which over the network (read in place)
    diffs: list = field(default_factory=list)  # (tensor name, values, max |Δ|) of each .diff_b/.diff written
    recipe: str = ""             # the recipe that chose the ranks ("" = a fixed rank)
    threshold: float = None      # the recipe's score threshold (the lowest kept score for size=)
    directions: tuple = (0, 0)   # (kept, decomposed) directions over all layers, with a recipe
    nothing_selected: bool = False  # the recipe kept no direction: no file written
    resumed: int = 0             # layers taken from an interrupted run's journal (not computed again)
    components: dict = field(default_factory=dict)  # a pipeline's models that take a LoRA of their own: reports

    @property
    def extracted(self):
        return [layer for layer in self.layers if not layer.skipped]

    @property
    def skipped(self):
        return [layer for layer in self.layers if layer.skipped]

    @property
    def identical(self):
        """True when no layer differs: the models are identical and no file was written."""
        return bool(self.layers) and not self.extracted and not self.diffs and not self.nothing_selected

    def to_dict(self):
        data = asdict(self)
        data["identical"] = self.identical
        return data

    def __str__(self):
        scale = f", scale {self.scale:g}" if self.scale != 1.0 else ""
        lines = [f"{self.architecture}: {len(self.extracted)} layers extracted, {len(self.skipped)} skipped "
                 f"({self.format}, {self.dtype}, {self.device}{scale})"]
        done = self.extracted
        if done:
            ranks = sorted({layer.rank for layer in done})
            energy = sorted(layer.energy for layer in done)
            worst = max(done, key=lambda layer: layer.rel_error)
            lines.append(f"ranks {ranks[0]}" + (f"-{ranks[-1]}" if len(ranks) > 1 else "")
                         + f"; energy retained: min {energy[0]:.3f}, median {energy[len(energy) // 2]:.3f}; "
                           f"worst relative error {worst.rel_error:.3f} ({worst.name})")
            changed = max(done, key=lambda layer: layer.clamp_change)
            if changed.clamp_change:
                lines.append(f"clamp: largest change {changed.clamp_change:.2%} ({changed.name}), "
                             f"rows/columns cut up to {max(layer.clipped for layer in done):.2%}")
        if self.recipe:
            kept, total = self.directions
            threshold = f", score threshold {self.threshold:.3f}" if self.threshold is not None else ""
            lines.append(f"recipe {self.recipe}: kept {kept} of {total} directions{threshold}")
        if self.diffs:
            biases = sum(name.endswith(".diff_b") for name, _, _ in self.diffs)
            lines.append(f"bias and norm changes: {biases} biases (.diff_b) and {len(self.diffs) - biases} 1-D "
                         f"weights (.diff), {sum(size for _, size, _ in self.diffs)} values, written whole")
        for nonfinite in (True, False):
            group = [layer for layer in self.skipped if layer.skipped.startswith("NaN/Inf") == nonfinite]
            if group:
                names = ", ".join(layer.name for layer in group[:3])
                more = f" and {len(group) - 3} more" if len(group) > 3 else ""
                lines.append(f"skipped: {names}{more} ({group[0].skipped})")
        if self.resumed:
            lines.append(f"resumed: {self.resumed} of {len(self.layers)} layers taken from the interrupted run's "
                         f"journal, the rest computed now")
        if self.output:
            lines.append(f"wrote {self.output} ({fmt_bytes(self.output_bytes)})")
        elif self.nothing_selected:
            lines.append(f"the recipe {self.recipe} selects no direction of any layer: no LoRA written")
        elif self.identical:
            largest = max((layer.max_abs_diff for layer in self.layers), default=0.0)
            lines.append("the models are identical on every target layer: no LoRA written" if not largest else
                         f"no layer's difference exceeds min_diff (the largest |difference| is {largest:.3g}): "
                         f"no LoRA written; lower --min-diff")
        if self.network_bytes:
            rate = self.network_bytes / max(self.wall_seconds, 1e-9) / 1e6
            lines.append(f"read {fmt_bytes(self.network_bytes)} over the network in place ({rate:.0f} MB/s "
                         f"over the run), nothing downloaded")
        lines.append(f"time {self.wall_seconds:.1f} s (waiting on reads {self.read_wait_seconds:.1f} s, "
                     f"purge {self.purge_seconds:.1f} s); peak RAM {fmt_bytes(self.peak_rss)}"
                     + (f", peak VRAM {fmt_bytes(self.peak_vram)}" if self.peak_vram else ""))
        lines.extend(f"warning: {w}" for w in self.warnings)
        for component, report in self.components.items():
            lines.append(f"\n{component} (its LoRA in a file of its own):")
            lines.append(str(report))
        return "\n".join(lines)
