"""LoRAs written by the trainers' own code (PEFT and diffusers' save_lora_weights, a PEFT save_pretrained
folder, LyCORIS), resized with the recipes people use, loaded back in the trainer's own client, and held to
the truth: each module's change is the best rank-k approximation of the change the trainer's own forward
pass applied (k: the rank the output keeps), read off the modules by probing them."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_colab import resize
from trainer_truth import best, changes, dora, randomize, ranks_in, rel, weights, within_optimum

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

RECIPES = ("sv_fro=0.9", "rank=4", "fro_lora=1,size=0.05", "spn_ckpt=1,thr=-1.2")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_COLAB_CACHE", str(tmp_path / "cache"))


def sdxl_models():
    """A tiny SDXL UNet and its two CLIP text encoders, the same weights every call."""
    from test_sd_pipelines import CLIP, UNETS
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**UNETS["sdxl"]).eval()
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP)).eval()
    te2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**{**CLIP, "projection_dim": 32})).eval()
    return {"unet": unet, "text_encoder": te, "text_encoder_2": te2}


def adapted(model):
    """Module paths of a model that carry a PEFT LoRA layer."""
    from peft.tuners.lora import LoraLayer
    return [name for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def base_weights(model, paths):
    """{path: the 2-D weight under each PEFT LoRA layer}."""
    return {p: model.get_submodule(p).base_layer.weight.detach().reshape(
        model.get_submodule(p).base_layer.weight.shape[0], -1).clone() for p in paths}


def lora_params(model):
    return [p for n, p in model.named_parameters() if "lora_" in n]


# --- diffusers' save_lora_weights with its adapter metadata --------------------------------------------

@pytest.fixture(scope="module")
def diffusers_sdxl(tmp_path_factory):
    """An SDXL LoRA saved by diffusers' own save_lora_weights with each component's adapter metadata: the
    UNet at r=16, lora_alpha=8 (to_k at rank 8, to_v at alpha 32), the text encoder with rslora. Returns
    (file, base pipeline folder, {component: {path: true change}}, {component: {path: base weight}})."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from test_sd_pipelines import write_pipeline
    root = tmp_path_factory.mktemp("diffusers_sdxl")
    models = sdxl_models()
    base = write_pipeline(root / "base", {c: {k: v.clone() for k, v in m.state_dict().items()}
                                          for c, m in models.items()})
    configs = {"unet": LoraConfig(r=16, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"],
                                  rank_pattern={"to_k": 8}, alpha_pattern={"to_v": 32}),
               "text_encoder": LoraConfig(r=8, lora_alpha=16, use_rslora=True,
                                          target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])}
    truth, plain = {}, {}
    for component, config in configs.items():
        model = models[component]
        inject_adapter_in_model(config, model)
        paths = adapted(model)
        randomize(lora_params(model), std=0.05, seed=len(component))
        plain[component] = base_weights(model, paths)
        truth[component] = changes(model, paths, plain[component])
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        root / "lora", unet_lora_layers=get_peft_model_state_dict(models["unet"]),
        text_encoder_lora_layers=get_peft_model_state_dict(models["text_encoder"]),
        unet_lora_adapter_metadata=configs["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict())
    return root / "lora" / "pytorch_lora_weights.safetensors", base, truth, plain


def load_sdxl_lora(path, absent=("text_encoder_2",)):
    """{component: model} of a fresh tiny SDXL with the LoRA loaded by the pipeline's load_lora_weights
    (`absent`: the components the LoRA has no adapter for, whose "no LoRA keys" notes are expected)."""
    from whole_model import LoaderWarnings, make_pipeline
    models = sdxl_models()
    pipe = make_pipeline("StableDiffusionXLPipeline", **models)
    with LoaderWarnings() as caught:
        pipe.load_lora_weights(str(path))
    bad = [m for m in caught.bad if not any(f"prefix='{c}'" in m for c in absent)]
    assert not bad, bad
    return models


def test_diffusers_metadata_gives_each_module_its_peft_scale(diffusers_sdxl):
    """Read at full rank, every module is the trainer's change: alpha/r per module through the rank and
    alpha patterns, alpha/√r with rslora (the metadata's scale; 1 would be 2x too strong on the UNet)."""
    from lora_colab.lora.files import LoraFile
    from lora_colab.resizing.spectrum import decompose
    path, _, truth, _ = diffusers_sdxl
    prefixes = {"unet": "unet.", "text_encoder": "text_encoder."}
    with LoraFile(path) as lora:
        assert lora.spelling.name == "diffusers"
        for component, deltas in truth.items():
            for module, delta in deltas.items():
                sp = decompose(lora, lora.layers[prefixes[component] + module], "cpu")
                got = (sp.u * sp.s) @ sp.v.T
                assert rel(got, delta, delta) < 1e-5, (component, module)


@pytest.mark.parametrize("recipe", RECIPES)
def test_diffusers_lora_resized_loads_in_diffusers_at_the_optimum(diffusers_sdxl, tmp_path, recipe):
    path, base, truth, plain = diffusers_sdxl
    report = resize(base if "ckpt" in recipe else None, [path], tmp_path, recipe, progress=False)[0]
    written = load_file(report.output)
    meta = json.loads(safe_open(report.output, "pt").metadata()["lora_adapter_metadata"])
    ranks = ranks_in(written)
    assert meta["unet.lora_alpha"] == meta["unet.r"] and not meta["text_encoder.use_rslora"]
    models = load_sdxl_lora(report.output)
    cut = 0
    for component, deltas in truth.items():
        got = changes(models[component], deltas, plain[component])
        kept = {module: ranks.get(f"{component}.{module}", 0) for module in deltas}
        assert not within_optimum(got, deltas, kept), (component, within_optimum(got, deltas, kept))
        cut += sum(k < torch.linalg.matrix_rank(deltas[m]) for m, k in kept.items())
    assert cut > 0, "the recipe cut nothing: the test would not see a wrong scale"
    assert all(written[k].dtype == torch.float32 for k in written if k.endswith("weight"))


# --- a PEFT save_pretrained folder --------------------------------------------------------------------

def flux_model():
    from whole_model import make_transformer
    return make_transformer("flux")


@pytest.fixture(scope="module", params=["lora", "dora"])
def peft_folder(request, tmp_path_factory):
    """A tiny Flux transformer's adapter saved by PeftModel.save_pretrained (rslora, rank and alpha patterns;
    with DoRA: a magnitude per output row). Returns (folder, paths, truth changes, base weights, directional
    changes, magnitudes)."""
    from peft import LoraConfig, get_peft_model
    root = tmp_path_factory.mktemp("peft_" + request.param)
    model = flux_model()
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out", "ff.net.0.proj"]
    config = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=targets, rank_pattern={"to_v": 4},
                        alpha_pattern={"proj_out": 2}, use_dora=request.param == "dora")
    wrapped = get_peft_model(model, config)
    inner = wrapped.base_model.model
    paths = adapted(inner)
    plain = base_weights(inner, paths)
    randomize([p for n, p in wrapped.named_parameters() if "lora_A" in n or "lora_B" in n], std=0.15)
    directional, magnitude = {}, {}
    if request.param == "dora":
        gen = torch.Generator().manual_seed(3)
        for path in paths:
            layer = inner.get_submodule(path)
            directional[path] = layer.get_delta_weight("default").detach().reshape(plain[path].shape).clone()
            vector = layer.lora_magnitude_vector["default"].weight
            with torch.no_grad():  # a trained magnitude, not its initial ‖W + ΔW‖
                vector.mul_(1 + 0.1 * torch.randn(vector.shape, generator=gen))
            magnitude[path] = vector.detach().reshape(-1).clone()
    truth = changes(inner, paths, plain)
    wrapped.save_pretrained(root / "adapter")
    return root / "adapter", paths, truth, plain, directional, magnitude


def test_peft_folder_resized_loads_in_peft_at_the_optimum(peft_folder, tmp_path):
    from peft import PeftModel
    folder, paths, truth, plain, directional, magnitude = peft_folder
    report = resize(None, [folder], tmp_path, "rank=3", progress=False)[0]
    out = tmp_path / report.output.rsplit("/", 1)[-1]
    assert out.is_dir() and (out / "adapter_config.json").exists()
    ranks = {k[len("base_model.model."):]: v for k, v in ranks_in(load_file(out / "adapter_model.safetensors")).items()}
    loaded = PeftModel.from_pretrained(flux_model(), out).base_model.model
    got = changes(loaded, paths, plain)
    if not directional:
        assert not within_optimum(got, truth, ranks), within_optimum(got, truth, ranks)
        return
    for path in paths:  # DoRA: the magnitude kept, the change of direction cut to its best rank-k
        want = dora(plain[path], best(directional[path], ranks[path]), magnitude[path], "out") - plain[path]
        assert rel(got[path], want, truth[path]) < 1e-4, path
    full = resize(None, [folder], tmp_path / "full", "rank=8", progress=False)[0]
    again = PeftModel.from_pretrained(flux_model(), full.output).base_model.model
    got = changes(again, paths, plain)
    assert all(rel(got[p], truth[p], truth[p]) < 1e-4 for p in paths)  # nothing cut: the trainer's model


# --- LyCORIS, through its kohya front (the names sd-scripts users' LyCORIS files carry) --------------------

LYCORIS = {"locon": dict(algo="lora"), "locon-tucker": dict(algo="lora", use_tucker=True),
           "loha": dict(algo="loha"), "loha-tucker": dict(algo="loha", use_tucker=True),
           "lokr": dict(algo="lokr", factor=4), "lokr-tucker": dict(algo="lokr", factor=4, use_tucker=True,
                                                                    decompose_both=True),
           "dora-out": dict(algo="lora", dora_wd=True), "dora-in": dict(algo="lora", dora_wd=True, wd_on_output=False)}
PRESET = """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = []
text_encoder_target_module = []
text_encoder_target_name = []
"""


def sd15_unet():
    from test_sd_pipelines import UNETS
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**UNETS["sd15"]).eval()


def kohya_paths(unet, names):
    """{LyCORIS kohya name: module path} of a UNet."""
    paths = {f"lora_unet_{name}".replace(".", "_"): name for name, _ in unet.named_modules()}
    return {name: paths[name] for name in names}


@pytest.fixture(scope="module", params=sorted(LYCORIS))
def lycoris_file(request, tmp_path_factory):
    """An SD1.5 LyCORIS file (linear and convolution layers) written by LyCORIS's own save_weights, with the
    change its forward applies. Returns (file, base folder, {path: change}, {path: base weight}, {path:
    (directional change, magnitude, axis)} for DoRA)."""
    from lycoris import kohya
    from test_sd_pipelines import write_pipeline
    root = tmp_path_factory.mktemp("lycoris_" + request.param)
    (root / "preset.toml").write_text(PRESET)
    unet = sd15_unet()
    base = write_pipeline(root / "base", {"unet": {k: v.clone() for k, v in unet.state_dict().items()}})
    network = kohya.create_network(1.0, 4, 2, None, None, unet, preset=str(root / "preset.toml"), conv_dim=4,
                                   conv_alpha=1, **LYCORIS[request.param])
    paths = kohya_paths(unet, [lora.lora_name for lora in network.unet_loras])
    plain = weights(unet, paths.values())
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    std = 0.3 if "loha" in request.param else 0.1  # a Hadamard product of small factors: keep it above rounding
    randomize([p for n, p in network.named_parameters() if "dora_scale" not in n], std=std)
    directional = {}
    for lora in network.unet_loras:
        if getattr(lora, "wd", False):
            with torch.no_grad():  # a trained magnitude
                lora.dora_scale.mul_(1.1)
            delta = (lora.lora_up.weight.flatten(1) @ lora.lora_down.weight.flatten(1)) * lora.scale
            axis = "out" if lora.wd_on_out else "in"
            directional[paths[lora.lora_name]] = (delta.detach(), lora.dora_scale.detach().reshape(-1), axis)
    truth = changes(unet, paths.values(), plain)
    network.save_weights(str(root / "lycoris.safetensors"), torch.float32, {})
    return root / "lycoris.safetensors", base, truth, plain, directional


def load_lycoris(path):
    from lycoris import kohya
    unet = sd15_unet()
    network, _ = kohya.create_network_from_weights(1.0, str(path), None, None, unet)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    return unet, len(network.unet_loras)


def test_lycoris_files_resized_load_in_lycoris_at_the_optimum(lycoris_file, tmp_path):
    path, base, truth, plain, directional = lycoris_file
    report = resize(base, [path], tmp_path, "rank=3", progress=False)[0]
    written = load_file(report.output)
    assert {t.dtype for k, t in written.items() if k.endswith("weight")} == {torch.float32}  # the input's
    for key, tensor in written.items():  # convolutions in their kernel's shape (LoHa keeps them flat)
        if key.endswith(".lora_down.weight") and ("conv" in key or "proj_in" in key or "proj_out" in key):
            assert tensor.dim() == 4, key
    names = {path: name for name, path in kohya_paths(sd15_unet(), ranks_in(written)).items()}
    ranks = {p: ranks_in(written)[names[p]] for p in truth}
    if any(axis == "in" for _, _, axis in directional.values()):
        # LyCORIS 4.1.3 cannot load its own wd_on_output=False files (make_module_from_state_dict builds the
        # magnitude on the output axis): ComfyUI's weight_decompose, which tells the axis by shape, is the client
        got = {p: comfy_dora(written, names[p], plain[p]) - plain[p] for p in truth}
    else:
        unet, loaded = load_lycoris(report.output)
        assert loaded == len(truth)
        got = changes(unet, truth, plain)
    if not directional:
        assert not within_optimum(got, truth, ranks), within_optimum(got, truth, ranks)
        return
    for p, (delta, magnitude, axis) in directional.items():
        want = dora(plain[p], best(delta, ranks[p]), magnitude, axis) - plain[p]
        assert rel(got[p], want, truth[p]) < 1e-4, p


def comfy_dora(tensors, name, w0):
    """ComfyUI's LoRA + DoRA patch of `w0` (2-D) by module `name` (weight_adapter.base.weight_decompose on the
    input axis: the magnitude over the norm of each input column of the patched weight, plus eps)."""
    down, up = tensors[name + ".lora_down.weight"], tensors[name + ".lora_up.weight"]
    alpha = float(tensors[name + ".alpha"]) / down.shape[0]
    scale = tensors[name + ".dora_scale"].float()
    assert scale.shape[0] == 1  # the input axis, as ComfyUI tells it
    w = w0 + alpha * (up.flatten(1) @ down.flatten(1))
    cols = w.reshape(w.shape[0], scale.numel(), -1)
    norm = cols.pow(2).sum(dim=(0, 2)).sqrt() + torch.finfo(torch.float32).eps
    return (cols * (scale.reshape(-1) / norm).reshape(1, -1, 1)).reshape(w.shape)


def test_loha_convolutions_keep_their_kernel_without_the_base(tmp_path):
    """Without the base, a LoHa's flat convolution factors get the 3×3 kernel back from the UNet's names."""
    from lycoris import kohya
    (tmp_path / "preset.toml").write_text(PRESET)
    unet = sd15_unet()
    network = kohya.create_network(1.0, 4, 2, None, None, unet, preset=str(tmp_path / "preset.toml"), conv_dim=4,
                                   conv_alpha=1, algo="loha")
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    randomize(list(network.parameters()), std=0.1)
    network.save_weights(str(tmp_path / "loha.safetensors"), torch.bfloat16, {})
    report = resize(None, [tmp_path / "loha.safetensors"], tmp_path / "out", "rank=2", progress=False)[0]
    written = load_file(report.output)
    shapes = {k: tuple(v.shape) for k, v in written.items() if k.endswith(".lora_down.weight")}
    assert shapes["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"] == (2, 32, 3, 3)
    assert shapes["lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight"] == (2, 32, 3, 3)
    assert shapes["lora_unet_down_blocks_1_resnets_0_conv_shortcut.lora_down.weight"] == (2, 32, 1, 1)
    assert {v.dtype for v in written.values() if v.dim() > 1} == {torch.bfloat16}


# --- trainers that do not install here: files from their save code's key names ----------------------------

def planted(model, paths, rank, gen, std=0.1):
    """{path: (down [r, in], up [out, r])} random factors for Linear modules of `model`."""
    out = {}
    for path in paths:
        w = model.get_submodule(path).weight
        out[path] = (torch.randn(rank, w.shape[1], generator=gen) * std, torch.randn(w.shape[0], rank, generator=gen) * std)
    return out


def linear_paths(model, inside):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and inside in n]


WAN_NATIVE = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
              "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
              "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0",
              "ffn.net.2": "ffn.2"}  # Wan's own module names (its single file, musubi-tuner's model)


def trainer_file(kind, root):
    """(file, family, {diffusers module path: true change}) of a LoRA as `kind`'s save code spells it:
    ai-toolkit (Flux: transformer. + diffusers names, lora_A/B, no alpha: scale 1, its `software` metadata),
    OneTrainer (Flux: lora_transformer_ + diffusers names flattened, X.alpha), DiffSynth-Studio (Qwen-Image:
    bare names, `.lora_A.default.weight`, scale 1), musubi-tuner (Wan: lora_unet_ + Wan's native names
    flattened, X.alpha, its network module in the metadata)."""
    from safetensors.torch import save_file
    from whole_model import make_transformer
    family = {"ai-toolkit": "flux", "onetrainer": "flux", "diffsynth": "qwen_image", "musubi": "wan"}[kind]
    model = make_transformer(family)
    paths = linear_paths(model, "blocks.")
    if kind == "onetrainer":  # diffusers reads OneTrainer's Flux names for attention only (its mixture converter)
        paths = [p for p in paths if ".attn." in p]
    factors = planted(model, paths, 4, torch.Generator().manual_seed(len(kind)))
    tensors, truth, meta = {}, {}, {}
    alpha = 2.0
    for path, (down, up) in factors.items():
        if kind == "ai-toolkit":
            name, suffixes, scale = "transformer." + path, (".lora_A.weight", ".lora_B.weight"), 1.0
        elif kind == "onetrainer":
            name, suffixes, scale = "lora_transformer_" + path.replace(".", "_"), (".lora_down.weight", ".lora_up.weight"), alpha / 4
        elif kind == "diffsynth":
            name, suffixes, scale = path, (".lora_A.default.weight", ".lora_B.default.weight"), 1.0
        else:
            block, _, module = path.partition(".")[2].partition(".")
            if module not in WAN_NATIVE:
                continue
            name = f"lora_unet_blocks_{block}_{WAN_NATIVE[module].replace('.', '_')}"
            suffixes, scale = (".lora_down.weight", ".lora_up.weight"), alpha / 4
        tensors[name + suffixes[0]], tensors[name + suffixes[1]] = down.contiguous(), up.contiguous()
        if scale != 1.0:
            tensors[name + ".alpha"] = torch.tensor(alpha)
        truth[path] = scale * up @ down
    if kind == "ai-toolkit":
        meta["software"] = json.dumps({"name": "ai-toolkit", "repo": "https://github.com/ostris/ai-toolkit"})
    elif kind == "onetrainer":
        meta.update(ot_branch="master", ot_revision="0" * 40)
    elif kind == "musubi":
        meta.update(ss_network_module="networks.lora_wan", ss_network_dim="4", ss_network_alpha="2")
    save_file(tensors, root / f"{kind}.safetensors", metadata=meta)
    return root / f"{kind}.safetensors", family, truth


PIPELINES = {"flux": "FluxPipeline", "qwen_image": "QwenImagePipeline", "wan": "WanPipeline"}


def diffusers_changes(family, path, truth):
    """{module path: change} of a fresh tiny `family` transformer with the LoRA loaded by its pipeline."""
    from whole_model import LoaderWarnings, make_pipeline, make_transformer
    model = make_transformer(family)
    plain = {p: model.get_submodule(p).weight.detach().clone() for p in truth}
    pipe = make_pipeline(PIPELINES[family], transformer=model)
    with LoaderWarnings() as caught:
        pipe.load_lora_weights(str(path))
    assert not caught.bad, caught.bad
    return changes(model, truth, plain)


@pytest.mark.parametrize("kind", ["ai-toolkit", "onetrainer", "diffsynth", "musubi"])
def test_each_trainers_spelling_is_read_resized_and_loads_where_it_loaded(kind, tmp_path):
    from lora_colab.lora.files import LoraFile
    path, family, truth = trainer_file(kind, tmp_path)
    with LoraFile(path) as lora:
        assert lora.spelling.name == kind
    report = resize(None, [path], tmp_path / "out", "rank=2", progress=False)[0]
    written = load_file(report.output)
    assert set(ranks_in(written)) == set(ranks_in(load_file(path)))  # the input's own names
    got = diffusers_changes(family, report.output, truth)
    assert not within_optimum(got, truth, {p: 2 for p in truth})


def test_diffusers_pre_peft_text_encoder_spelling_is_resized_not_passed_through(tmp_path):
    """diffusers' older text-encoder spelling (`lora_linear_layer.down/up`, convert_state_dict_to_diffusers)
    is read and cut like any LoRA, and still loads through the pipeline."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file
    te = sdxl_models()["text_encoder"]
    inject_adapter_in_model(LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), te)
    randomize(lora_params(te), std=0.1)
    paths = adapted(te)
    plain = base_weights(te, paths)
    truth = changes(te, paths, plain)
    legacy = convert_state_dict_to_diffusers(get_peft_model_state_dict(te))
    assert all(".lora_linear_layer." in k for k in legacy)
    save_file({"text_encoder." + k: v.contiguous() for k, v in legacy.items()}, tmp_path / "legacy.safetensors")
    report = resize(None, [tmp_path / "legacy.safetensors"], tmp_path / "out", "rank=3", progress=False)[0]
    assert not [w for w in report.warnings if "copied unchanged" in w]
    written = load_file(report.output)
    assert {v.shape[0] for k, v in written.items() if k.endswith(".lora_linear_layer.down.weight")} == {3}
    got = changes(load_sdxl_lora(report.output, ("unet", "text_encoder_2"))["text_encoder"], paths, plain)
    assert not within_optimum(got, truth, {p: 3 for p in paths})


# --- convert: the spelling a client loads ----------------------------------------------------------------

def test_a_peft_folder_converts_to_a_diffusers_file_without_the_base(peft_folder, tmp_path):
    from lora_colab import convert
    folder, paths, truth, plain, directional, _ = peft_folder
    report = convert(None, [folder], "diffusers", tmp_path, progress=False)[0]
    assert report.output.endswith("_diffusers.safetensors")
    meta = json.loads(safe_open(report.output, "pt").metadata()["lora_adapter_metadata"])
    assert meta["transformer.use_dora"] == bool(directional)
    got = diffusers_changes("flux", report.output, truth)
    assert all(rel(got[p], truth[p], truth[p]) < 1e-4 for p in paths)


def test_musubi_wan_converts_to_diffusers_through_the_base_and_asks_for_it_without(tmp_path):
    from lora_colab import LoraColabError, convert
    from whole_model import make_transformer
    path, _, truth = trainer_file("musubi", tmp_path)
    model = make_transformer("wan")
    (tmp_path / "base").mkdir()
    model.save_pretrained(tmp_path / "base")
    with pytest.raises(LoraColabError, match="give the base model as CHECKPOINT"):
        convert(None, [path], "diffusers", tmp_path / "none", progress=False)
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())
    report = convert(tmp_path / "base", [path], "diffusers", tmp_path / "out", progress=False)[0]
    assert all(k.startswith("transformer.") for k in load_file(report.output))
    got = diffusers_changes("wan", report.output, truth)
    assert all(rel(got[p], truth[p], truth[p]) < 1e-4 for p in truth)


def test_diffsynth_converts_to_comfy_through_the_base(tmp_path):
    """DiffSynth's bare `.default` names, written as ComfyUI's `diffusion_model.` names; ComfyUI's generic
    rule (restated) patches the base to the trainer's change."""
    from lora_colab import convert
    from whole_model import comfy_apply, make_transformer
    from comfy_rules import unet_key_map
    path, _, truth = trainer_file("diffsynth", tmp_path)
    model = make_transformer("qwen_image")
    (tmp_path / "base").mkdir()
    model.save_pretrained(tmp_path / "base")
    report = convert(tmp_path / "base", [path], "comfy", tmp_path / "out", progress=False)[0]
    state = {k: v.float() for k, v in model.state_dict().items()}
    key_map = unet_key_map("qwen_image", {k: v.shape for k, v in state.items()})
    key_map = {name: (key, None) for name, (key, _) in key_map.items() if name.startswith("diffusion_model.")}
    got = comfy_apply(report.output, key_map, state)
    for p, delta in truth.items():
        change = got[p + ".weight"] - state[p + ".weight"]
        assert rel(change, delta, delta) < 1e-4, p


@pytest.mark.parametrize("lycoris_file", ["dora-in"], indirect=True)
def test_what_a_spelling_cannot_hold_is_named_in_one_line(lycoris_file, tmp_path):
    """A DoRA magnitude per input column has no PEFT form: converting to diffusers leaves those layers out
    and says so; a PEFT folder holds one model, so a UNet + text encoder LoRA is refused in one line."""
    from lora_colab import LoraColabError, convert
    path, base, truth, _, directional = lycoris_file
    assert {axis for _, _, axis in directional.values()} == {"in"}
    report = convert(base, [path], "diffusers", tmp_path, progress=False)[0]
    assert any(f"{len(truth)} DoRA layers keep their magnitude per input column" in w and "left out" in w
               for w in report.warnings), report.warnings
    assert report.nothing_kept and report.output is None and not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(LoraColabError, match="a PEFT folder holds one model's adapter"):
        convert(None, [diffusers_sdxl_file(tmp_path)], "peft", tmp_path / "peft", progress=False)


def diffusers_sdxl_file(root):
    """A UNet + text encoder LoRA in diffusers' spelling."""
    from safetensors.torch import save_file
    save_file({"unet.a.lora_A.weight": torch.ones(1, 4), "unet.a.lora_B.weight": torch.ones(4, 1),
               "text_encoder.b.lora_A.weight": torch.ones(1, 4), "text_encoder.b.lora_B.weight": torch.ones(4, 1)},
              root / "two.safetensors")
    return root / "two.safetensors"


def test_resize_to_kohya_through_the_base_scores_against_the_base_and_loads_at_the_optimum(diffusers_sdxl, tmp_path):
    """diffusers' spelling in, kohya's out (SGM names, X.alpha) through the base's map: the base-aware recipe
    scores every re-spelled layer (the same ranks as in the input's spelling), and diffusers' kohya converter
    loads the file at the optimum."""
    path, base, truth, plain = diffusers_sdxl
    same = resize(base, [path], tmp_path / "same", "spn_ckpt=1,thr=-1.2", progress=False)[0]
    kohya = resize(base, [path], tmp_path / "kohya", "spn_ckpt=1,thr=-1.2", progress=False, to="kohya")[0]
    assert not [w for w in kohya.warnings if "could not be computed" in w]
    written = load_file(kohya.output)
    assert all(k.startswith(("lora_unet_", "lora_te1_")) for k in written) and any(k.endswith(".alpha") for k in written)
    assert sorted(ranks_in(written).values()) == sorted(ranks_in(load_file(same.output)).values())
    models = load_sdxl_lora(kohya.output)
    same_ranks = ranks_in(load_file(same.output))
    for component, deltas in truth.items():
        got = changes(models[component], deltas, plain[component])
        kept = {module: same_ranks.get(f"{component}.{module}", 0) for module in deltas}
        assert not within_optimum(got, deltas, kept), (component, within_optimum(got, deltas, kept))
