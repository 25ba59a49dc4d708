"""Fallback for unknown models: every 2-D weight (and k×k conv with a conv rank) outside norms/embeddings."""

import re

from .common import MODEL_PREFIXES, NativeArchitecture, Target

_SKIP = re.compile(r"(^|[._])(norm|ln|embed|embedding|embeddings|embed_tokens|token_embedding|pos_embed)"
                   r"([._\d]|$)", re.IGNORECASE)


class Generic(NativeArchitecture):
    name = "generic"
    title = "generic"
    auto_format = "comfy"
    default_dtype = "fp16"
    resolution = None
    base_model_version = "unknown"
    modelspec_architecture = "unknown/lora"
    implementation = ""
    lora_hint = re.compile(r"$^")
    metadata_tags = ()

    def detect(self, keys):
        for prefix in MODEL_PREFIXES:
            if keys and all(k.startswith(prefix) for k in keys):
                return "unknown", prefix
        return "unknown", ""

    def targets(self, shapes, groups=frozenset(), conv=False, text_encoders=True):
        found = []
        for key, shape in shapes.items():
            if not key.endswith(".weight") or _SKIP.search(key[: -len(".weight")]):
                continue
            module = key[: -len(".weight")]
            if len(shape) == 2:
                found.append(Target(key, module, tuple(shape)))
            elif len(shape) == 4 and tuple(shape[2:]) == (1, 1):
                found.append(Target(key, module, tuple(shape), conv1x1=True))
            elif len(shape) == 4 and conv:
                found.append(Target(key, module, tuple(shape), kind="conv", group="conv"))
        return found
