"""Root pytest set-up: notebooks run headless in a throw-away working folder, removed after the run."""

import atexit
import os
import shutil
import tempfile

if "LORA_COLAB_WORKDIR" not in os.environ:
    os.environ["LORA_COLAB_WORKDIR"] = tempfile.mkdtemp(prefix="lora_colab_nb_")
    atexit.register(shutil.rmtree, os.environ["LORA_COLAB_WORKDIR"], ignore_errors=True)
os.environ.setdefault("MPLBACKEND", "Agg")
