"""The low-rank core shared by extraction and resizing: the factorisation (`factor`: randomized SVD,
blocked differences, spectral norms, the clamp), the scoring and selection of directions (`selection`) and
the recipe grammar (`recipes`). Imports only `io` (buffers, a planned file's size, temporary names): the math
depends on no file format."""
