"""Resizing: existing LoRAs decomposed once (QR core) and cut to what each recipe keeps, scored against
the LoRA itself and against the base checkpoint's own weights (`base_refs`), resumable (`journal`).
Imports the low-rank core, LoRA files, architectures and io; not extraction or notebooks."""
