"""What LoRA tensor names look like, whatever the trainer (kohya, PEFT, LyCORIS): the factor spellings, the
grouping of a file's names into layers, and whether a file is a LoRA at all. Names only; no file is read."""

import re
from dataclasses import dataclass, field

# (down suffix, up suffix) spellings of plain LoRA factors, longest first
FACTOR_SUFFIXES = (
    (".lora_A.default.weight", ".lora_B.default.weight"),
    (".lora_down.weight", ".lora_up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    ("_lora.down.weight", "_lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
)
_LYCORIS = re.compile(r"(.+?)\.(hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t2|lora_mid\.weight|diff|"
                      r"alpha|dora_scale|lora_magnitude_vector(?:\.weight)?|magnitude)$")
ATTACHED = ("alpha", "dora_scale", "magnitude")  # roles that belong to a layer found by its other tensors


@dataclass
class LoraLayer:
    """One module of a LoRA file: its kind ("lora", "tucker", "loha", "lokr", "diff") and raw tensors by role
    (`down`, `up`, `lora_mid`, `hada_w1_a`..., `alpha`; a DoRA magnitude as `dora_scale` (kohya, LyCORIS,
    OneTrainer: its shape tells the axis) or `magnitude` (PEFT's `lora_magnitude_vector`, ai-toolkit's
    `magnitude`: one per output row))."""

    name: str
    kind: str
    tensors: dict = field(default_factory=dict)  # role -> tensor key in the file
    suffixes: tuple = (".lora_down.weight", ".lora_up.weight")

    @property
    def has_alpha(self):
        return "alpha" in self.tensors

    @property
    def magnitude_key(self):
        """The tensor holding the layer's DoRA magnitude (PEFT's, else kohya's `dora_scale`), or None."""
        return self.tensors.get("magnitude") or self.tensors.get("dora_scale")


def is_lora_key(key):
    """True for a tensor name that only a LoRA file holds (factors, alpha, LyCORIS parts)."""
    return key.endswith(tuple(s for pair in FACTOR_SUFFIXES for s in pair)) or bool(_LYCORIS.fullmatch(key))


def looks_like_lora(keys):
    """True when most tensors of a file are LoRA tensors: it is a LoRA, not a checkpoint."""
    keys = list(keys)
    return bool(keys) and sum(map(is_lora_key, keys)) * 2 > len(keys)


def scan_layers(keys):
    """Group LoRA tensor names into layers; returns (layers by name, keys that belong to no layer)."""
    layers, used = {}, set()
    keyset = set(keys)
    for key in keys:
        for down_s, up_s in FACTOR_SUFFIXES:
            if key.endswith(down_s) and key[: -len(down_s)] + up_s in keyset:
                name = key[: -len(down_s)]
                layers[name] = LoraLayer(name, "lora", {"down": key, "up": name + up_s}, (down_s, up_s))
                used.update((key, name + up_s))
                break
    for key in keys:
        if key in used:
            continue
        hit = _LYCORIS.fullmatch(key)
        if not hit:
            continue
        name, role = hit.groups()
        role = _role(role)
        layer = layers.get(name)
        if layer is None:
            if role in ATTACHED:
                continue  # attached below, once the layer is known
            layer = layers[name] = LoraLayer(name, "unknown")
        layer.tensors[role] = key
        used.add(key)
    for key in keys:  # alpha / DoRA magnitude of layers found above
        hit = _LYCORIS.fullmatch(key)
        if hit and hit.group(1) in layers and _role(hit.group(2)) in ATTACHED:
            layers[hit.group(1)].tensors[_role(hit.group(2))] = key
            used.add(key)
    for layer in layers.values():
        roles = set(layer.tensors)
        if layer.kind == "lora" and "lora_mid" in roles:
            layer.kind = "tucker"
        elif layer.kind == "unknown":
            layer.kind = ("loha" if "hada_w1_a" in roles else "lokr" if any(r.startswith("lokr") for r in roles)
                          else "diff" if "diff" in roles else "unknown")
        if not _complete(layer.kind, roles):
            layer.kind = "unknown"  # its tensors pass through unchanged
    unknown = [k for k in keys if k not in used]
    return {n: l for n, l in layers.items() if l.kind != "unknown"}, unknown + [
        k for l in layers.values() if l.kind == "unknown" for k in l.tensors.values()]


def _role(suffix):
    if suffix.startswith(("lora_magnitude_vector", "magnitude")):
        return "magnitude"
    return suffix.replace(".weight", "")


def _complete(kind, roles):
    if kind == "loha":
        return {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= roles
    if kind == "lokr":
        return (("lokr_w1" in roles or {"lokr_w1_a", "lokr_w1_b"} <= roles)
                and ("lokr_w2" in roles or {"lokr_w2_a", "lokr_w2_b"} <= roles))
    return True
