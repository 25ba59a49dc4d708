"""A checkpoint seen through its architecture's canonical names: fused and split weights read alike."""

import torch

from ..closeable import Closeable
from .. import arch as arch_registry
from ..io.opener import open_checkpoint, open_components
from ..errors import CheckpointError
from .diffusers_model import DiffusersModel, loader_problem, together
from .lora_keys import looks_like_lora
from ..io.dequant import Dequantizer, is_auxiliary


class CanonicalCheckpoint(Closeable):
    """Canonical weight keys of an open checkpoint, read by rows across fused or split storage."""

    def __init__(self, ckpt, arch=None, role="the full base and fine-tuned models"):
        self.ckpt = ckpt
        keys = [k for k in ckpt.keys() if not is_auxiliary(k)]
        if looks_like_lora(keys):
            raise CheckpointError(ckpt.path, f"is a LoRA file, not a model checkpoint: give {role} "
                                             f"(lora-colab inspect shows what a file is)")
        detected = arch_registry.detect(keys)
        info = getattr(ckpt, "diffusers", None)
        if info is not None and (detected.arch is arch_registry.GENERIC or (
                detected.arch.diffusers_classes and info.model_class not in detected.arch.diffusers_classes
                and info.pipeline_class not in detected.arch.diffusers_pipelines)):
            # a class without a table, or one whose names resemble a family's (HunyuanVideo's are Flux's)
            problem = loader_problem(info)
            if problem:
                raise CheckpointError(ckpt.path, problem)
            others = together(info)  # in a pipeline's folder: its components that load with the model, one file
            detected = arch_registry.Detected(DiffusersModel(info, others), "diffusers",
                                              "" if others else detected.prefix)
            if others:  # every key then carries its component's name
                self.ckpt = open_components(info, (info.component,) + tuple(others))
                ckpt.close()
                keys = [k for k in self.ckpt.keys() if not is_auxiliary(k)]
        try:
            self._start(keys, detected, arch)
        except BaseException:
            if self.ckpt is not ckpt:  # the caller closes the checkpoint it gave, not this one
                self.ckpt.close()
            raise

    def _start(self, keys, detected, arch):
        ckpt = self.ckpt
        if arch is not None and detected.arch.name != arch and arch.startswith("diffusers:"):
            raise CheckpointError(ckpt.path, f"is {detected.describe()}, not a diffusers folder of "
                                             f"{arch.split(':', 1)[1]} as the base is")
        if arch is not None and detected.arch.name != arch:
            wanted = arch_registry.get(arch)
            found = wanted.detect(set(keys))
            if found is None:
                raise CheckpointError(ckpt.path, f"is {detected.describe()}, not {wanted.title}")
            detected = arch_registry.Detected(wanted, *found)
        stored_layout = detected.arch.stored_layout(detected.layout, getattr(ckpt, "sharded", False))
        self.dequant = Dequantizer(ckpt)
        self._stored = {key: self.dequant.shape(key) for key in keys}
        self.notes = []  # lines for the report (a layout taken from the pair rather than the file)
        self.relayout(arch_registry.Detected(detected.arch, stored_layout, detected.prefix))

    def relayout(self, detected):
        """Read the checkpoint as `detected` says (its architecture, layout and prefix)."""
        self.detected = detected
        self.arch = detected.arch
        self._parts = {}
        self._shapes = {}
        cmap = detected.arch.canonical_map(self._stored, detected.layout, detected.prefix)
        for key, sources in cmap.sources.items():
            if None in sources:
                continue  # a fused weight with a part missing is not usable (reported when it is a target)
            self._parts[key], self._shapes[key] = self._layout_parts(key, sources, cmap.orders.get(key))

    def _layout_parts(self, key, sources, order=None):
        """([(source, first canonical row, end canonical row, first source row)], canonical shape)."""
        shapes = [self.dequant.shape(s) for s in sources]
        tail = shapes[0][1:]
        if any(not s or s[1:] != tail for s in shapes) and len(shapes) > 1:
            raise CheckpointError(self.ckpt.path, f"parts of fused {key} have mismatched shapes {shapes}",
                                  sources[0])
        stacked, offset = [], 0  # (source, first stacked row, end stacked row)
        for source, shape in zip(sources, shapes):
            rows = shape[0] if shape else 1
            stacked.append((source, offset, offset + rows))
            offset += rows
        shape = (offset,) + tail if len(sources) > 1 else shapes[0]
        parts, start = [], 0
        for lo, hi in order or [(0, offset)]:
            for source, a, b in stacked:
                x, y = max(lo, a), min(hi, b)
                if x < y:
                    parts.append((source, start, start + y - x, x - a))
                    start += y - x
        return parts, shape
    @property
    def path(self):
        return self.ckpt.path

    def keys(self):
        return list(self._shapes)

    def shapes(self):
        return dict(self._shapes)

    def __contains__(self, key):
        return key in self._shapes

    def shape(self, key):
        return self._shapes[key]

    def sources(self, key):
        """The checkpoint keys a canonical weight is read from."""
        return list(dict.fromkeys(source for source, _, _, _ in self._parts[key]))

    @property
    def decodes_on_read(self):
        """True when reading costs compute (GGUF): read bytes with `prefetch` on a reader thread, then `read`."""
        return getattr(self.ckpt, "decodes_on_read", False)

    def prefetch(self, key):
        """Fetch the stored bytes of canonical weight `key` (I/O only) for a later `read`."""
        for source in self.sources(key):
            self.ckpt.prefetch(source)

    def nbytes(self, key):
        """Stored bytes of a canonical weight (all its parts)."""
        return sum(self.ckpt.nbytes(s) for s in self.sources(key))

    def source_dtypes(self, key):
        """Stored formats of a canonical weight's parts ("BF16", "F8_E4M3", "Q8_0", "NVFP4", "MXFP8", ...)."""
        return {self.dequant.stored_format(s) for s in self.sources(key)}

    def read(self, key, rows=None, dtype=torch.float32, device=None):
        """Canonical weight `key` (or its rows `rows=(start, stop)`), dequantised, as `dtype` on `device`.

        dtype=None keeps the stored float dtype where no dequantisation is needed (float32 otherwise).
        """
        if key not in self._parts:
            raise CheckpointError(self.ckpt.path, "no such weight in this checkpoint", key)
        start, stop = rows if rows is not None else (0, self._shapes[key][0] if self._shapes[key] else 1)
        wanted = []  # (source, first source row, end source row) in canonical order
        for source, a, b, first in self._parts[key]:
            lo, hi = max(start, a), min(stop, b)
            if lo < hi:
                wanted.append((source, first + lo - a, first + hi - a))
        spans = read_spans(wanted)
        read = {span: self._read_rows(span[0], span[1], span[2], dtype, device) for span in spans.values()}
        pieces = []
        for piece in wanted:
            span = spans[piece]
            tensor = read[span]
            _, lo, hi = piece
            pieces.append(tensor if piece == span else tensor[lo - span[1]:hi - span[1]])
        if not pieces:
            return torch.empty((0,) + tuple(self._shapes[key][1:]), dtype=dtype or torch.float32, device=device)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)

    def _read_rows(self, source, lo, hi, dtype, device):
        """Rows lo:hi of one stored tensor, dequantised, as `dtype` (None: the stored float dtype)."""
        shape = self.dequant.shape(source)
        whole = (lo, hi) == (0, shape[0] if shape else 1)
        self.dequant.check_weight(source)
        if whole:
            tensor = self.ckpt.read(source, device=device)
        else:
            tensor = self.ckpt.read_rows(source, lo, hi, device=device)
        if self.dequant.is_packed(source):
            tensor = self.dequant.decode(source, tensor, None if whole else (lo, hi))
        if dtype is not None or self.dequant.is_quantized(source) or not tensor.dtype.is_floating_point:
            tensor = tensor.to(dtype or torch.float32)
        return self.dequant.apply(source, tensor, None if whole else (lo, hi))

    def close(self):
        self.ckpt.close()


def read_spans(wanted):
    """{(source, lo, hi) wanted: (source, lo, hi) read}: rows of one source wanted in several pieces (per-head
    interleaved q/k/v) are read as one span where the rows skipped between them are at most twice those
    kept; pieces far apart (the two ends of swapped halves) are read on their own, never the rows between."""
    spans, runs = {}, {}
    for source, lo, hi in sorted(wanted):
        run = runs.get(source)
        if run is not None and lo - run[2] <= 2 * (run[3] + hi - lo):
            run[2], run[3] = max(run[2], hi), run[3] + hi - lo
        else:
            run = runs[source] = [source, lo, hi, hi - lo]  # a run grows as pieces join: spans share it
        spans[(source, lo, hi)] = run
    return {piece: (run[0], run[1], run[2]) for piece, run in spans.items()}


def nonfinite_error(base, tuned, key):
    """The checkpoint holding NaN/Inf in canonical tensor `key`, as a CheckpointError naming file and tensor
    (or, when both are finite, the difference that overflowed)."""
    for view in (tuned, base):
        if not bool(torch.isfinite(view.read(key)).all()):
            return CheckpointError(view.path, "has NaN or Inf values", key)
    return CheckpointError(tuned.path, "difference with the base overflows to Inf", key)


def open_canonical(source, arch=None, token=None, role="the full base and fine-tuned models"):
    """open_checkpoint + CanonicalCheckpoint; closes the file if detection fails. `role`: what the caller
    needs the file to be, for the message when it is a LoRA."""
    ckpt = open_checkpoint(source, token)
    try:
        return CanonicalCheckpoint(ckpt, arch, role)
    except BaseException:
        ckpt.close()
        raise


def variant(view, targets):
    """What a checkpoint is, for messages: architecture, layout, width and number of target layers."""
    width = next((t.shape[1] for t in targets if t.kind == "linear" and t.component == "model"), None)
    size = f", width {width}" if width else ""
    return f"{view.detected.describe()}{size}, {len(targets)} target layers"


def pair(base, tuned, targets):
    """Check that `tuned` holds every target of `base` with the same shape; raise naming both files."""
    if base.arch.name != tuned.arch.name:
        raise CheckpointError(tuned.path, f"is {tuned.detected.describe()} but the base "
                                          f"{base.path} is {base.detected.describe()}")
    mismatched = [t for t in targets if t.key in tuned and tuple(tuned.shape(t.key)) != tuple(t.shape)]
    if mismatched:
        tuned_targets = tuned.arch.targets(tuned.shapes(), groups={t.group for t in targets} - {""})
        first = mismatched[0]
        raise CheckpointError(tuned.path, f"is {variant(tuned, tuned_targets)} but the base {base.path} is "
                                          f"{variant(base, targets)}: another variant of the model "
                                          f"({len(mismatched)} layers differ in shape, first {first.key} "
                                          f"{list(tuned.shape(first.key))} vs {list(first.shape)})")
    for target in targets:
        if target.key not in tuned:
            raise CheckpointError(tuned.path, "missing: the base has this layer", target.key)
    align_layouts(base, tuned)


def align_layouts(base, tuned):
    """Where a family stores one layout two ways with the same keys (MiniMax-H3's q/k/v, stacked or per
    head) and the pair's rows disagree at the family's probe, read one file the other way when that makes
    them agree, and note it on that view."""
    probe = base.arch.pair_probe(base.shapes())
    if probe is None or probe[0] not in tuned:
        return
    key, rows = probe

    def gap():
        b, t = base.read(key, rows=rows), tuned.read(key, rows=rows)
        return float((t - b).norm() / b.norm().clamp_min(1e-12))
    now = gap()
    if now < 0.5:
        return
    for view in (tuned, base):
        kept = view.detected
        for layout in view.arch.other_layouts(kept.layout):
            view.relayout(arch_registry.Detected(kept.arch, layout, kept.prefix))
            tried = gap()
            if tried < now / 4:
                view.notes.append(f"{view.path} is read as {view.detected.describe()}: only so do its rows "
                                  f"match the other model's ({now:.2f} of the weights' norm apart the other way, "
                                  f"{tried:.3f} so)")
                return
        view.relayout(kept)
