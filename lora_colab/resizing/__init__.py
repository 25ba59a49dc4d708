"""Resizing: existing LoRAs decomposed once (QR core) and cut to what each recipe keeps, scored against
the LoRA itself and against the base checkpoint's own weights (`base_refs`), resumable (`journal`). The door
(`resizer.resize`) parses its inputs once (`inputs`: each LoRA argument a `LoraInput` of weighted sources;
recipes as `Recipe`s; `ResizeOptions`); `merge` joins several, `output` writes a layer in a spelling,
`convert` re-spells whole. Imports the low-rank core, LoRA files, architectures and io; not extraction or
notebooks."""
