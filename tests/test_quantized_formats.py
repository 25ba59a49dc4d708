"""ComfyUI's NVFP4 and musubi-tuner's block-wise fp8, checked against references written here from each
format's definition; extraction from an NVFP4 fine-tune equals extraction from its decoded values."""

import json

import pytest
import torch
from safetensors.torch import save_file as st_save_file

from lora_colab import CheckpointError, extract, open_checkpoint
from lora_colab.arch.canonical import open_canonical
from lora_colab.io.dequant import unswizzle
from lora_colab.notebook.synthetic import ZImageConfig, make_zimage_pair
from lora_colab.lora.writer import save_file

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def to_blocked(scales):
    """cuBLAS's 128x4 tiled layout of a (rows, cols) scale matrix (as torchao and ComfyUI write it)."""
    rows, cols = scales.shape
    row_tiles, col_tiles = -(-rows // 128), -(-cols // 4)
    padded = torch.zeros(row_tiles * 128, col_tiles * 4, dtype=scales.dtype)
    padded[:rows, :cols] = scales
    tiles = padded.view(row_tiles, 128, col_tiles, 4).permute(0, 2, 1, 3)
    return tiles.reshape(-1, 4, 32, 4).transpose(1, 2).reshape(-1, 32, 16).flatten()


def nvfp4(weight):
    """NVFP4 by its definition: per 16 values an E4M3 scale (amax / 6 over a global F32 scale), each value
    the nearest E2M1 code (sign in bit 3), two codes per byte, low nibble first.
    Returns (packed uint8, swizzled E4M3 scales, global scale, the values those decode to)."""
    out, cols = weight.shape
    global_scale = weight.abs().max() / (6.0 * 448.0)
    blocks = weight.reshape(out, cols // 16, 16)
    scales = (blocks.abs().amax(-1) / 6.0 / global_scale).to(torch.float8_e4m3fn)
    step = scales.float().clamp_min(1e-12).unsqueeze(-1) * global_scale
    codes = (blocks / step).abs().unsqueeze(-1).sub(E2M1).abs().argmin(-1)
    codes = (codes | ((blocks < 0).long() << 3)).reshape(out, cols)
    decoded = (E2M1[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)).reshape(out, cols // 16, 16) * step
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    return packed, to_blocked(scales).reshape(-1, 4), global_scale.reshape(1), decoded.reshape(out, cols)


@pytest.mark.parametrize("rows, cols", [(200, 12), (128, 4), (300, 7), (5, 64)])
def test_unswizzle_inverts_the_tiled_layout(rows, cols):
    scales = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols)
    assert torch.equal(unswizzle(to_blocked(scales), rows, cols), scales)


@pytest.mark.parametrize("declared", ["comfy_quant", "_quantization_metadata"])
def test_nvfp4_weights_decode_as_their_definition_says(tmp_path, declared):
    weight = torch.randn(160, 96, generator=torch.Generator().manual_seed(0))
    packed, scales, global_scale, decoded = nvfp4(weight)
    layer = "layers.0.attention.out"
    tensors = {f"{layer}.weight": packed, f"{layer}.weight_scale": scales, f"{layer}.weight_scale_2": global_scale,
               "layers.0.attention.qkv.weight": torch.zeros(3 * 96, 96, dtype=torch.bfloat16)}
    metadata = None
    if declared == "comfy_quant":
        tensors[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)
    else:
        metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {layer: "nvfp4"}})}
    st_save_file(tensors, str(tmp_path / "q.safetensors"), metadata=metadata)
    with open_canonical(tmp_path / "q.safetensors") as view:
        key = f"{layer}.weight"
        assert view.shape(key) == (160, 96)
        assert torch.equal(view.read(key), decoded)
        assert torch.equal(view.read(key, rows=(130, 150)), decoded[130:150])
        assert float((decoded - weight).norm() / weight.norm()) < 0.15  # what 4-bit floats give


def test_musubi_block_wise_fp8_scales_apply_per_block(tmp_path):
    fp8 = torch.randn(6, 64, generator=torch.Generator().manual_seed(1)).to(torch.float8_e4m3fn)
    scale = torch.tensor([[[0.5], [2.0]], [[1.0], [4.0]], [[0.25], [1.0]], [[1.0], [1.0]], [[3.0], [0.5]],
                          [[1.0], [8.0]]])  # [out, blocks, 1]: 2 blocks of 32 per row
    st_save_file({"layers.0.attention.out.weight": fp8, "layers.0.attention.out.scale_weight": scale,
                  "layers.0.attention.qkv.weight": torch.zeros(6, 64, dtype=torch.bfloat16)},
                 str(tmp_path / "q.safetensors"))
    want = (fp8.float().reshape(6, 2, 32) * scale).reshape(6, 64)
    with open_canonical(tmp_path / "q.safetensors") as view:
        assert torch.equal(view.read("layers.0.attention.out.weight"), want)
        assert torch.equal(view.read("layers.0.attention.out.weight", rows=(2, 5)), want[2:5])


def test_nvfp4_scales_that_do_not_fit_the_weight_are_one_line(tmp_path):
    layer = "layers.0.attention.out"
    st_save_file({f"{layer}.weight": torch.zeros(160, 48, dtype=torch.uint8),
                  f"{layer}.weight_scale": torch.zeros(7, dtype=torch.float8_e4m3fn),
                  f"{layer}.weight_scale_2": torch.ones(1),
                  f"{layer}.comfy_quant": torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8),
                  "layers.0.attention.qkv.weight": torch.zeros(288, 96, dtype=torch.bfloat16)},
                 str(tmp_path / "q.safetensors"))
    with open_canonical(tmp_path / "q.safetensors") as view:
        with pytest.raises(CheckpointError, match=r"\[layers.0.attention.out.weight_scale\]: 7 NVFP4 block scales "
                                                  r"do not fit a 160x96 weight"):
            view.read(f"{layer}.weight")


def test_nvfp4_rounding_noise_is_estimated_like_the_actual_rounding():
    from lora_colab.io.quant_noise import noise_sq
    weight = torch.randn(128, 256, generator=torch.Generator().manual_seed(5))
    *_, decoded = nvfp4(weight)
    actual = float((decoded - weight).double().pow(2).sum())
    assert noise_sq(decoded, "NVFP4") == pytest.approx(actual, rel=0.3)


def mxfp8(weight):
    """MXFP8 by its definition (OCP MX 1.0, as comfy-kitchen writes it): per 32 values along a row one E8M0
    scale 2^ceil(log2(amax / 448)), each value scale · E4M3. Returns (E4M3 values, swizzled uint8 scales,
    the values those decode to)."""
    out, cols = weight.shape
    blocks = weight.reshape(out, cols // 32, 32)
    exponent = torch.ceil(torch.log2(blocks.abs().amax(-1).clamp_min(2.0 ** -126) / 448.0))
    step = torch.exp2(exponent).unsqueeze(-1)
    codes = (blocks / step).clamp(-448, 448).to(torch.float8_e4m3fn)
    decoded = (codes.float() * step).reshape(out, cols)
    return codes.reshape(out, cols), to_blocked((exponent + 127).to(torch.uint8)), decoded


@pytest.mark.parametrize("scale_dtype", [torch.uint8, torch.float8_e8m0fnu])
def test_mxfp8_weights_decode_as_their_definition_says(tmp_path, scale_dtype):
    weight = torch.randn(160, 96, generator=torch.Generator().manual_seed(2)) * torch.logspace(-3, 1, 96)
    codes, scales, decoded = mxfp8(weight)
    layer = "layers.0.attention.out"
    st_save_file({f"{layer}.weight": codes, f"{layer}.weight_scale": scales.view(scale_dtype),
                  f"{layer}.comfy_quant": torch.tensor(list(b'{"format": "mxfp8"}'), dtype=torch.uint8),
                  "layers.0.attention.qkv.weight": torch.zeros(3 * 96, 96, dtype=torch.bfloat16)},
                 str(tmp_path / "q.safetensors"))
    with open_canonical(tmp_path / "q.safetensors") as view:
        key = f"{layer}.weight"
        assert view.shape(key) == (160, 96)
        assert view.source_dtypes(key) == {"MXFP8"}
        assert torch.equal(view.read(key), decoded)
        assert torch.equal(view.read(key, rows=(130, 150)), decoded[130:150])
        assert float((decoded - weight).norm() / weight.norm()) < 0.04  # what a 3-bit mantissa gives


def nvfp4_tensors(key, value):
    """(stored tensors, decoded values) of one weight in ComfyUI's NVFP4."""
    packed, scales, global_scale, decoded = nvfp4(value)
    layer = key[: -len(".weight")]
    return {key: packed, layer + ".weight_scale": scales, layer + ".weight_scale_2": global_scale}, decoded


def mxfp8_tensors(key, value):
    """(stored tensors, decoded values) of one weight in ComfyUI's MXFP8."""
    codes, scales, decoded = mxfp8(value)
    return {key: codes, key[: -len(".weight")] + ".weight_scale": scales}, decoded


def hadamard_by_definition(n):
    """comfy-kitchen's ConvRot matrix: the Kronecker power of its symmetric 4x4 seed, over sqrt(n)."""
    seed = torch.tensor([[1., 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float64)
    h = seed
    while h.shape[0] < n:
        h = torch.kron(h, seed)
    return h / n ** 0.5


def int8(weight, rowwise=True, group=0):
    """ComfyUI's int8_tensorwise by its definition: (with ConvRot, W·Hᵀ per group of `group` columns) divided
    by a scale (per row, or one for the tensor) putting the largest value at 127, rounded. Returns (int8
    codes, F32 scale, the values those decode to)."""
    w = weight.double()
    if group:
        w = (w.reshape(w.shape[0], -1, group) @ hadamard_by_definition(group).T).reshape(w.shape)
    scale = (w.abs().amax(dim=1, keepdim=True) if rowwise else w.abs().amax()) / 127
    codes = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    stored = scale.float().reshape(-1, 1) if rowwise else scale.float()
    decoded = codes.float() * stored  # in float32, from the stored scale: what a reader of the file gets
    if group:
        decoded = (decoded.reshape(w.shape[0], -1, group) @ hadamard_by_definition(group).float()).reshape(w.shape)
    return codes, stored, decoded


def int8_tensors(group):
    def encode(key, value):
        codes, scale, decoded = int8(value, group=group)
        return {key: codes, key[: -len(".weight")] + ".weight_scale": scale}, decoded
    return encode


@pytest.mark.parametrize("rowwise, group", [(False, 0), (True, 0), (True, 16), (True, 64)])
def test_int8_weights_decode_as_their_definition_says(tmp_path, rowwise, group):
    weight = torch.randn(96, 128, generator=torch.Generator().manual_seed(4)) * torch.logspace(-2, 0, 96)[:, None]
    codes, scale, decoded = int8(weight, rowwise, group)
    layer = "layers.0.attention.out"
    spec = {"format": "int8_tensorwise", **({"convrot": True, "convrot_groupsize": group} if group else {})}
    st_save_file({f"{layer}.weight": codes, f"{layer}.weight_scale": scale,
                  f"{layer}.comfy_quant": torch.tensor(list(json.dumps(spec).encode()), dtype=torch.uint8),
                  "layers.0.attention.qkv.weight": torch.zeros(3 * 128, 128, dtype=torch.bfloat16)},
                 str(tmp_path / "q.safetensors"))
    with open_canonical(tmp_path / "q.safetensors") as view:
        key = f"{layer}.weight"
        assert view.source_dtypes(key) == {"INT8"}
        torch.testing.assert_close(view.read(key), decoded, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(view.read(key, rows=(40, 70)), decoded[40:70], rtol=1e-5, atol=1e-6)
        # the truth: the original weight, within the rounding the codes allow
        assert float((view.read(key) - weight).norm() / weight.norm()) < (0.01 if rowwise else 0.05)


def test_int8_rounding_noise_is_estimated_like_the_actual_rounding():
    from lora_colab.io.quant_noise import noise_sq
    weight = torch.randn(128, 256, generator=torch.Generator().manual_seed(7))
    _, _, decoded = int8(weight)
    actual = float((decoded - weight).double().pow(2).sum())
    assert noise_sq(decoded, "INT8") == pytest.approx(actual, rel=0.3)


@pytest.mark.parametrize("spec, message", [
    ({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 24}, r"ConvRot group size 24 is not a power"),
    ({"format": "int8_tensorwise", "convrot_w4a4": True}, r"unsupported quantization: int8_tensorwise with convrot_w4a4"),
])
def test_int8_layers_it_cannot_decode_are_one_line(tmp_path, spec, message):
    layer = "layers.0.attention.out"
    st_save_file({f"{layer}.weight": torch.zeros(96, 96, dtype=torch.int8), f"{layer}.weight_scale": torch.ones(96, 1),
                  f"{layer}.comfy_quant": torch.tensor(list(json.dumps(spec).encode()), dtype=torch.uint8),
                  "layers.0.attention.qkv.weight": torch.zeros(3 * 96, 96, dtype=torch.bfloat16)},
                 str(tmp_path / "q.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        open_canonical(tmp_path / "q.safetensors")


@pytest.mark.parametrize("fmt, encode, block, spec", [
    ("nvfp4", nvfp4_tensors, 64, {"format": "nvfp4"}), ("mxfp8", mxfp8_tensors, 32, {"format": "mxfp8"}),
    ("int8", int8_tensors(0), 16, {"format": "int8_tensorwise"}),
    ("int8", int8_tensors(16), 16, {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 16})])
def test_extraction_from_a_quantized_fine_tune_equals_extraction_from_its_decoded_values(tmp_path, fmt, encode,
                                                                                         block, spec):
    cfg = ZImageConfig(dim=128, n_layers=1, n_refiner_layers=1, n_heads=4, cap_feat_dim=32)
    base, tuned, _ = make_zimage_pair(tmp_path, cfg, rank=4, delta_scale=0.05)
    quantized, decoded, layers = {}, {}, {}
    with open_checkpoint(tuned) as ckpt:
        for key in ckpt.keys():
            value = ckpt.read(key, dtype=torch.float32)
            if value.dim() == 2 and value.shape[1] % block == 0 and key.endswith(".weight"):
                stored, decoded[key] = encode(key, value)
                quantized.update(stored)
                layers[key[: -len(".weight")]] = spec
            else:
                quantized[key] = decoded[key] = value
    assert len(layers) >= 8
    st_save_file(quantized, str(tmp_path / "q.safetensors"),
                 metadata={"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})})
    save_file(decoded, tmp_path / "decoded.safetensors")
    a = extract(base, tmp_path / "q.safetensors", tmp_path / "a.safetensors", rank=8, progress=False, device="cpu")
    b = extract(base, tmp_path / "decoded.safetensors", tmp_path / "b.safetensors", rank=8, progress=False,
                device="cpu")
    assert len(a.extracted) == len(b.extracted) == 15
    assert any(w.startswith("quantization noise (tuned") and fmt.upper() in w for w in a.warnings)
    assert any(layer.quant_noise > 0 for layer in a.extracted)
    with open_checkpoint(tmp_path / "a.safetensors") as x, open_checkpoint(tmp_path / "b.safetensors") as y:
        for key in x.keys():
            assert torch.equal(x.read(key), y.read(key)), key


def test_mxfp8_rounding_noise_is_estimated_like_the_actual_rounding():
    from lora_colab.io.quant_noise import noise_sq
    weight = torch.randn(128, 256, generator=torch.Generator().manual_seed(6))
    *_, decoded = mxfp8(weight)
    actual = float((decoded - weight).double().pow(2).sum())
    assert noise_sq(decoded, "MXFP8") == pytest.approx(actual, rel=0.3)


@pytest.mark.parametrize("problem, tensors, message", [
    ("no scales", {}, r"\[layers.0.attention.out.weight\]: MXFP8 weight without layers.0.attention.out.weight_scale"),
    ("NaN scale", {"layers.0.attention.out.weight_scale": torch.full((128, 4), 255, dtype=torch.uint8)},
     r"\[layers.0.attention.out.weight_scale\]: MXFP8 block scale is NaN"),
    ("wrong count", {"layers.0.attention.out.weight_scale": torch.full((9,), 127, dtype=torch.uint8)},
     r"\[layers.0.attention.out.weight_scale\]: 9 MXFP8 block scales do not fit a 160x96 weight"),
    ("bf16 scales", {"layers.0.attention.out.weight_scale": torch.ones(256, 4, dtype=torch.bfloat16)},
     r"\[layers.0.attention.out.weight\]: MXFP8 weight stored as F8_E4M3 with BF16 scales"),
])
def test_bad_mxfp8_layers_are_one_line(tmp_path, problem, tensors, message):
    layer = "layers.0.attention.out"
    st_save_file({f"{layer}.weight": torch.zeros(160, 96, dtype=torch.float8_e4m3fn),
                  f"{layer}.comfy_quant": torch.tensor(list(b'{"format": "mxfp8"}'), dtype=torch.uint8),
                  "layers.0.attention.qkv.weight": torch.zeros(288, 96, dtype=torch.bfloat16), **tensors},
                 str(tmp_path / "q.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        with open_canonical(tmp_path / "q.safetensors") as view:
            view.read(f"{layer}.weight")
