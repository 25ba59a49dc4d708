"""Extraction: a LoRA from the difference of two checkpoints, one layer at a time. `extractor` is the door
(`extract`: options checked into a frozen `options.ExtractOptions`), `run` the pass in its stages (plan the
targets, open and check the pair, per layer read the difference, factor or collect, write; finish),
`differences` each layer's tuned − base read ahead, `layer` one layer's factors, `components` a pipeline's other
models that take a LoRA file of their own, `recipe` base-aware ranks chosen with the resizer's grammar in the
same pass, `bias_diff` the bias/norm patches, `report` what it did. Imports the low-rank core, LoRA files,
architectures and io; not resizing or notebooks."""
