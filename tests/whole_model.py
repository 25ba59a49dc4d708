"""Whole-model fidelity harness: tiny models of diffusers' own classes, a planted fine-tune that differs per
slice of every fused weight, the two clients that load our files (diffusers' pipeline `load_lora_weights`,
and ComfyUI's key rules with its patch arithmetic), and full forward passes with the inputs each model's
forward takes."""

import inspect
import logging
import math

import torch
from safetensors.torch import load_file

from test_diffusers_loading import WarningCatcher

PLANTED_RANK = 2  # rank of the planted change in each slice (each written module of the split spellings)


# --- models and their forward passes ----------------------------------------------------------------

TRANSFORMERS = {
    "flux": ("FluxTransformer2DModel", "FluxPipeline",
             dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                  axes_dims_rope=(4, 6, 6))),
    "zimage": ("ZImageTransformer2DModel", "ZImagePipeline",
               dict(dim=64, n_layers=2, n_refiner_layers=1, n_heads=4, n_kv_heads=4, cap_feat_dim=32,
                    axes_dims=[4, 6, 6], axes_lens=[64, 32, 32])),
}


def transformer_spec(name):
    """(model class name, pipeline class name, tiny config) of a transformer family."""
    if name in TRANSFORMERS:
        return TRANSFORMERS[name]
    from test_new_architectures import TINY
    return TINY[name]


def make_transformer(name, seed=0):
    import diffusers
    cls, _, kwargs = transformer_spec(name)
    torch.manual_seed(seed)
    model = getattr(diffusers, cls)(**kwargs).eval()
    with torch.no_grad():  # a trained model has no all-zero layer: zero-initialized outputs (ERNIE-Image's
        for param in model.parameters():  # final linear) would hide every change behind them
            if param.dim() >= 2 and not param.any():
                param.normal_(0, 0.02)
    return model


def transformer_inputs(name, seed=0):
    """Keyword inputs of one forward pass of the tiny model (image tokens 4x4, 8 text tokens)."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen)
    t = torch.tensor([0.6])
    ids3 = torch.zeros(16, 3)
    ids3[:, 1], ids3[:, 2] = torch.arange(4).repeat_interleave(4), torch.arange(4).repeat(4)
    if name == "flux":
        return dict(hidden_states=r(1, 16, 16), encoder_hidden_states=r(1, 8, 32), pooled_projections=r(1, 32),
                    timestep=t, img_ids=ids3, txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]))
    if name == "chroma":
        return dict(hidden_states=r(1, 16, 16), encoder_hidden_states=r(1, 8, 32), timestep=t, img_ids=ids3,
                    txt_ids=torch.zeros(8, 3))
    if name == "flux2":
        ids4 = torch.zeros(16, 4)
        ids4[:, 1:] = ids3
        return dict(hidden_states=r(1, 16, 16), encoder_hidden_states=r(1, 8, 32), timestep=t, img_ids=ids4,
                    txt_ids=torch.zeros(8, 4), guidance=torch.tensor([3.5]))
    if name == "hunyuan_video15":  # 8 Qwen text tokens (2 padding), 4 ByT5 tokens, 2 image tokens (t2v: zeros)
        mask = torch.ones(1, 8)
        mask[0, 6:] = 0
        return dict(hidden_states=r(1, 9, 1, 4, 4), timestep=torch.tensor([600.0]), encoder_hidden_states=r(1, 8, 16),
                    encoder_attention_mask=mask, encoder_hidden_states_2=r(1, 4, 8),
                    encoder_attention_mask_2=torch.ones(1, 4), image_embeds=torch.zeros(1, 2, 8))
    if name == "minimax_h3":  # one packed sequence: 8 text rows, 16 video rows, 4 audio rows
        tags = torch.tensor([1] * 8 + [0] * 16 + [2] * 4)
        position = torch.zeros(28, 3)
        position[8:24] = ids3
        position[24:, 0] = torch.arange(4)
        return dict(hidden_states=r(1, 16, 16), audio_hidden_states=r(1, 4, 8), encoder_hidden_states=r(1, 8, 16),
                    timestep=torch.tensor([0.6, 0.3]), timestep_indices=(tags == 2).long(), token_tags=tags,
                    position_ids=position, video_indices=torch.arange(8, 24), audio_indices=torch.arange(24, 28),
                    text_indices=torch.arange(8))
    if name == "anima":
        # (the tiny model concatenates no padding mask: diffusers resizes it with torchvision, not a dependency)
        return dict(hidden_states=r(1, 16, 1, 8, 8), timestep=torch.tensor([0.5]), encoder_hidden_states=r(1, 8, 32))
    if name == "cosmos_predict2_5":  # the text features before crossattn_proj (Qwen2.5-VL's, 48 wide here)
        return dict(hidden_states=r(1, 16, 1, 8, 8), timestep=torch.tensor([0.5]), encoder_hidden_states=r(1, 8, 48))
    if name == "ace_step15":  # 8 latent frames (4 acoustic channels) after 8 of context, 6 condition tokens
        return dict(hidden_states=r(1, 8, 4), context_latents=r(1, 8, 4), timestep=torch.tensor([0.6]),
                    timestep_r=torch.tensor([0.6]), encoder_hidden_states=r(1, 6, 32))
    if name == "kandinsky5":
        return dict(hidden_states=r(1, 1, 8, 8, 4), encoder_hidden_states=r(1, 8, 16), timestep=torch.tensor([600.0]),
                    pooled_projections=r(1, 8), visual_rope_pos=[torch.arange(1), torch.arange(4), torch.arange(4)],
                    text_rope_pos=torch.arange(8))
    if name == "ideogram4":
        from diffusers.models.transformers.transformer_ideogram4 import LLM_TOKEN_INDICATOR, OUTPUT_IMAGE_INDICATOR
        indicator = torch.tensor([[LLM_TOKEN_INDICATOR] * 8 + [OUTPUT_IMAGE_INDICATOR] * 16])
        position = torch.zeros(1, 24, 3)
        position[0, 8:, 1:] = ids3[:, 1:]
        return dict(hidden_states=r(1, 24, 16), timestep=t, encoder_hidden_states=r(1, 24, 32), position_ids=position,
                    segment_ids=torch.zeros(1, 24, dtype=torch.long), indicator=indicator)
    if name == "ernie_image":
        return dict(hidden_states=r(1, 4, 4, 4), timestep=t, text_bth=r(1, 8, 16), text_lens=torch.tensor([8]))
    if name == "lumina2":
        return dict(hidden_states=r(1, 4, 8, 8), timestep=t, encoder_hidden_states=r(1, 8, 16),
                    encoder_attention_mask=torch.ones(1, 8, dtype=torch.bool))
    if name == "hidream":
        return dict(hidden_states=r(1, 4, 8, 8), timesteps=torch.tensor([600]), encoder_hidden_states_t5=r(1, 8, 16),
                    encoder_hidden_states_llama3=r(2, 1, 8, 16), pooled_embeds=r(1, 16))
    if name == "sd3":
        return dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states=r(1, 8, 32), pooled_projections=r(1, 16),
                    timestep=torch.tensor([600]))
    if name == "flux3":
        ids4 = torch.zeros(16, 4)
        ids4[:, 1:] = ids3
        cond_ids = ids4.clone()
        cond_ids[:, 0] = 1  # the reference image sits at t = 1
        return dict(hidden_states=r(1, 16, 16), encoder_hidden_states=r(1, 8, 32), timestep=t, img_ids=ids4,
                    txt_ids=torch.zeros(8, 4), image_cond_hidden_states=r(1, 16, 16), image_cond_ids=cond_ids)
    if name == "zimage":
        return dict(x=[r(16, 1, 8, 8)], t=t, cap_feats=[r(8, 32)])
    if name == "qwen_image":
        return dict(hidden_states=r(1, 16, 16), encoder_hidden_states=r(1, 8, 32),
                    encoder_hidden_states_mask=torch.ones(1, 8), timestep=t, img_shapes=[(1, 4, 4)])
    if name == "qwen_image_2_1":
        mask = torch.zeros(1, 12, dtype=torch.bool)
        mask[0, 8:] = True
        return dict(hidden_states=r(1, 16, 16), encoder_hidden_states=r(1, 8, 32), timestep=t,
                    img_shapes=[[(1, 4, 4)]], img_mask=mask)
    if name == "wan":
        return dict(hidden_states=r(1, 4, 1, 8, 8), timestep=torch.tensor([600]), encoder_hidden_states=r(1, 8, 32))
    if name == "krea2":
        pos = torch.zeros(24, 3)
        pos[8:] = ids3
        return dict(hidden_states=r(1, 16, 16), encoder_hidden_states=r(1, 8, 2, 32), timestep=t, position_ids=pos)
    if name == "ltx2":
        return dict(hidden_states=r(1, 16, 8), audio_hidden_states=r(1, 4, 8), encoder_hidden_states=r(1, 8, 16),
                    audio_encoder_hidden_states=r(1, 8, 16), timestep=t, num_frames=1, height=4, width=4,
                    audio_num_frames=4)
    raise KeyError(name)


def forward(model, inputs):
    """Every output tensor of one forward pass, flattened into one vector."""
    with torch.no_grad():
        out = model(**inputs, return_dict=False)
    tensors = []

    def collect(x):
        if isinstance(x, torch.Tensor):
            tensors.append(x.float().reshape(-1))
        elif isinstance(x, (list, tuple)):
            for item in x:
                collect(item)
    collect(out)
    return torch.cat(tensors)


class _Processor:
    """Stands in for a vision-language processor that a pipeline reads at construction (QwenImage21Pipeline
    tokenizes its system prompt there); loading LoRAs never uses it."""

    class tokenizer:
        @staticmethod
        def encode(text):
            return [0]

    @staticmethod
    def apply_chat_template(*args, **kwargs):
        return [[0, 1, 2]]


# pipelines whose constructor needs real side models (Cosmos 2.5's: a safety checker package, its VAE's config):
# built bare, holding only the given models, which is all `load_lora_weights` reads
BARE_PIPELINES = ("Cosmos2_5_PredictBasePipeline",)


def make_pipeline(pipeline_name, **components):
    """A diffusers pipeline holding only the given models (the others None): what `load_lora_weights` needs."""
    import diffusers
    cls = getattr(diffusers, pipeline_name)
    if issubclass(cls, diffusers.ModularPipeline):  # FLUX.3: components are set on a blocks pipeline
        pipeline = cls()
        pipeline.update_components(**components)
        return pipeline
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if pipeline_name in BARE_PIPELINES:
        pipeline = cls.__new__(cls)
        diffusers.DiffusionPipeline.__init__(pipeline)
        pipeline.register_modules(**{**{p.name: None for p in params}, **components})
        return pipeline
    required = [p.name for p in params if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
    given = {name: None for name in required}
    if "processor" in given:
        given["processor"] = _Processor()
    return cls(**{**given, **components})


# --- the planted fine-tune ------------------------------------------------------------------------

def plant(targets, tensors, gen, scale=0.1):
    """A tuned copy of canonical `tensors`: on every target, an independent rank-PLANTED_RANK change in each
    of its row slices (`target.splits`, else the whole weight), sized `scale` of the weight's spread."""
    tuned = dict(tensors)
    for target in targets:
        weight = tensors[target.key]
        flat = weight.reshape(weight.shape[0], -1)
        change = torch.zeros_like(flat)
        for _, a, b in target.splits or (("", 0, flat.shape[0]),):
            d = torch.randn(b - a, PLANTED_RANK, generator=gen) @ torch.randn(PLANTED_RANK, flat.shape[1],
                                                                               generator=gen)
            change[a:b] = d * (scale * float(flat.std()) / float(d.std()))
        tuned[target.key] = (flat + change).reshape(weight.shape)
    return tuned


def exact_rank(arch, fmt, targets):
    """The rank at which every module `fmt` writes holds the planted change exactly: PLANTED_RANK times the
    number of planted slices the largest written module spans."""
    from lora_colab.lora.formats import pieces
    most = 1
    for target in targets:
        slices = [(a, b) for _, a, b in target.splits] or [(0, target.shape[0])]
        for piece in pieces(arch, fmt, target):
            lo, hi = piece.rows
            most = max(most, sum(1 for a, b in slices if a < hi and b > lo))
    return PLANTED_RANK * most


# --- layouts --------------------------------------------------------------------------------------

def canonical_of(arch, state, layout, prefix=""):
    """{canonical key: tensor} of a state dict in `layout`, fused parts concatenated in row order."""
    cmap = arch.canonical_map({k: tuple(v.shape) for k, v in state.items()}, layout, prefix)
    return {key: cmap.assemble(key, state.__getitem__) for key, sources in cmap.sources.items() if None not in sources}


def with_canonical(arch, state, layout, canonical, prefix=""):
    """`state` (a diffusers or other layout) with every weight that maps to a canonical key replaced by its
    rows of `canonical[key]`."""
    cmap = arch.canonical_map({k: tuple(v.shape) for k, v in state.items()}, layout, prefix)
    out = dict(state)
    for key, sources in cmap.sources.items():
        if None in sources or key not in canonical:
            continue
        for source, rows in cmap.disassemble(key, canonical[key], lambda s: state[s].shape[0]).items():
            out[source] = rows.reshape(state[source].shape).to(state[source].dtype)
    return out


# --- ComfyUI ---------------------------------------------------------------------------------------

class Unloaded(AssertionError):
    """A LoRA tensor that ComfyUI's key map leaves unmatched ("lora key not loaded")."""


def comfy_apply(lora_path, key_map, weights, strength=1.0):
    """ComfyUI's loading of a LoRA file onto `weights` ({model key: tensor}, updated copy returned).

    key_map: LoRA module name -> (model key, None or (start, length) rows), as model_lora_keys_* build it.
    load_lora: `X.lora_up.weight`/`X.lora_down.weight` (or `X.lora_B/lora_A`) with `X.alpha` (None: 1.0);
    weight_adapter.lora: weight[rows] += strength · (alpha / down.shape[0]) · up @ down; `X.diff_b` adds to
    the bias, `X.diff` to the weight. Any tensor no rule consumes raises Unloaded.
    """
    lora = load_file(str(lora_path))
    out = dict(weights)
    used = set()
    for name, (key, rows) in key_map.items():
        for up_name, down_name in ((f"{name}.lora_up.weight", f"{name}.lora_down.weight"),
                                   (f"{name}.lora_B.weight", f"{name}.lora_A.weight")):
            if up_name not in lora:
                continue
            up, down = lora[up_name].float(), lora[down_name].float()
            alpha = float(lora[f"{name}.alpha"]) if f"{name}.alpha" in lora else None
            scale = 1.0 if alpha is None else alpha / down.shape[0]
            weight = out[key].float().clone()
            patch = (up.flatten(1) @ down.flatten(1)) * scale * strength
            view = weight if rows is None else weight[rows[0]:rows[0] + rows[1]]
            view += patch.reshape(view.shape)
            out[key] = weight
            used.update(n for n in (up_name, down_name, f"{name}.alpha") if n in lora)
        for suffix, param in ((".diff_b", ".bias"), (".diff", ".weight")):
            if name + suffix in lora:
                target = key[: -len(".weight")] + param
                out[target] = out[target].float() + strength * lora[name + suffix].float()
                used.add(name + suffix)
    unloaded = sorted(set(lora) - used)
    if unloaded:
        raise Unloaded(f"lora key not loaded: {unloaded[:3]} ({len(unloaded)} in all)")
    return out


# --- diffusers ------------------------------------------------------------------------------------

class LoaderWarnings(WarningCatcher):
    """Collects diffusers' and PEFT's warnings while a LoRA loads (a context manager)."""

    def __enter__(self):
        for name in ("diffusers", "peft"):
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc):
        for name in ("diffusers", "peft"):
            logging.getLogger(name).removeHandler(self)

    @property
    def bad(self):
        words = ("unexpected", "missing", "not loaded", "unsupported", "no lora keys")
        # "No LoRA keys associated to NoneType": a component this test's pipeline does not hold (None)
        return [m for m in self.messages if any(w in m.lower() for w in words) and "to NoneType" not in m]


def lora_modules_loaded(model):
    """Number of PEFT LoRA layers in a model."""
    from peft.tuners.lora import LoraLayer
    return sum(1 for _, m in model.named_modules() if isinstance(m, LoraLayer))


def gap(got, want, base):
    """‖got − want‖ / ‖want − base‖: how far the LoRA'd model is from the fine-tune, as a share of the
    fine-tune's own change."""
    change = float((want - base).norm())
    assert change > 0 and math.isfinite(change)
    return float((got - want).norm()) / change
