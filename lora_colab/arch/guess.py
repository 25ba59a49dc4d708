"""Which family a LoRA file was made for, from its metadata or its module names."""


def guess_family(architectures, names, metadata=None):
    """Title of the one of `architectures` a LoRA was made for, from its metadata or its module names ("unknown").

    Module names are compared flattened (`.` as `_`, prefixes kept), against each architecture's
    `lora_hint` pattern; metadata (`modelspec.architecture`, `ss_base_model_version`) wins when it names one.
    """
    metadata = metadata or {}
    said = " ".join(str(metadata.get(k, "")) for k in ("modelspec.architecture", "ss_base_model_version")).lower()
    for arch in architectures:
        if said.strip() and any(tag in said for tag in arch.metadata_tags):
            return arch.title
    flat = [name.replace(".", "_") for name in names]
    counts = {arch.title: sum(bool(arch.lora_hint.search(name)) for name in flat)
              for arch in architectures}
    best = max(counts, key=counts.get) if counts else None
    return best if best and counts[best] else "unknown"
