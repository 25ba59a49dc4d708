#!/usr/bin/env bash
# The device checks as one prepared script, for a GPU machine lent for minutes (run from the repository root):
# what the GPU is, the CUDA tests (the T4 path with the capability forced, pinned reads), the whole suite, then
# the full-size Z-Image pair factored on the GPU against the cold read and against its float32 path (a T4's).
#   bash bench/gpu_check.sh [BENCH_DIR]
set -u
dir="${1:-/tmp/lc_bench}"
nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
python -m pytest -q -p no:cacheprovider -rs tests/test_extract.py tests/test_checkpoint_io.py -k "cuda or gpu" || true
python -m pytest -q -p no:cacheprovider -x || true
python bench/extract.py --full-only --device cuda --full-repeats 1 --dir "$dir"
