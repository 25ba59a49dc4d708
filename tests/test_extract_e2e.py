"""End to end with a real client: extract from a pair of small diffusers models, load the LoRA into the
base with diffusers, and compare forward outputs with the tuned model."""

import pytest
import torch
from safetensors.torch import save_file as st_save_file

from lora_colab import arch
from lora_colab.extraction.extractor import extract
from lora_colab.notebook.synthetic import write_layout, zimage_canonical_of, zimage_specs

from test_diffusers_loading import Z_CFG, sdxl_targets, sdxl_unet, zimage_model, clip

diffusers = pytest.importorskip("diffusers")


def planted(shape, rank, gen, scale):
    rows, cols = shape[0], int(torch.tensor(shape[1:]).prod())
    d = torch.randn(rows, rank, generator=gen) @ torch.randn(rank, cols, generator=gen)
    return (d * scale / d.pow(2).mean().sqrt()).reshape(shape)


def test_zimage_extracted_lora_reproduces_the_tuned_model_in_diffusers(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base_model = zimage_model()
    base_sd = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    canonical_of = zimage_canonical_of(Z_CFG)
    native = dict(zimage_specs(Z_CFG))
    canonical = {}
    for key, tensor in base_sd.items():  # diffusers -> native (fused qkv) weights
        ckey, cshape, rows = canonical_of(key, tuple(tensor.shape))
        canonical.setdefault(ckey, torch.zeros(cshape))
        if rows:
            canonical[ckey][rows[0]:rows[1]] = tensor
        else:
            canonical[ckey] = tensor
    canonical["norm_final.weight"] = torch.ones(native["norm_final.weight"])  # single files carry it, diffusers not
    targets = arch.get("zimage").targets(native)
    tuned = dict(canonical)
    for t in targets:
        tuned[t.key] = canonical[t.key] + planted(t.shape, 4, gen, 0.05)
    (tmp_path / "base" / "transformer").mkdir(parents=True)
    st_save_file(base_sd, str(tmp_path / "base" / "transformer" / "diffusion_pytorch_model.safetensors"))
    write_layout(tmp_path / "tuned.safetensors", zimage_specs(Z_CFG), canonical_of, lambda k, s: tuned[k],
                 torch.float32)
    report = extract(tmp_path / "base", tmp_path / "tuned.safetensors", tmp_path / "lora.safetensors", rank=8,
                     clamp_quantile=None, dtype="fp32", progress=False)
    assert len(report.extracted) == len(targets)

    tuned_model = zimage_model()
    tuned_model.load_state_dict({k: (tuned[c][r[0]:r[1]] if r else tuned[c])
                                 for k in base_sd for c, _, r in [canonical_of(k, tuple(base_sd[k].shape))]})
    lora_model = zimage_model()
    state_dict = diffusers.ZImagePipeline.lora_state_dict(str(tmp_path), weight_name="lora.safetensors")
    diffusers.ZImagePipeline.load_lora_into_transformer(state_dict, transformer=lora_model, adapter_name="x")

    torch.manual_seed(1)
    x, cap, t = [torch.randn(16, 1, 8, 8)], [torch.randn(8, 32)], torch.tensor([0.4])
    with torch.no_grad():
        out = {name: m(x, t, cap, return_dict=False)[0][0] for name, m in
               (("base", base_model), ("tuned", tuned_model), ("lora", lora_model))}
    change = float((out["tuned"] - out["base"]).norm())
    assert change > 0.05 * float(out["base"].norm())  # the fine-tune changes the output
    assert float((out["lora"] - out["tuned"]).norm()) < 1e-3 * change


def test_sdxl_extracted_lora_reproduces_the_tuned_unet_in_diffusers(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base_unet = sdxl_unet()
    sdxl, targets = sdxl_targets(base_unet, clip(12), clip(32, projection=True), conv=False)
    targets = [t for t in targets if t.component == "model"]
    base_sd = base_unet.state_dict()
    names = {t.key: arch.sgm_to_diffusers(t.module) + ".weight" for t in targets}
    base_file = {t.key: base_sd[names[t.key]].clone() for t in targets}
    base_file["model.diffusion_model.label_emb.0.0.weight"] = base_sd["add_embedding.linear_1.weight"].clone()
    tuned_file = dict(base_file)
    for t in targets:
        tuned_file[t.key] = base_file[t.key] + planted(t.shape, 3, gen, 0.05)
    st_save_file(base_file, str(tmp_path / "base.safetensors"))
    st_save_file(tuned_file, str(tmp_path / "tuned.safetensors"))
    report = extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "lora.safetensors",
                     rank=4, clamp_quantile=None, dtype="fp32", progress=False)
    assert len(report.extracted) == len(targets) > 300

    tuned_unet = sdxl_unet()
    tuned_unet.load_state_dict({**base_sd, **{names[k]: v for k, v in tuned_file.items() if k in names}})
    lora_unet = sdxl_unet()
    loader = diffusers.StableDiffusionXLPipeline
    state_dict, alphas = loader.lora_state_dict(str(tmp_path), weight_name="lora.safetensors",
                                                unet_config=lora_unet.config)
    loader.load_lora_into_unet(state_dict, alphas, unet=lora_unet, adapter_name="x")

    torch.manual_seed(1)
    sample, hidden = torch.randn(1, 4, 16, 16), torch.randn(1, 6, 64)
    added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.randn(1, 6)}
    with torch.no_grad():
        out = {name: m(sample, 10, hidden, added_cond_kwargs=added).sample for name, m in
               (("base", base_unet), ("tuned", tuned_unet), ("lora", lora_unet))}
    change = float((out["tuned"] - out["base"]).norm())
    assert change > 0.05 * float(out["base"].norm())
    assert float((out["lora"] - out["tuned"]).norm()) < 1e-3 * change
