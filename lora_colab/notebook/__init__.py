"""The notebook face: the cell functions the notebooks call (here, as `lora_colab.notebook.X`), their
forms (`widgets`), the live RAM/VRAM line (`monitor`), the demo and its synthetic pairs, and the Colab links.
May import every other room; nothing below imports it."""

from .cells import (IN_COLAB, Missing, download_href, jupyter_roots, offer_download, prepare_models,
                    prepare_resize_inputs, run_extract, run_resize, save_result, save_results, show_report,
                    show_resize, text_progress, unreachable_root, workdir)

__all__ = ["IN_COLAB", "Missing", "download_href", "jupyter_roots", "offer_download", "prepare_models",
           "prepare_resize_inputs", "run_extract", "run_resize", "save_result", "save_results", "show_report",
           "show_resize", "text_progress", "unreachable_root", "workdir"]
