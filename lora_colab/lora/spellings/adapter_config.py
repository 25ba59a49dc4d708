"""PEFT's adapter config as a LoRA's scale: `lora_alpha / r` (or `/ √r` with rslora), per module through
`rank_pattern` / `alpha_pattern` matched as PEFT matches them; read from diffusers' `lora_adapter_metadata`
(prefixed by component, or not) or a `save_pretrained` folder's `adapter_config.json`, and written back
describing the file as written."""

import collections
import json
import math
import re
from dataclasses import dataclass, field

METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry
CONFIG_NAME = "adapter_config.json"      # a PEFT save_pretrained folder's config


def pattern_key(patterns, path):
    """The first key of `patterns` that names module `path`, as PEFT's get_pattern_key matches it (a key
    matches the whole path or a `.`-separated tail of it; keys are regular expressions), else None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None


@dataclass
class AdapterConfig:
    """One model's LoRA config as PEFT reads it."""

    r: int = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    fields: dict = field(default_factory=dict)  # everything else, kept as read

    @classmethod
    def from_dict(cls, data):
        data = dict(data)
        known = {k: data.pop(k) for k in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")
                 if k in data}
        config = cls(fields=data)
        config.r = int(known.get("r") or 8)
        config.lora_alpha = float(known.get("lora_alpha") or config.r)
        config.use_rslora = bool(known.get("use_rslora") or False)
        config.rank_pattern = dict(known.get("rank_pattern") or {})
        config.alpha_pattern = dict(known.get("alpha_pattern") or {})
        return config

    def rank_of(self, path):
        key = pattern_key(self.rank_pattern, path)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_of(self, path):
        key = pattern_key(self.alpha_pattern, path)
        return float(self.alpha_pattern[key]) if key is not None else self.lora_alpha

    def scale(self, path):
        """PEFT's scaling of module `path`: lora_alpha / r, or lora_alpha / √r with rslora."""
        r = self.rank_of(path)
        return self.alpha_of(path) / (math.sqrt(r) if self.use_rslora else r)

    @property
    def use_dora(self):
        return bool(self.fields.get("use_dora"))


def described(previous, ranks, dora=False):
    """The config of a file whose modules have `ranks` ({module path: rank}) and whose factors carry their
    whole scale (alpha = rank everywhere, no rslora), naming exactly those modules: `previous`'s other
    fields kept (or None)."""
    counts = collections.Counter(ranks.values())
    r = counts.most_common(1)[0][0] if counts else 1
    pattern = {"^" + path: rank for path, rank in ranks.items() if rank != r}  # ^: this module only
    data = dict(previous.fields) if previous is not None else {}
    data.update(r=r, lora_alpha=r, use_rslora=False, rank_pattern=pattern, alpha_pattern=dict(pattern),
                target_modules=sorted(ranks))  # the modules the file holds: a pattern would add empty ones
    data["use_dora"] = bool(dora)
    data.setdefault("peft_type", "LORA")
    return data


def read_metadata(metadata):
    """{component prefix ("" when unprefixed): AdapterConfig} from diffusers' `lora_adapter_metadata`
    entry, or {} when there is none or it is not JSON."""
    text = (metadata or {}).get(METADATA_KEY)
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    if "r" in data or "lora_alpha" in data:
        return {"": AdapterConfig.from_dict(data)}
    grouped = {}
    for key, value in data.items():
        prefix, _, name = key.rpartition(".")
        if prefix:
            grouped.setdefault(prefix, {})[name] = value
    return {prefix: AdapterConfig.from_dict(values) for prefix, values in grouped.items()}


def write_metadata(configs):
    """diffusers' `lora_adapter_metadata` text for {component prefix: config dict} ("" = unprefixed)."""
    flat = {}
    for prefix, data in configs.items():
        for key, value in data.items():
            flat[f"{prefix}.{key}" if prefix else key] = sorted(value) if isinstance(value, set) else value
    return json.dumps(flat, indent=2, sort_keys=True)
