"""Every other model diffusers loads LoRAs for: a diffusers folder of a class without a table extracts in the
PEFT spelling with its component prefix, which the pipeline's own loader takes in full. The classes are
enumerated from the installed diffusers (every pipeline with a LoRA loader, its transformer/UNet class), so a
new diffusers release widens what is checked without new code."""

import inspect
import json
import logging
import warnings

import pytest
import torch
from safetensors.torch import load_file

from lora_colab import arch, extract
from lora_colab.arch.diffusers_model import DiffusersModel
from lora_colab.cli import main
from lora_colab.io.opener import DiffusersFolder

from whole_model import LoaderWarnings, forward, gap, make_pipeline, lora_modules_loaded

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
accelerate = pytest.importorskip("accelerate")

MODEL_COMPONENTS = ("transformer", "transformer_2", "unet")


def loadable_classes():
    """{model class name: (class, a pipeline class that loads LoRAs into it, component)}: the classic pipelines'
    model components by their __init__ annotations, the modular ones' by their blocks' expected components."""
    from diffusers.loaders.lora_base import LoraBaseMixin
    found = {}
    pipelines = [getattr(diffusers, name, None) for name in sorted(dir(diffusers)) if name.endswith("Pipeline")]
    pipelines = [p for p in pipelines if isinstance(p, type) and issubclass(p, LoraBaseMixin)]
    for pipeline in sorted(pipelines, key=lambda p: issubclass(p, diffusers.ModularPipeline)):  # classic ones first
        for component, cls in model_components(pipeline):
            if component in getattr(pipeline, "_lora_loadable_modules", []) and isinstance(cls, type) \
                    and issubclass(cls, torch.nn.Module) and hasattr(cls, "load_lora_adapter"):
                found.setdefault(cls.__name__, (cls, pipeline, component))
    return found


def model_components(pipeline):
    """[(component, class)] of a pipeline's transformer/UNet components."""
    if issubclass(pipeline, diffusers.ModularPipeline):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                specs = pipeline().blocks.expected_components
        except Exception:  # noqa: BLE001 - a modular pipeline whose default blocks need more than offline defaults
            return []
        return [(spec.name, spec.type_hint) for spec in specs if spec.name in MODEL_COMPONENTS]
    params = inspect.signature(pipeline.__init__).parameters
    pairs = []
    for component in MODEL_COMPONENTS:
        if component in params:
            cls = params[component].annotation
            if isinstance(cls, str):
                cls = getattr(diffusers, cls.split(".")[-1].strip("'\""), None)
            pairs.append((component, cls))
    return pairs


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def meta_model(cls):
    """The class with its default config on the meta device (no memory); None when the defaults do not
    build (a first-class family's test builds it from its own config)."""
    try:
        with accelerate.init_empty_weights(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls()
    except Exception:  # noqa: BLE001
        return None


def load_on_meta(model, pipeline, component, state_dict):
    """Load a LoRA state dict through the pipeline's own converter and loader into a meta-device model;
    returns the diffusers/PEFT warnings it gave."""
    caught = Warnings()
    logger = logging.getLogger("diffusers")
    logger.addHandler(caught)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # meta parameters: copying values is a no-op, names still matched
            state = pipeline.lora_state_dict(state_dict)
            state = state[0] if isinstance(state, tuple) else state
            loader = getattr(pipeline, "load_lora_into_unet" if component == "unet" else "load_lora_into_transformer")
            extra = {"network_alphas": None} if "network_alphas" in inspect.signature(loader).parameters else {}
            loader(state, **{"unet" if component == "unet" else "transformer": model}, adapter_name="x", **extra)
    finally:
        logger.removeHandler(caught)
    return caught.messages


def test_every_class_a_lora_loader_takes_is_first_class_or_taken_in_full_through_the_fallback():
    classes = loadable_classes()
    assert len(classes) >= 30, sorted(classes)
    assert {"Flux3Transformer2DModel", "MiniMaxH3Transformer3DModel"} <= set(classes)  # from modular pipelines
    checked, first_class, unbuildable, wrong = [], [], [], []
    for name, (cls, pipeline, component) in sorted(classes.items()):
        model = meta_model(cls)
        if model is None:
            unbuildable.append(name)
            continue
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        detected = arch.detect(set(shapes))
        if name in detected.arch.diffusers_classes:  # a folder of this class is read through its family's table
            first_class.append(name)
            continue
        fallback = DiffusersModel(DiffusersFolder(name, pipeline.__name__, component, dict(model.config)))
        targets = fallback.targets(shapes)
        state = {}
        for t in targets:
            (module,) = fallback.lora_modules(t, arch.resolve_format(fallback, "auto"))
            extra = (1,) * (len(t.shape) - 2)
            state[module.name + ".lora_A.weight"] = torch.zeros((1, t.shape[1]) + extra)
            state[module.name + ".lora_B.weight"] = torch.zeros((t.shape[0], 1) + extra)
        messages = load_on_meta(model, pipeline, component, state)
        injected = {n for n, m in model.named_modules() if "x" in getattr(m, "lora_A", {})}
        missing = [t.module for t in targets if t.module not in injected]
        bad = [m for m in messages if any(w in m.lower() for w in ("unexpected", "missing", "not loaded"))]
        if missing or bad or not targets:
            wrong.append((name, len(targets), missing[:3], bad[:1]))
        checked.append((name, len(targets)))
    assert not wrong, wrong
    assert len(checked) >= 10, (checked, first_class, unbuildable)
    assert {"SD3Transformer2DModel", "FluxTransformer2DModel", "QwenImageTransformer2DModel"} <= set(first_class)
    assert set(unbuildable) <= {"HiDreamImageTransformer2DModel"}, unbuildable  # first class: built in its test


# --- a tiny model of a class without a table, end to end -------------------------------------------------

AURA = dict(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
            out_channels=4, pos_embed_max_size=16)


def aura(seed=0):
    torch.manual_seed(seed)
    return diffusers.AuraFlowTransformer2DModel(**AURA).eval()


def pipeline_folder(folder, model):
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "AuraFlowPipeline",
                                                         "transformer": ["diffusers", "AuraFlowTransformer2DModel"]}))
    model.save_pretrained(folder / "transformer")


def test_an_auraflow_pipeline_pair_extracts_a_lora_its_pipeline_loads_and_reproduces(tmp_path, capsys):
    base = aura()
    tuned = aura()
    gen = torch.Generator().manual_seed(3)
    planted = 0
    with torch.no_grad():
        for name, module in tuned.named_modules():  # a fine-tune of the attention and feed-forward layers
            if isinstance(module, torch.nn.Linear) and (".attn." in name or ".ff." in name):
                w = module.weight
                change = torch.randn(w.shape[0], 2, generator=gen) @ torch.randn(2, w.shape[1], generator=gen)
                w += change * (0.1 * w.std() / change.std())
                planted += 1
    pipeline_folder(tmp_path / "base", base)
    pipeline_folder(tmp_path / "tuned", tuned)
    out = tmp_path / "lora.safetensors"
    report = extract(tmp_path / "base", tmp_path / "tuned", out, rank=2, clamp_quantile=None, dtype="fp32",
                     progress=False, device="cpu")
    assert report.architecture.startswith("diffusers AuraFlowTransformer2DModel, the transformer of AuraFlowPipeline")
    assert report.format == "diffusers" and len(report.extracted) == planted
    assert any("AuraFlowPipeline.load_lora_weights takes" in w for w in report.warnings)
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=gen), encoder_hidden_states=torch.randn(
        1, 8, 16, generator=gen), timestep=torch.tensor([600]))
    want, was = forward(tuned, inputs), forward(base, inputs)
    model = aura()
    pipe = make_pipeline("AuraFlowPipeline", transformer=model)
    caught = Warnings()
    logging.getLogger("diffusers").addHandler(caught)
    try:
        pipe.load_lora_weights(str(out))
    finally:
        logging.getLogger("diffusers").removeHandler(caught)
    assert not [m for m in caught.messages if "unexpected" in m.lower() or "missing" in m.lower()], caught.messages
    assert lora_modules_loaded(model) == planted
    assert gap(forward(model, inputs), want, was) <= 0.02
    assert main(["inspect", str(tmp_path / "base")]) == 0
    assert "AuraFlowTransformer2DModel" in capsys.readouterr().out


def test_a_folder_of_no_diffusers_class_or_of_two_classes_is_one_line(tmp_path, capsys):
    pipeline_folder(tmp_path / "base", aura())
    config = tmp_path / "base" / "transformer" / "config.json"
    pipeline_folder(tmp_path / "fake", aura())
    fake = tmp_path / "fake" / "transformer" / "config.json"
    fake.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "NotADiffusersModel"}))
    args = ["extract", str(tmp_path / "fake"), str(tmp_path / "base"), "-o", str(tmp_path / "x.safetensors"), "-q"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "names NotADiffusersModel, which is no class of diffusers" in err
    # the same weights seen as a single file (generic) against the diffusers folder: both files named
    single = tmp_path / "single.safetensors"
    import shutil
    shutil.copy(tmp_path / "base" / "transformer" / "diffusion_pytorch_model.safetensors", single)
    assert main(["extract", str(tmp_path / "base"), str(single), "-o", str(tmp_path / "y.safetensors"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(single) in err and "AuraFlowTransformer2DModel" in err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


# --- a pipeline's folder: every component its LoRA loader loads -----------------------------------------

FIBO = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=[2, 2, 4], text_encoder_dim=16)
SMOLLM3 = dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def fibo(seed=0):
    """BriaFiboEditPipeline's models, tiny: its transformer and its text encoder (SmolLM3)."""
    import transformers
    torch.manual_seed(seed)
    transformer = diffusers.BriaFiboTransformer2DModel(**FIBO).eval()
    return transformer, transformers.SmolLM3ForCausalLM(transformers.SmolLM3Config(**SMOLLM3)).eval()


def plant(model, gen, inside):
    """A rank-2 change on every Linear whose name holds one of `inside`; returns how many were changed."""
    planted = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and any(part in name for part in inside):
                w = module.weight
                change = torch.randn(w.shape[0], 2, generator=gen) @ torch.randn(2, w.shape[1], generator=gen)
                w += change * (0.1 * w.std() / change.std())
                planted += 1
    return planted


def save_pipeline(folder, pipeline, **models):
    """A pipeline folder of `models` (the others absent), as save_pretrained lays it out."""
    folder.mkdir(parents=True)
    index = {"_class_name": pipeline, "vae": ["diffusers", "AutoencoderKLWan"]}  # named, not there
    for name, model in models.items():
        library = "transformers" if type(model).__module__.startswith("transformers") else "diffusers"
        index[name] = [library, type(model).__name__]
        model.save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps(index))


def load_lora(pipe, path, **kwargs):
    """pipe.load_lora_weights, returning the warnings of diffusers and PEFT that say a key did not load."""
    with LoaderWarnings() as caught:
        pipe.load_lora_weights(str(path), **kwargs)
    return caught.bad


def test_a_pipeline_folder_pair_extracts_its_transformer_and_text_encoder_in_one_file_the_pipeline_loads(
        tmp_path, capsys):
    """BriaFiboEditPipeline (no table here) loads LoRAs into its transformer and its text encoder in one call:
    both come out of the pipeline folders, under their prefixes, and the loaded models reproduce the fine-tune
    (full forward passes of both)."""
    gen = torch.Generator().manual_seed(3)
    base_transformer, base_encoder = fibo()
    tuned_transformer, tuned_encoder = fibo()
    planted = {"transformer": plant(tuned_transformer, gen, (".attn.", ".ff.", ".ff_context.")),
               "text_encoder": plant(tuned_encoder, gen, (".self_attn.", ".mlp."))}
    save_pipeline(tmp_path / "base", "BriaFiboEditPipeline", transformer=base_transformer, text_encoder=base_encoder)
    save_pipeline(tmp_path / "tuned", "BriaFiboEditPipeline", transformer=tuned_transformer,
                  text_encoder=tuned_encoder)
    out = tmp_path / "lora.safetensors"
    report = extract(tmp_path / "base", tmp_path / "tuned", out, rank=2, clamp_quantile=None, dtype="fp32",
                     progress=False, device="cpu")
    assert report.architecture.startswith(
        "diffusers BriaFiboTransformer2DModel, the transformer of BriaFiboEditPipeline with its text_encoder")
    assert any("(transformer.<module>, text_encoder.<module>, lora_A/B)" in w for w in report.warnings)
    names = {k.rsplit(".lora_", 1)[0] for k in load_file(str(out))}
    assert {n.split(".", 1)[0] for n in names} == set(planted)
    assert {c: sum(n.startswith(c + ".") for n in names) for c in planted} == planted

    gen = torch.Generator().manual_seed(4)
    inputs = dict(hidden_states=torch.randn(1, 16, 4, generator=gen), encoder_hidden_states=torch.randn(
        1, 8, 16, generator=gen), text_encoder_layers=[torch.randn(1, 8, 16, generator=gen) for _ in range(2)],
        timestep=torch.tensor([0.6]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3))
    tokens = dict(input_ids=torch.randint(3, 100, (1, 8), generator=gen))
    transformer, encoder = fibo()
    pipe = make_pipeline("BriaFiboEditPipeline", transformer=transformer, text_encoder=encoder)
    assert not load_lora(pipe, out)
    assert lora_modules_loaded(transformer) == planted["transformer"]
    assert lora_modules_loaded(encoder) == planted["text_encoder"]
    assert gap(forward(transformer, inputs), forward(tuned_transformer, inputs),
               forward(base_transformer, inputs)) <= 0.02
    assert gap(forward(encoder, tokens), forward(tuned_encoder, tokens), forward(base_encoder, tokens)) <= 0.02

    no_text = extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "unet_only.safetensors", rank=2,
                      text_encoders=False, progress=False, device="cpu")
    assert len(no_text.extracted) == planted["transformer"]
    assert main(["inspect", str(tmp_path / "base")]) == 0
    assert "BriaFiboTransformer2DModel, the transformer of BriaFiboEditPipeline with its text_encoder" in \
        capsys.readouterr().out


VACE = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=3, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32, vace_layers=[0, 2], vace_in_channels=48)


def vace(seed=0):
    torch.manual_seed(seed)
    return diffusers.WanVACETransformer3DModel(**VACE).eval()


def test_a_pipelines_second_transformer_is_a_file_of_its_own_under_the_names_its_loader_reads(tmp_path):
    """WanVACEPipeline loads transformer_2 only from a file of its own, under `transformer.` names
    (load_into_transformer_2=True): the pipeline folders give the transformer's LoRA and say so; the
    transformer_2 folders give the second expert's, which that call loads in full and which reproduces it."""
    gen = torch.Generator().manual_seed(3)
    models = {role: (vace(), vace(1)) for role in ("base", "tuned")}
    planted = [plant(model, gen, (".attn1.", ".attn2.", ".ffn.")) for model in models["tuned"]]
    for role, (first, second) in models.items():
        save_pipeline(tmp_path / role, "WanVACEPipeline", transformer=first, transformer_2=second)
    first_out, second_out = tmp_path / "high.safetensors", tmp_path / "low.safetensors"
    report = extract(tmp_path / "base", tmp_path / "tuned", first_out, rank=2, clamp_quantile=None, dtype="fp32",
                     progress=False, device="cpu")
    assert len(report.extracted) == planted[0]
    assert any("transformer_2 is not in this file" in w and "load_into_transformer_2=True" in w
               for w in report.warnings), report.warnings
    report = extract(tmp_path / "base" / "transformer_2", tmp_path / "tuned" / "transformer_2", second_out, rank=2,
                     clamp_quantile=None, dtype="fp32", progress=False, device="cpu")
    assert report.architecture.startswith("diffusers WanVACETransformer3DModel, the transformer_2 of WanVACEPipeline")
    assert any("load_lora_weights(..., load_into_transformer_2=True)" in w for w in report.warnings)
    assert all(k.startswith("transformer.") for k in load_file(str(second_out)))

    gen = torch.Generator().manual_seed(4)
    inputs = dict(hidden_states=torch.randn(1, 16, 2, 4, 4, generator=gen), timestep=torch.tensor([600]),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=gen),
                  control_hidden_states=torch.randn(1, 48, 2, 4, 4, generator=gen))
    first, second = vace(), vace(1)
    pipe = make_pipeline("WanVACEPipeline", transformer=first, transformer_2=second)
    assert not load_lora(pipe, first_out)
    assert not load_lora(pipe, second_out, load_into_transformer_2=True)
    assert [lora_modules_loaded(first), lora_modules_loaded(second)] == planted
    for got, base, tuned in zip((first, second), models["base"], models["tuned"]):
        assert gap(forward(got, inputs), forward(tuned, inputs), forward(base, inputs)) <= 0.02
