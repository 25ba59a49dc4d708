"""LoRA files: the formats and their module names (`formats`), reading any LoRA (`files`), the atomic
streaming writers (`writer`), the resume journal (`journal`) and what `inspect` says of a file. Imports
architectures and io."""
