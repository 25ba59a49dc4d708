"""Plain configuration objects that the notebook forms produce and the API consumes."""

from dataclasses import asdict, dataclass

# presets named after what they do: the effect at weight 1.0 is scale × the extracted difference
PRESETS = {
    "subtle: rank 32, half strength": dict(rank=32, alpha=16.0, scale=0.5),
    "strong: rank 32, full strength": dict(rank=32, alpha=32.0, scale=1.0),
    "detailed: rank 64, half strength": dict(rank=64, alpha=32.0, scale=0.5),
}

# resize presets, in the user's words -> recipe
RESIZE_PRESETS = {
    "balanced: keep what is large next to the base's own layer": "spn_ckpt=1,thr=-1.2",
    "smaller file: keep what differs from the base": "subspace=1,spn_ckpt=0.5,thr=-0.8",
    "fixed size: the best 50 MiB": "spn_ckpt=1,size=50",
    "kohya-style: 90% of the LoRA's own energy": "sv_fro=0.9",
    "fixed rank 16": "rank=16",
}

# what each score term means, for the resize form
SCORE_HELP = {
    "spn_ckpt": "vs the base layer's largest singular value (its strongest direction)",
    "fro_ckpt": "vs the base layer's overall size (Frobenius norm)",
    "subspace": "vs what the base already does along that direction (favours what differs)",
    "spn_lora": "vs the LoRA layer's own largest direction",
    "fro_lora": "vs the LoRA layer's overall size",
    "params": "per parameter it costs (favours cheap layers)",
}


@dataclass
class ExtractConfig:
    """Everything `extract` needs besides the two models."""

    rank: int = 32
    alpha: float = 32.0
    scale: float = 1.0
    clamp_quantile: float = 0.99  # 1.0 = off
    conv_rank: int = 0            # 0 = no LoCon
    conv_alpha: float = 0.0       # 0 = conv_rank
    text_encoders: bool = True
    bias_diff: bool = True        # biases/norms as .diff_b/.diff where every client of the format loads them
    format: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    recipe: str = ""              # "" = every layer at `rank`; else e.g. "spn_ckpt=1,size=50" (rank = the cap)
    output_name: str = "extracted_lora.safetensors"

    def extract_kwargs(self):
        """Keyword arguments for lora_colab.extract (a recipe with its own rank= sets the rank)."""
        from .lowrank.recipes import parse_recipe

        recipe = self.recipe.strip() or None
        return dict(rank=None if recipe and parse_recipe(recipe).rank else self.rank, alpha=self.alpha or None, scale=self.scale,
                    clamp_quantile=None if self.clamp_quantile >= 1.0 else self.clamp_quantile,
                    conv_rank=self.conv_rank or None, conv_alpha=self.conv_alpha or None,
                    text_encoders=self.text_encoders, format=self.format, bias_diff=None if self.bias_diff else False,
                    dtype=None if self.dtype == "auto" else self.dtype, device=self.device,
                    recipe=recipe)

    def to_dict(self):
        return asdict(self)

    def describe(self):
        """The settings in one line, as a person reads them."""
        clamp = "off" if self.clamp_quantile >= 1.0 else f"{self.clamp_quantile:g}"
        conv = f", conv rank {self.conv_rank}" if self.conv_rank else ""
        biases = "" if self.bias_diff else ", no bias/norm changes"
        if self.recipe.strip():
            biases += f", recipe {self.recipe.strip()} (rank cap {self.rank})"
        return (f"rank {self.rank}, alpha {self.alpha:g}, strength {self.scale:g}, clamp {clamp}{conv}{biases}, "
                f"format {self.format}, dtype {self.dtype}, device {self.device}")


@dataclass
class ResizeConfig:
    """Everything `resize` needs besides the checkpoint and the LoRAs."""

    recipes: str = "spn_ckpt=1,thr=-1.2"
    dtype: str = "auto"
    device: str = "auto"
    verbose: int = 1
    to: str = "input"  # the output's spelling: "input" (the LoRA's own), kohya, comfy, diffusers or peft

    def describe(self):
        spelling = "" if self.to == "input" else f", written for {self.to}"
        return f"recipes {self.recipes}, dtype {self.dtype}, device {self.device}{spelling}"

    def resize_kwargs(self):
        return dict(recipes=self.recipes, dtype=None if self.dtype == "auto" else self.dtype, device=self.device,
                    to=None if self.to == "input" else self.to)


def build_recipe(weights, selection="thr", value=-1.2, rescale=1.0):
    """A recipe string from score weights ({"spn_ckpt": 1.0, ...}), a selection ("thr"/"size") and its value."""
    parts = [f"{key}={weight:g}" for key, weight in weights.items() if weight]
    if not parts:
        raise ValueError("give at least one score weight")
    parts.append(f"{selection}={value:g}")
    if rescale != 1.0:
        parts.append(f"rescale={rescale:g}")
    return ",".join(parts)
