"""Bare module names with no prefix (what a hand-made or converted file often holds): read by the name
alone, alpha from `X.alpha` where there is one; written back as read."""

from .table import Spelling

SPELLING = Spelling(
    "bare", "bare module names", clients=("ComfyUI (some families)",), prefixes=(("", "model"),),
    namespace="own", detect=lambda layers, metadata, config: True)
