"""Root pytest set-up: notebooks run headless in a throw-away working folder."""

import os
import tempfile

os.environ.setdefault("LORA_COLAB_WORKDIR", tempfile.mkdtemp(prefix="lora_colab_nb_"))
os.environ.setdefault("MPLBACKEND", "Agg")
