"""Every module a LoRA holds is its own best approximation, and the whole model is reproduced through every
client: for each architecture, a tiny model of diffusers' own class, a planted fine-tune whose change differs
per slice of every fused weight, the LoRA extracted in every format at the rank that holds the planted change
exactly per written module, loaded by that format's clients (the pipeline's own `load_lora_weights`;
ComfyUI's key rules and patch arithmetic), then a full forward pass against the fine-tune's."""

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save_file as st_save_file

from lora_colab import arch, extract
from lora_colab.lora.formats import pieces

from comfy_rules import unet_key_map
from whole_model import (PLANTED_RANK, LoaderWarnings, canonical_of, comfy_apply, exact_rank,
                         forward, gap, lora_modules_loaded, make_pipeline, make_transformer, plant,
                         transformer_inputs, transformer_spec, with_canonical)

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

FAMILIES = ["flux", "chroma", "zimage", "qwen_image", "qwen_image_2_1", "wan", "flux2", "krea2", "ltx2", "flux3", "sd3", "hidream", "lumina2", "ernie_image", "ideogram4", "kandinsky5", "anima", "cosmos_predict2_5", "minimax_h3",
            "hunyuan_video15", "ace_step15"]
FORMATS = ["kohya", "comfy", "diffusers"]
GAP = 0.02


def diffusers_loads(a, fmt):
    """Whether diffusers' pipeline loader is a client of `fmt` for this family at the tiny width: its own
    PEFT spelling always; the `auto` spelling where the report names no other client (Flux.1's and Chroma's
    kohya converters and Lumina 2's comfy converter need the real width: covered by test_new_architectures at that
    width)."""
    if fmt == "diffusers":
        return True
    if a.name in ("flux", "chroma", "lumina2") or a.format_notes(fmt, []):
        return False
    return fmt == arch.resolve_format(a, "auto") or (fmt == "comfy" and a.diffusers_reads_comfy)


@pytest.fixture(scope="module")
def family_pairs(tmp_path_factory):
    """name -> (folder, arch, base state, tuned state, base canonical, base/tuned files) built once."""
    cache = {}

    def build(name):
        if name in cache:
            return cache[name]
        folder = tmp_path_factory.mktemp(name)
        model = make_transformer(name)
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        detected = arch.detect(set(state))
        a = detected.arch
        assert a.name == name, (name, a.name)
        base = canonical_of(a, state, detected.layout, detected.prefix)
        targets = a.targets({k: tuple(v.shape) for k, v in base.items()})
        tuned = plant(targets, base, torch.Generator().manual_seed(7))
        (folder / "base" / "transformer").mkdir(parents=True)
        st_save_file(state, str(folder / "base" / "transformer" / "diffusion_pytorch_model.safetensors"))
        st_save_file({k: v.contiguous() for k, v in tuned.items()}, str(folder / "tuned.safetensors"))
        tuned_state = with_canonical(a, state, detected.layout, tuned, detected.prefix)
        cache[name] = (folder, a, detected, state, tuned_state, base, targets)
        return cache[name]
    return build


def run_forward(name, state):
    model = make_transformer(name)
    model.load_state_dict(state)
    return forward(model, transformer_inputs(name))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", FAMILIES)
def test_base_plus_lora_is_the_fine_tune_through_every_client(family_pairs, name, fmt):
    folder, a, detected, state, tuned_state, base, targets = family_pairs(name)
    rank = exact_rank(a, fmt, targets)
    out = folder / f"lora_{fmt}.safetensors"
    report = extract(folder / "base", folder / "tuned.safetensors", out, rank=rank, format=fmt,
                     clamp_quantile=None, bias_diff=False, progress=False, device="cpu")
    written = [p for t in targets for p in pieces(a, fmt, t)]
    want, was = run_forward(name, tuned_state), run_forward(name, state)
    clients = []
    if fmt in ("kohya", "comfy"):
        key_map = unet_key_map(a.name, {k: tuple(v.shape) for k, v in base.items()})
        patched = comfy_apply(out, key_map, base)
        got = run_forward(name, with_canonical(a, state, detected.layout, patched, detected.prefix))
        clients.append(("ComfyUI", gap(got, want, was)))
    if diffusers_loads(a, fmt):
        model = make_transformer(name)
        pipe = make_pipeline(transformer_spec(name)[1], transformer=model)
        with LoaderWarnings() as caught:
            pipe.load_lora_weights(str(folder), weight_name=out.name, adapter_name="x")
        assert not caught.bad, caught.bad[:3]
        # diffusers splits fused spellings itself: one PEFT layer per module of its own spelling
        assert lora_modules_loaded(model) == sum(len(pieces(a, "diffusers", t)) for t in targets)
        got = forward(model, transformer_inputs(name))
        clients.append(("diffusers", gap(got, want, was)))
    assert clients
    assert all(g <= GAP for _, g in clients), clients
    # one decomposition per written module, each holding its own planted change: the truncation loses nothing
    assert len(report.extracted) == len(written)
    assert max(layer.rel_error for layer in report.extracted) < 1e-3


# --- SD1.5 and SDXL: the UNet and the text encoders ----------------------------------------------------

def sd_state(name, seed=0):
    """{"unet." / "text_encoder." / "text_encoder_2." key: tensor} of a tiny pipeline."""
    from test_sd_pipelines import pipeline_state
    return {f"{c}.{k}": v for c, sd in pipeline_state(name, seed).items() for k, v in sd.items()}


def sd_models(name, state):
    """{component: model} of a tiny pipeline loaded with `state`."""
    import transformers
    from test_sd_pipelines import CLIP, UNETS
    models = {"unet": diffusers.UNet2DConditionModel(**UNETS[name]),
              "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP))}
    if name == "sdxl":
        models["text_encoder_2"] = transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(**{**CLIP, "projection_dim": 32}))
    for component, model in models.items():
        model.load_state_dict({k[len(component) + 1:]: v for k, v in state.items() if k.startswith(component + ".")})
        model.eval()
    return models


def sd_forward(name, models):
    """{component: its outputs flattened}: the UNet on a noisy latent with text and (SDXL) size conditioning,
    each text encoder on a token sequence."""
    gen = torch.Generator().manual_seed(5)
    cross = 64 if name == "sdxl" else 32
    extra = {}
    if name == "sdxl":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=gen),
                                      "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])}
    inputs = {"unet": dict(sample=torch.randn(1, 4, 16, 16, generator=gen), timestep=torch.tensor([500]),
                           encoder_hidden_states=torch.randn(1, 8, cross, generator=gen), **extra)}
    ids = torch.randint(0, 100, (1, 8), generator=gen)
    for component in ("text_encoder", "text_encoder_2"):
        inputs[component] = dict(input_ids=ids)
    return {component: forward(model, inputs[component]) for component, model in models.items()}


def sd_comfy_key_map(name, state):
    """ComfyUI's names for an SD pipeline's weights: the UNet by LDM names (`lora_unet_<ldm>`,
    `diffusion_model.<ldm>`) and diffusers names (`lora_unet_<diffusers>`, through its unet_to_diffusers
    table), CLIP-L as `lora_te_`/`lora_te1_`, bigG as `lora_te2_` (ComfyUI holds both in HF layout)."""
    from lora_colab.arch.stable_diffusion import diffusers_to_sgm
    from test_sd_pipelines import up_attention_levels
    unet = {k[len("unet."):]: k for k in state if k.startswith("unet.") and k.endswith(".weight")}
    levels = up_attention_levels(unet)
    key_map = {}
    for local, key in unet.items():
        ldm = diffusers_to_sgm(local, levels)
        if ldm is None:
            continue
        ldm_module = ldm[: -len(".weight")]
        module = local[: -len(".weight")]
        for alias in ("lora_unet_" + ldm_module.replace(".", "_"), "diffusion_model." + ldm_module,
                      "lora_unet_" + module.replace(".", "_")):
            key_map[alias] = (key, None)
    te_names = {"text_encoder": ("lora_te", "lora_te1")} if name == "sd15" else \
        {"text_encoder": ("lora_te", "lora_te1"), "text_encoder_2": ("lora_te2",)}
    for component, prefixes in te_names.items():
        for key in state:
            if not (key.startswith(component + ".") and key.endswith(".weight") and ".encoder.layers." in key):
                continue
            module = "text_model." + key[len(component) + 1: -len(".weight")].removeprefix("text_model.")
            for prefix in prefixes:
                key_map[f"{prefix}_{module.replace('.', '_')}"] = (key, None)
    return key_map


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_stable_diffusion_base_plus_lora_is_the_fine_tune_in_unet_and_text_encoders(tmp_path, name, fmt):
    from test_sd_pipelines import write_pipeline, write_single_file
    a = arch.get(name)
    state = sd_state(name)
    base = canonical_of(a, state, "diffusers")
    targets = a.targets({k: tuple(v.shape) for k, v in base.items()})
    assert any(t.splits for t in targets) == (name == "sdxl")  # bigG's fused in_proj
    tuned_state = with_canonical(a, state, "diffusers", plant(targets, base, torch.Generator().manual_seed(9)))

    def components(flat):
        return {c: {k[len(c) + 1:]: v.contiguous() for k, v in flat.items() if k.startswith(c + ".")}
                for c in ("unet", "text_encoder", "text_encoder_2") if any(k.startswith(c + ".") for k in flat)}
    write_pipeline(tmp_path / "base", components(state))
    write_single_file(tmp_path / "tuned.safetensors", name, components(tuned_state))  # a cross-layout pair
    rank = exact_rank(a, fmt, targets)
    assert rank == PLANTED_RANK  # every written module is one planted slice (bigG q/k/v are written split)
    out = tmp_path / f"lora_{fmt}.safetensors"
    report = extract(tmp_path / "base", tmp_path / "tuned.safetensors", out, rank=rank, format=fmt,
                     clamp_quantile=None, progress=False, device="cpu")
    want, was = sd_forward(name, sd_models(name, tuned_state)), sd_forward(name, sd_models(name, state))
    results = {}
    if fmt in ("kohya", "comfy"):
        patched = comfy_apply(out, sd_comfy_key_map(name, state), state)
        got = sd_forward(name, sd_models(name, {k: v.float() for k, v in patched.items()}))
        results["ComfyUI"] = {c: gap(got[c], want[c], was[c]) for c in want}
    if fmt in ("kohya", "diffusers"):
        models = sd_models(name, state)
        pipe = make_pipeline("StableDiffusionXLPipeline" if name == "sdxl" else "StableDiffusionPipeline",
                             **models)
        with LoaderWarnings() as caught:
            pipe.load_lora_weights(str(tmp_path), weight_name=out.name, adapter_name="x")
        assert not caught.bad, caught.bad[:3]
        assert sum(lora_modules_loaded(m) for m in models.values()) == sum(len(pieces(a, "diffusers", t))
                                                                           for t in targets)
        got = sd_forward(name, models)
        results["diffusers"] = {c: gap(got[c], want[c], was[c]) for c in want}
    assert results
    assert all(g <= GAP for per in results.values() for g in per.values()), results
    assert len(report.extracted) == sum(len(pieces(a, fmt, t)) for t in targets)
    assert max(layer.rel_error for layer in report.extracted) < 1e-3


# final adaLN modulations whose halves diffusers holds the other way round: (shift; scale) -> (scale; shift)
SWAPPED_FINAL = {"flux": "final_layer.adaLN_modulation.1", "flux2": "final_layer.adaLN_modulation.1",
                 "flux3": "final_layer.image.adaLN_modulation.1", "sd3": "final_layer.adaLN_modulation.1",
                 "hunyuan_video15": "final_layer.adaLN_modulation.1"}


@pytest.mark.parametrize("name", sorted(SWAPPED_FINAL))
def test_a_fine_tuned_final_modulation_comes_back_through_diffusers_and_comfyui(tmp_path, name):
    """A fine-tune of the final adaLN modulation alone (`--include final`, a diffusers folder base and a native
    file): only that module is extracted, and the model each client loads (the pipeline's load_lora_weights,
    ComfyUI's rules) reproduces the fine-tune in a full forward pass. (Its row order, which diffusers swaps, is
    checked against diffusers' own converters in test_new_architectures: here both sides go through our map.)"""
    model = make_transformer(name)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    detected = arch.detect(set(state))
    a = detected.arch
    base = canonical_of(a, state, detected.layout, detected.prefix)
    targets = [t for t in a.targets({k: tuple(v.shape) for k, v in base.items()}, groups={"final"})
               if t.module == SWAPPED_FINAL[name]]
    assert len(targets) == 1
    tuned = plant(targets, base, torch.Generator().manual_seed(9), scale=0.5)
    (tmp_path / "base" / "transformer").mkdir(parents=True)
    st_save_file(state, str(tmp_path / "base" / "transformer" / "diffusion_pytorch_model.safetensors"))
    st_save_file({k: v.contiguous() for k, v in tuned.items()}, str(tmp_path / "tuned.safetensors"))
    tuned_state = with_canonical(a, state, detected.layout, tuned, detected.prefix)
    want, was = run_forward(name, tuned_state), run_forward(name, state)
    for fmt in ("diffusers", "comfy"):
        out = tmp_path / f"{fmt}.safetensors"
        report = extract(tmp_path / "base", tmp_path / "tuned.safetensors", out, rank=PLANTED_RANK, format=fmt,
                         groups=["final"], clamp_quantile=None, bias_diff=False, progress=False, device="cpu")
        assert [layer.name for layer in report.extracted] == [targets[0].module]  # the unchanged others skipped
        if fmt == "diffusers":
            loaded = make_transformer(name)
            pipe = make_pipeline(transformer_spec(name)[1], transformer=loaded)
            with LoaderWarnings() as caught:
                pipe.load_lora_weights(str(tmp_path), weight_name=out.name, adapter_name="x")
            assert not caught.bad, caught.bad[:3]
            got = forward(loaded, transformer_inputs(name))
        else:
            patched = comfy_apply(out, unet_key_map(a.name, {k: tuple(v.shape) for k, v in base.items()}), base)
            got = run_forward(name, with_canonical(a, state, detected.layout, patched, detected.prefix))
        assert gap(got, want, was) <= GAP, (fmt, gap(got, want, was))


def test_sdxl_kohya_lora_with_a_rank_per_layer_loads_in_diffusers_at_full_strength(tmp_path):
    """A recipe gives each layer its own rank; diffusers (0.42) drops the per-module alphas of such a kohya
    SDXL file (its alpha_pattern keys match nothing), so every module carries one alpha and the factors the
    rest: loaded by the pipeline, the UNet and both text encoders are the fine-tune."""
    from test_sd_pipelines import write_pipeline, write_single_file
    a = arch.get("sdxl")
    state = sd_state("sdxl")
    base = canonical_of(a, state, "diffusers")
    targets = a.targets({k: tuple(v.shape) for k, v in base.items()})
    gen = torch.Generator().manual_seed(4)
    tuned = dict(base)
    for i, target in enumerate(targets):  # a change of rank 1, 2 or 3 in each written module
        flat = base[target.key].reshape(target.shape[0], -1)
        change = torch.zeros_like(flat)
        for _, lo, hi in target.splits or (("", 0, flat.shape[0]),):
            r = 1 + i % 3
            d = torch.randn(hi - lo, r, generator=gen) @ torch.randn(r, flat.shape[1], generator=gen)
            change[lo:hi] = d * (0.1 * float(flat.std()) / float(d.std()))
        tuned[target.key] = (flat + change).reshape(base[target.key].shape)
    tuned_state = with_canonical(a, state, "diffusers", tuned)

    def components(flat):
        return {c: {k[len(c) + 1:]: v.contiguous() for k, v in flat.items() if k.startswith(c + ".")}
                for c in ("unet", "text_encoder", "text_encoder_2")}
    write_pipeline(tmp_path / "base", components(state))
    write_single_file(tmp_path / "tuned.safetensors", "sdxl", components(tuned_state))
    out = tmp_path / "lora.safetensors"
    report = extract(tmp_path / "base", tmp_path / "tuned.safetensors", out, rank=4, recipe="sv_fro=0.99999",
                     format="kohya", clamp_quantile=None, progress=False, device="cpu")
    assert {layer.rank for layer in report.extracted} == {1, 2, 3}
    written = load_file(out)
    assert {float(v) for k, v in written.items() if k.endswith(".alpha")} == {4.0}
    models = sd_models("sdxl", state)
    pipe = make_pipeline("StableDiffusionXLPipeline", **models)
    with LoaderWarnings() as caught:
        pipe.load_lora_weights(str(tmp_path), weight_name=out.name)
    assert not caught.bad, caught.bad[:3]
    want, was = sd_forward("sdxl", sd_models("sdxl", tuned_state)), sd_forward("sdxl", sd_models("sdxl", state))
    got = sd_forward("sdxl", models)
    gaps = {c: gap(got[c], want[c], was[c]) for c in want}
    assert all(g <= GAP for g in gaps.values()), gaps


def _clip(seed):
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    return CLIPTextModel(config).eval()


def _tuned_copy(model, gen):
    import copy
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if param.dim() == 2 and ".layers." in name:
                param += 0.02 * torch.randn(param.shape[0], 2, generator=gen) @ torch.randn(2, param.shape[1],
                                                                                          generator=gen)
    return tuned


def _flux_pipeline_folder(folder, transformer, text_encoder):
    import json
    transformer.save_pretrained(folder / "transformer")
    text_encoder.save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                         "transformer": ["diffusers", "FluxTransformer2DModel"],
                                                         "text_encoder": ["transformers", "CLIPTextModel"]}))
    return folder


def test_a_pipeline_folders_changed_text_encoder_comes_back_through_the_pipelines_loader(tmp_path):
    """Flux.1 pipeline folders whose CLIP-L was fine-tuned too: the transformer's LoRA in the family's spelling,
    the text encoder's in the names FluxPipeline.load_lora_weights takes (OUT_text_encoder); through the
    pipeline's own loader, the encoder's forward pass is the fine-tune's within 2% of its change."""
    gen = torch.Generator().manual_seed(5)
    base_te = _clip(0)
    tuned_te = _tuned_copy(base_te, gen)
    transformer = make_transformer("flux")
    base = _flux_pipeline_folder(tmp_path / "base", transformer, base_te)
    tuned = _flux_pipeline_folder(tmp_path / "tuned", transformer, tuned_te)  # the transformer did not change
    report = extract(base, tuned, tmp_path / "lora.safetensors", rank=4, progress=False)
    te = report.components["text_encoder"]
    assert te.output == str(tmp_path / "lora_text_encoder.safetensors") and report.identical
    ids = torch.randint(2, 100, (2, 12), generator=gen)
    with torch.no_grad():
        want, was = tuned_te(ids).last_hidden_state, base_te(ids).last_hidden_state
    pipeline = make_pipeline("FluxPipeline", transformer=make_transformer("flux"), text_encoder=_clip(0))
    with LoaderWarnings() as warnings:
        pipeline.load_lora_weights(str(tmp_path), weight_name="lora_text_encoder.safetensors")
    assert [w for w in warnings.bad if "FluxTransformer2DModel" not in w] == []  # (this file holds no transformer)
    with torch.no_grad():
        got = pipeline.text_encoder(ids).last_hidden_state
    assert float((got - want).norm()) <= 0.02 * float((want - was).norm())
    alone = extract(base, tuned, tmp_path / "unet_only.safetensors", rank=4, text_encoders=False, progress=False)
    assert not alone.components
    for text_encoders in (True, False):  # a fine-tune given as its transformer alone: said only where asked for
        one = extract(base, tuned / "transformer", tmp_path / f"one_{text_encoders}.safetensors", rank=4,
                      text_encoders=text_encoders, progress=False)
        said = [w for w in one.warnings if w.startswith("text_encoder: only the base's pipeline folder holds it")]
        assert not one.components and len(said) == int(text_encoders)


def _clip_with_projection(seed):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1, projection_dim=16)
    return CLIPTextModelWithProjection(config).eval()


def test_sd35_pipeline_folders_changed_clip_encoders_come_back_through_the_pipelines_loader(tmp_path):
    """SD3.5 pipeline folders whose CLIP-L and bigG (CLIPTextModelWithProjection both) were fine-tuned with the
    transformer: the transformer's LoRA and one file per encoder; through StableDiffusion3Pipeline's own
    load_lora_weights, each encoder's forward pass (hidden states and projected embeds) is the fine-tune's."""
    import json
    gen = torch.Generator().manual_seed(6)
    encoders = {"text_encoder": _clip_with_projection(1), "text_encoder_2": _clip_with_projection(2)}
    tuned_encoders = {c: _tuned_copy(m, gen) for c, m in encoders.items()}
    transformer = make_transformer("sd3")
    for role, models in (("base", encoders), ("tuned", tuned_encoders)):
        folder = tmp_path / role
        transformer.save_pretrained(folder / "transformer")
        index = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}
        for component, model in models.items():
            model.save_pretrained(folder / component)
            index[component] = ["transformers", "CLIPTextModelWithProjection"]
        (folder / "model_index.json").write_text(json.dumps(index))
    report = extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "lora.safetensors", rank=4, progress=False)
    assert sorted(report.components) == ["text_encoder", "text_encoder_2"]
    pipeline = make_pipeline("StableDiffusion3Pipeline", transformer=make_transformer("sd3"),
                             text_encoder=_clip_with_projection(1), text_encoder_2=_clip_with_projection(2))
    for component in encoders:
        with LoaderWarnings() as warnings:
            pipeline.load_lora_weights(str(tmp_path), weight_name=f"lora_{component}.safetensors")
        # (each file holds one component: the loader says the others found none)
        assert [w for w in warnings.bad if not w.startswith("No LoRA keys associated")] == []
    ids = torch.randint(2, 100, (2, 12), generator=gen)
    for component, base_model in encoders.items():
        with torch.no_grad():
            want, was, got = (m(ids) for m in (tuned_encoders[component], base_model, getattr(pipeline, component)))
        for field in ("last_hidden_state", "text_embeds"):
            change = float((getattr(want, field) - getattr(was, field)).norm())
            assert change > 0 and float((getattr(got, field) - getattr(want, field)).norm()) <= 0.02 * change, \
                (component, field)
