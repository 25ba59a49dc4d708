"""Every family × spelling through ComfyUI's own LoRA loader, at a pinned commit, against the planted change.

    git clone <a ComfyUI snapshot> /somewhere/ComfyUI          # e.g. yzkee/ComfyUI at 783545f; never committed here
    pip install comfy-aimdo==0.4.13 comfy-kitchen==0.2.31 einops torchsde scipy psutil sentencepiece pyyaml \
        simpleeval blake3 accelerate                           # what comfy.sd imports (in a venv of its own);
                                                               # accelerate builds ACE-Step 1.5's model
    python bench/comfy_check.py --comfyui /somewhere/ComfyUI [--family hunyuan_video15] [--spelling kohya]

For each family its full native layout (tests/layouts, the real names and shapes) is detected by ComfyUI
(`model_detection.model_config_from_unet`) and its model built on the meta device (no memory). The LoRA the
extractor writes for that layout in each spelling is built with the writer's own names (`pieces`,
`piece_specs`, `piece_tensors`, and the `.diff`/`.diff_b` patches of the biases and norms where the spelling
writes them) and handed to `comfy.sd.load_lora_for_models`, exactly as ComfyUI's LoraLoader node does: every
tensor ComfyUI leaves out ("lora key not loaded", "NOT LOADED") is counted. Then the targets of each block's
first instance and every target outside blocks get real weights and a planted rank-4 change: their factors
are written as the extractor writes them, and ComfyUI's `calculate_weight` patches the real weight; the
largest relative error against base + change is printed (the other targets are patched on meta tensors, which
checks every shape). Each row also says whether tests/comfy_rules.py (the suite's restatement of these rules)
agrees, module by module, on what loads.

Media packages ComfyUI imports for other models (torchvision, torchaudio, av, ...) are stubbed: the LoRA path
does not use them.
"""

import argparse
import importlib.abc
import importlib.machinery
import json
import logging
import math
import re
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_arch import KeysOnly  # noqa: E402 (names and shapes only, as the suite reads the layouts)
from test_diffusers_loading import WarningCatcher  # noqa: E402
sys.path.insert(0, str(ROOT / "bench"))
from _common import NATIVE_LAYOUTS, layout, layout_metadata  # noqa: E402

FAMILIES = {**NATIVE_LAYOUTS, "ltx2@2.5": "ltx2.5-native"}  # family (or family@release) -> its native layout
SPELLINGS = ("comfy", "kohya", "diffusers")
RANK, ALPHA = 4, 1.0


class _Anything(types.ModuleType):
    """A stand-in module: any attribute is a do-nothing class."""

    __path__ = []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__init__": lambda self, *a, **k: None, "__call__": lambda self, *a, **k: None})


class _Stubs(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    roots = ("torchvision", "torchaudio", "av", "spandrel", "kornia")

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Anything(spec.name)

    def exec_module(self, module):
        pass


def import_comfy(folder):
    """ComfyUI's modules from `folder`, on the CPU."""
    sys.path.insert(0, str(folder))
    sys.meta_path.insert(0, _Stubs())
    argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401
    import comfy.lora
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sd
    sys.argv = argv
    return comfy


class Captured(WarningCatcher):
    """ComfyUI's warnings and errors (`messages`) while it loads or patches: a context manager on the root logger."""

    def __enter__(self):
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeHandler(self)


def meta_model(config, unet):
    """ComfyUI's model of `config` with its parameters on the meta device (ACE-Step 1.5's quantizer computes with
    its buffers as it is built: there only the parameters go to meta)."""
    if type(config).__name__ != "ACEStep15":
        return config.get_model(unet, "", device=torch.device("meta"))
    from accelerate import init_empty_weights
    with init_empty_weights():
        return config.get_model(unet, "")


def comfy_model(comfy, shapes, prefix, metadata=None):
    """ComfyUI's model of a full layout (its keys under `prefix`) on the meta device in a ModelPatcher, and the
    model's class name."""
    sd = {"model.diffusion_model." + k[len(prefix):]: torch.empty(s, device="meta", dtype=torch.bfloat16)
          for k, s in shapes.items() if k.startswith(prefix)}
    prefix = "model.diffusion_model."  # where ComfyUI finds a full checkpoint's model
    config = comfy.model_detection.model_config_from_unet(sd, prefix, metadata=metadata)
    if config is None:
        raise RuntimeError("ComfyUI does not detect this layout as a model it knows")
    unet = config.process_unet_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    model = meta_model(config, unet)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    clip = None
    if any(k.startswith("conditioner.") or k.startswith("cond_stage_model.") for k in shapes):  # SD's own encoders
        with torch.device("meta"):
            clip = config.clip_target(sd).clip(device=torch.device("meta"), dtype=torch.float32)
    return patcher, clip, type(model).__name__


def load_lora(comfy, patcher, clip, lora):
    """comfy.sd.load_lora_for_models, step for step (the CLIP model's own ModelPatcher takes a patch where the
    key is one of its weights: the same test here); returns (the patched ModelPatcher, the lines it logs)."""
    with Captured() as log:
        if clip is None:
            new, _ = comfy.sd.load_lora_for_models(patcher, None, dict(lora), 1.0, 0.0)
            return new, log.messages
        key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
        key_map = comfy.lora.model_lora_keys_clip(clip, key_map)
        loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(lora)), key_map)
        new = patcher.clone()
        k, k1 = set(new.add_patches(loaded, 1.0)), set(clip.state_dict()) & set(loaded)
        for x in loaded:
            if x not in k and x not in k1:
                logging.warning("NOT LOADED {}".format(x))
        return new, log.messages


REAL_TARGETS, REAL_ELEMENTS = 8, 160 << 20


def sampled(targets):
    """The targets checked with real numbers: of each block list's first block and outside blocks, one of each
    module name, the smallest first, 8 in all (each is made, patched and dropped in turn: a few GB at most)."""
    first = sorted((t for t in targets if math.prod(t.shape) <= REAL_ELEMENTS and t.component == "model"
                    and all(n == "0" for n in re.findall(r"\.(\d+)\.", "." + t.key))),
                   key=lambda t: math.prod(t.shape))
    kinds = {}
    for target in first:
        kinds.setdefault(re.sub(r"\d+", "N", target.key), target)
    return list(kinds.values())[:REAL_TARGETS]


def planted(target, gen):
    """A target's planted rank-4 change (up, down), float32."""
    rows, cols = target.shape[0], math.prod(target.shape[1:])
    return torch.randn(rows, RANK, generator=gen) / math.sqrt(rows), torch.randn(RANK, cols, generator=gen) * 0.05


def base_weight(target):
    """The target's base weight (made again when needed: only one is held at a time)."""
    return torch.randn(target.shape, generator=torch.Generator().manual_seed(len(target.key))) * 0.02


def lora_of(arch, fmt, targets, real, gen):
    """The LoRA state dict the extractor writes for `targets` in `fmt` (real tensors for `real` targets, meta
    ones for the rest) and, for the real ones, {target key: (base weight, change)}."""
    from lora_colab.lora.formats import piece_specs, piece_tensors, pieces

    tensors, truth = {}, {}
    for target in targets:
        parts = pieces(arch, fmt, target)
        if target.key in real:
            up, down = planted(target, gen)
            truth[target.key] = (target, up, down)
            c = math.sqrt(RANK / ALPHA)  # the extractor's scaling: alpha/rank · up @ down = the change
            for piece in parts:
                rows = slice(*piece.rows)
                tensors.update(piece_tensors(piece, down * c, up[rows] * c, ALPHA, torch.float32))
        else:
            for piece in parts:
                for name, dtype, shape in piece_specs(piece, RANK, torch.bfloat16):
                    tensors[name] = (torch.tensor(float(RANK)) if name.endswith(".alpha")
                                     else torch.empty(shape, device="meta", dtype=dtype))
    return tensors, truth


def diff_patches(view, fmt, gen):
    """The `.diff`/`.diff_b` patches the extractor writes in `fmt` (where it writes them by default) for every
    bias and norm of the layout's canonical `view`, and {tensor name: (canonical key, change)}."""
    from lora_colab.extraction import bias_diff

    if not bias_diff.policy(view.arch, fmt)[0]:
        return {}, {}
    tensors, truth = {}, {}
    for target in bias_diff.diff_targets(view.arch, fmt, view, view):
        change = torch.randn(target.size, generator=gen) * 0.01
        tensors[target.name] = change
        truth[target.name] = (target.key, change)
    return tensors, truth


def check(comfy, family, fmt):
    """One row: the family's default targets in spelling `fmt`, loaded by ComfyUI."""
    from lora_colab import arch as arch_registry
    from lora_colab.arch.canonical import CanonicalCheckpoint

    shapes = {k: tuple(s) for k, s, _ in layout(FAMILIES[family])}
    view = CanonicalCheckpoint(KeysOnly(list(shapes.items())))
    a = view.arch
    fmt = arch_registry.resolve_format(a, fmt)
    targets = a.targets(view.shapes())
    gen = torch.Generator().manual_seed(0)
    real = {t.key for t in sampled(targets)}
    lora, truth = lora_of(a, fmt, targets, real, gen)
    patches, diff_truth = diff_patches(view, fmt, gen)
    lora.update(patches)
    patcher, clip, model_class = comfy_model(comfy, shapes, view.detected.prefix, layout_metadata(FAMILIES[family]))
    new, lines = load_lora(comfy, patcher, clip, lora)
    not_loaded = [line for line in lines if line.startswith(("lora key not loaded", "NOT LOADED"))]
    errors, worst, checked = [], 0.0, 0
    for key, (target, up, down) in truth.items():
        model_key = "diffusion_model." + comfy_key(a, key)
        if model_key not in new.patches:
            errors.append(f"{key}: not patched")
            continue
        change = (up @ down).reshape(target.shape)
        worst = max(worst, patch_error(comfy, new.patches[model_key], model_key, base_weight(target), change))
        checked += 1
    for key, change in diff_truth.values():
        model_key = "diffusion_model." + comfy_key(a, key)
        if model_key in new.patches:
            worst = max(worst, patch_error(comfy, new.patches[model_key], model_key, torch.zeros(change.shape),
                                           change))
            checked += 1
    shape_errors = _meta_patch(comfy, new, {comfy_key(a, k) for k in truth})
    restated = _restated_agrees(a, fmt, view.shapes(), targets, not_loaded)
    return dict(family=family, spelling=fmt, model=model_class, tensors=len(lora), not_loaded=len(not_loaded),
                first=not_loaded[:3], checked=checked, worst=worst, errors=errors + shape_errors,
                restated=restated)


def comfy_key(arch, key):
    """ComfyUI's model key of a canonical weight, bias or norm (`module.weight` / `module.bias`)."""
    module, _, param = key.removeprefix("model.diffusion_model.").rpartition(".")
    return f"{arch.comfy_module(module)}.{param}"


def patch_error(comfy, patches, key, base, change):
    """‖ComfyUI's patch of `base` − base − change‖ / ‖change‖ (`calculate_weight`, ComfyUI's own arithmetic)."""
    got = comfy.lora.calculate_weight(patches, base.clone(), key)
    got -= base  # in place: the largest checked weights are hundreds of MB
    got -= change
    return float(got.norm() / change.norm())


def _meta_patch(comfy, patcher, done):
    """Patch every other weight on the meta device (ComfyUI's own math, shapes only): its shape errors; `done`:
    ComfyUI's keys of the weights checked with numbers."""
    state = patcher.model.state_dict()
    with Captured() as log:
        for key, patches in patcher.patches.items():
            if key.removeprefix("diffusion_model.") not in done:
                comfy.lora.calculate_weight(patches, state[key].float(), key)
    return [line for line in log.messages if "ERROR" in line or "SHAPE" in line.upper()][:3]


def _restated_agrees(arch, fmt, shapes, targets, not_loaded):
    """Whether tests/comfy_rules.py says the same of every module (all load, or which do not)."""
    from comfy_rules import clip_key_map, sd_diffusers_aliases, unet_key_map

    unet = "model.diffusion_model."
    if arch.name in ("sdxl", "sd15"):  # the UNet's own names, and kohya's text encoder names
        local = {k[len(unet):]: s for k, s in shapes.items() if k.startswith(unet)}
        key_map = {**sd_diffusers_aliases(local), **unet_key_map(arch.name, local)}
        key_map.update(clip_key_map("lora_te1", 12, "text_encoder."))
        key_map.update(clip_key_map("lora_te2", 32, "text_encoder_2.") if arch.name == "sdxl" else {})
    else:
        key_map = unet_key_map(arch.name, shapes)
    restated_missing = {m.name for t in targets for m in arch.lora_modules(t, fmt) if m.name not in key_map}
    comfy_missing = {re.sub(r"^(lora key not loaded|NOT LOADED):? ", "", line).split(".lora_")[0]
                     for line in not_loaded}
    comfy_missing = {name for name in comfy_missing if not name.endswith((".diff", ".diff_b", ".alpha"))}
    if comfy_missing == restated_missing:
        return "yes"
    return f"no ({len(restated_missing)} vs {len(comfy_missing)})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", required=True, help="a ComfyUI checkout (never committed here)")
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES), help="default: every family")
    parser.add_argument("--spelling", action="append", choices=SPELLINGS + ("auto",), help="default: every one")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    comfy = import_comfy(args.comfyui)
    logging.getLogger().setLevel(logging.INFO)
    rows = []
    print(f"{'family':16} {'spelling':9} {'ComfyUI model':18} {'tensors':>7} {'not loaded':>10} {'checked':>7} "
          f"{'worst':>8}  restated  first not loaded / errors")
    for family in args.family or sorted(FAMILIES):
        for fmt in args.spelling or ("auto",) + SPELLINGS:
            try:
                row = check(comfy, family, fmt)
            except Exception as exc:  # noqa: BLE001 (a row says what failed)
                print(f"{family:16} {fmt:9} failed: {type(exc).__name__}: {str(exc)[:150]}")
                continue
            rows.append(row)
            print(f"{row['family']:16} {fmt:9} {row['model']:18} {row['tensors']:>7} {row['not_loaded']:>10} "
                  f"{row['checked']:>7} {row['worst']:>8.1e}  {row['restated']:8}  "
                  f"{'; '.join(row['first'] + row['errors'])[:160]}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
