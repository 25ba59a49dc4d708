"""ipywidgets forms (7.7 as Colab ships it, and 8) that yield plain config objects.

A form shows its widgets; `config()` reads their current values, so a headless run (nbval, papermill)
uses the defaults and no click is ever required. Every control has the same label width and control width,
so the form lines up and fits Colab's output column."""

from ..configs import PRESETS, RESIZE_PRESETS, SCORE_HELP, ExtractConfig, ResizeConfig, build_recipe
from ..lowrank.recipes import SCORE_KEYS, parse_recipes

LABEL_WIDTH = "170px"
CONTROL_WIDTH = "460px"


def _w():
    import ipywidgets
    return ipywidgets


def widgets_available():
    """Whether ipywidgets can be imported (Colab has it; local Jupyter needs `lora_colab[colab]`)."""
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


class DefaultsForm:
    """Stands in for a form where ipywidgets is missing: one line on how to get it, and the default options,
    so the later cells still run."""

    def __init__(self, config):
        self._config = config

    def show(self):
        print("the options form needs ipywidgets, which is not installed here: run %pip install "
              "'lora_colab[colab]' in a cell and restart the kernel; until then the default options are used")
        return self

    def apply_preset(self, name):
        raise RuntimeError("no form without ipywidgets: pip install 'lora_colab[colab]'")

    def config(self):
        return self._config


def _layout(width=CONTROL_WIDTH):
    return _w().Layout(width=width)


def _style():
    return {"description_width": LABEL_WIDTH}


def _control(cls, description, **kwargs):
    """A widget with the form's label and control widths."""
    return cls(description=description, style=_style(), layout=_layout(), **kwargs)


def _check(description, value):
    """A checkbox whose label sits where the other controls start (its text after the box)."""
    return _w().Checkbox(value=value, description=description, indent=True, style=_style(), layout=_layout())


def _tooltip(text):
    """A hover text, spelled as this ipywidgets version spells it (7: description_tooltip, 8: tooltip)."""
    return {"tooltip" if int(_w().__version__.split(".")[0]) >= 8 else "description_tooltip": text}


def _note(text):
    return _w().HTML(f"<div style='margin-left:calc({LABEL_WIDTH} + 8px);max-width:{CONTROL_WIDTH};font-size:90%;"
                     f"color:#555'>{text}</div>")


class ExtractForm:
    """Rank, alpha, strength, clamp, LoCon, text encoders, bias/norm changes, format, dtype, device, recipe,
    and presets."""

    def __new__(cls, config=None):
        if not widgets_available():
            return DefaultsForm(config or ExtractConfig())
        return super().__new__(cls)

    def __init__(self, config=None):
        w = _w()
        c = config or ExtractConfig()
        self.preset = _control(w.Dropdown, "preset", options=["custom"] + list(PRESETS), value="custom")
        self.rank = _control(w.IntSlider, "rank", value=c.rank, min=1, max=256)
        self.alpha = _control(w.FloatText, "alpha", value=c.alpha)
        self.scale = _control(w.FloatSlider, "strength (scale)", value=c.scale, min=0.05, max=2.0, step=0.05)
        self.clamp = _control(w.BoundedFloatText, "clamp quantile", value=c.clamp_quantile, min=0.5, max=1.0,
                              step=0.001)
        self.conv_rank = _control(w.IntText, "conv rank (0 = off)", value=c.conv_rank)
        self.conv_alpha = _control(w.FloatText, "conv alpha (0 = rank)", value=c.conv_alpha)
        self.text_encoders = _check("text encoders (SD/SDXL)", c.text_encoders)
        self.bias_diff = _check("bias and norm changes", c.bias_diff)
        self.format = _control(w.Dropdown, "format", options=["auto", "kohya", "comfy", "diffusers"], value=c.format)
        self.dtype = _control(w.Dropdown, "dtype", options=["auto", "bf16", "fp16", "fp32"], value=c.dtype)
        self.device = _control(w.Dropdown, "device", options=["auto", "cuda", "cpu"], value=c.device)
        self.recipe = _control(w.Text, "recipe (optional)", value=c.recipe, placeholder="e.g. spn_ckpt=1,size=50")
        self.output_name = _control(w.Text, "output file", value=c.output_name)
        self.preset.observe(self._apply_preset, names="value")
        self.box = w.VBox([
            self.preset, self.rank, self.alpha, self.scale,
            self.clamp, _note("1 turns the clamp off; 0.99 cuts the top 1% outlier rows/columns."),
            self.conv_rank, self.conv_alpha, self.text_encoders,
            self.bias_diff, _note("written as .diff_b/.diff where every client of the format loads them."),
            self.format, self.dtype, self.device,
            self.recipe, _note("chooses each layer's rank (up to rank) as the resizer does; empty: every layer at "
                               "rank."),
            self.output_name])

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


_SELECTIONS = {"thr": ("threshold (log10 score)", -1.2), "size": ("target size (MiB)", 50.0)}


class ResizeForm:
    """Presets in plain words, a recipe builder (what each score compares with, then a threshold or a size)
    feeding an editable list of recipes."""

    def __new__(cls, config=None):
        if not widgets_available():
            return DefaultsForm(config or ResizeConfig())
        return super().__new__(cls)

    def __init__(self, config=None):
        w = _w()
        c = config or ResizeConfig()
        self.preset = _control(w.Dropdown, "preset", options=["custom"] + list(RESIZE_PRESETS), value="custom")
        self.weights = {key: _control(w.FloatText, key, value=1.0 if key == "spn_ckpt" else 0.0,
                                      **_tooltip(SCORE_HELP[key])) for key in SCORE_KEYS}
        self.selection = _control(w.Dropdown, "keep directions by",
                                  options=[("score threshold", "thr"), ("target file size", "size")], value="thr")
        self.value = _control(w.FloatText, _SELECTIONS["thr"][0], value=-1.2)
        self.add = w.Button(description="add recipe", layout=w.Layout(margin=f"4px 0 4px {LABEL_WIDTH}"))
        self.recipes = _control(w.Textarea, "recipes (one per line)", value=c.recipes.replace(":", "\n"))
        self.recipes.layout.height = "6em"
        self.dtype = _control(w.Dropdown, "dtype", options=["auto", "16", "32", "bf16"], value=c.dtype)
        self.device = _control(w.Dropdown, "device", options=["auto", "cuda", "cpu"], value=c.device)
        self.to = _control(w.Dropdown, "write for", value=c.to,
                           options=[("the LoRA's own spelling", "input"), ("kohya / A1111 / Forge", "kohya"),
                                    ("ComfyUI", "comfy"), ("diffusers", "diffusers"), ("PEFT folder", "peft")])
        self.add.on_click(lambda _: self.add_recipe())
        self.preset.observe(self._apply_preset, names="value")
        self.selection.observe(self._relabel, names="value")
        help_rows = "".join(f"<tr><td><code>{k}</code></td><td>{v}</td></tr>" for k, v in SCORE_HELP.items())
        self.box = w.VBox(
            [self.preset, _note("a preset replaces the recipes below; or build one:")]
            + list(self.weights.values())
            + [_note("each direction's score is log10(σ) minus, for each weight above, weight × log10 of what it "
                     f"is compared with:<table>{help_rows}</table>"),
               self.selection, self.value, self.add, self.recipes, self.dtype, self.device, self.to])

    def _apply_preset(self, change):
        recipe = RESIZE_PRESETS.get(change["new"])
        if recipe:
            self.recipes.value = recipe

    def _relabel(self, change):
        label, default = _SELECTIONS[change["new"]]
        self.value.description, self.value.value = label, default

    def built_recipe(self):
        """The recipe the builder's fields describe."""
        return build_recipe({k: v.value for k, v in self.weights.items()}, self.selection.value, self.value.value)

    def add_recipe(self):
        lines = [line for line in self.recipes.value.splitlines() if line.strip()]
        self.recipes.value = "\n".join(lines + [self.built_recipe()])

    def config(self):
        text = ":".join(line.strip() for line in self.recipes.value.replace(":", "\n").splitlines() if line.strip())
        parse_recipes(text)  # a bad recipe is reported here, quoting it
        return ResizeConfig(recipes=text, dtype=self.dtype.value, device=self.device.value, to=self.to.value)

    def show(self):
        from IPython.display import display
        display(self.box)
        return self
