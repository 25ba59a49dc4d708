"""Extraction: a LoRA from the difference of two checkpoints, one layer at a time. `extractor` runs the
pass (reading each layer's difference, factoring each written module, journaling, writing), `recipe`
chooses ranks with the resizer's grammar in the same pass, `bias_diff` the bias/norm patches, `report`
what it did. Imports the low-rank core, LoRA files, architectures and io; not resizing or notebooks."""
