"""LoRAs written by the trainers' own code (PEFT and diffusers' save_lora_weights, a PEFT save_pretrained
folder, LyCORIS), resized with the recipes people use, loaded back in the trainer's own client, and held to
the truth: each module's change is the best rank-k approximation of the change the trainer's own forward
pass applied (k: the rank the output keeps), read off the modules by probing them."""

import pytest
import torch

from trainer_truth import changes, randomize, rel

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


def load_sdxl_lora(path):
    """{component: model} of a fresh tiny SDXL with the LoRA loaded by the pipeline's load_lora_weights."""
    from whole_model import LoaderWarnings, make_pipeline
    models = sdxl_models()
    pipe = make_pipeline("StableDiffusionXLPipeline", **models)
    with LoaderWarnings() as caught:
        pipe.load_lora_weights(str(path))
    bad = [m for m in caught.bad if "prefix='text_encoder_2'" not in m]  # no TE2 adapter was trained
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
