"""ipywidgets forms (7.7 as Colab ships it, and 8) that yield plain config objects.

A form shows its widgets; `config()` reads their current values, so a headless run (nbval, papermill)
uses the defaults and no click is ever required."""

from .configs import PRESETS, ExtractConfig, ResizeConfig, build_recipe
from .recipes import SCORE_KEYS, parse_recipes

_STYLE = {"description_width": "initial"}


def _w():
    import ipywidgets
    return ipywidgets


class ExtractForm:
    """Rank, alpha, strength, clamp, LoCon, text encoders, format, dtype, device, and presets."""

    def __init__(self, config=None):
        w = _w()
        c = config or ExtractConfig()
        self.preset = w.Dropdown(options=["custom"] + list(PRESETS), value="custom", description="preset",
                                 style=_STYLE)
        self.rank = w.IntSlider(value=c.rank, min=1, max=256, description="rank", style=_STYLE)
        self.alpha = w.FloatText(value=c.alpha, description="alpha", style=_STYLE)
        self.scale = w.FloatSlider(value=c.scale, min=0.05, max=2.0, step=0.05, description="strength (scale)",
                                   style=_STYLE)
        self.clamp = w.FloatSlider(value=c.clamp_quantile, min=0.9, max=1.0, step=0.001, readout_format=".3f",
                                   description="clamp quantile (1 = off)", style=_STYLE)
        self.conv_rank = w.IntText(value=c.conv_rank, description="conv rank (0 = off)", style=_STYLE)
        self.conv_alpha = w.FloatText(value=c.conv_alpha, description="conv alpha (0 = rank)", style=_STYLE)
        self.text_encoders = w.Checkbox(value=c.text_encoders, description="text encoders (SD/SDXL)")
        self.bias_diff = w.Checkbox(value=c.bias_diff, description="bias and norm changes (.diff_b/.diff, where "
                                                                   "every client of the format loads them)")
        self.format = w.Dropdown(options=["auto", "kohya", "comfy", "diffusers"], value=c.format,
                                 description="format", style=_STYLE)
        self.dtype = w.Dropdown(options=["auto", "bf16", "fp16", "fp32"], value=c.dtype, description="dtype",
                                style=_STYLE)
        self.device = w.Dropdown(options=["auto", "cuda", "cpu"], value=c.device, description="device",
                                 style=_STYLE)
        self.recipe = w.Text(value=c.recipe, placeholder="e.g. spn_ckpt=1,size=50 (empty: every layer at rank)",
                             description="recipe (rank = its cap)", style=_STYLE, layout=w.Layout(width="60%"))
        self.output_name = w.Text(value=c.output_name, description="output file", style=_STYLE)
        self.preset.observe(self._apply_preset, names="value")
        self.box = w.VBox([self.preset, self.rank, self.alpha, self.scale, self.clamp, self.conv_rank,
                           self.conv_alpha, self.text_encoders, self.bias_diff, self.format, self.dtype, self.device,
                           self.recipe, self.output_name])

    def _apply_preset(self, change):
        values = PRESETS.get(change["new"])
        if values:
            self.rank.value, self.alpha.value, self.scale.value = values["rank"], values["alpha"], values["scale"]

    def apply_preset(self, name):
        """Select a preset by name (what choosing it in the dropdown does)."""
        self.preset.value = name

    def config(self):
        return ExtractConfig(rank=self.rank.value, alpha=self.alpha.value, scale=self.scale.value,
                             clamp_quantile=self.clamp.value, conv_rank=self.conv_rank.value,
                             conv_alpha=self.conv_alpha.value, text_encoders=self.text_encoders.value,
                             bias_diff=self.bias_diff.value, recipe=self.recipe.value,
                             format=self.format.value, dtype=self.dtype.value, device=self.device.value,
                             output_name=self.output_name.value)

    def show(self):
        from IPython.display import display
        display(self.box)
        return self


class ResizeForm:
    """A recipe builder (score weights + thr or size) feeding an editable list of recipes."""

    def __init__(self, config=None):
        w = _w()
        c = config or ResizeConfig()
        self.weights = {key: w.FloatText(value=1.0 if key == "spn_ckpt" else 0.0, description=key, style=_STYLE)
                        for key in SCORE_KEYS}
        self.selection = w.Dropdown(options=[("threshold (log10)", "thr"), ("target size (MiB)", "size")],
                                    value="thr", description="select by", style=_STYLE)
        self.value = w.FloatText(value=-1.2, description="value", style=_STYLE)
        self.add = w.Button(description="add recipe")
        self.recipes = w.Textarea(value=c.recipes, description="recipes (one per line)", style=_STYLE,
                                  layout=w.Layout(width="95%", height="6em"))
        self.dtype = w.Dropdown(options=["auto", "16", "32", "bf16"], value=c.dtype, description="dtype",
                                style=_STYLE)
        self.device = w.Dropdown(options=["auto", "cuda", "cpu"], value=c.device, description="device",
                                 style=_STYLE)
        self.add.on_click(lambda _: self.add_recipe())
        self.box = w.VBox(list(self.weights.values()) + [self.selection, self.value, self.add, self.recipes,
                                                          self.dtype, self.device])

    def built_recipe(self):
        """The recipe the builder's fields describe."""
        return build_recipe({k: v.value for k, v in self.weights.items()}, self.selection.value, self.value.value)

    def add_recipe(self):
        lines = [line for line in self.recipes.value.splitlines() if line.strip()]
        self.recipes.value = "\n".join(lines + [self.built_recipe()])

    def config(self):
        text = ":".join(line.strip() for line in self.recipes.value.replace(":", "\n").splitlines() if line.strip())
        parse_recipes(text)  # a bad recipe is reported here, quoting it
        return ResizeConfig(recipes=text, dtype=self.dtype.value, device=self.device.value)

    def show(self):
        from IPython.display import display
        display(self.box)
        return self
