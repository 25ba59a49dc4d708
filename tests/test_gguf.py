"""GGUF checkpoints: every GGML type read bit for bit as the gguf package's reference dequantizes it,
ComfyUI-GGUF's conventions, extraction from a GGUF equal to extraction from its values, and bad files as
one-line errors."""

import struct

import numpy as np
import pytest
import torch

from lora_colab import CheckpointError, extract, open_checkpoint
from lora_colab.cli import main
from lora_colab.notebook.synthetic import ZImageConfig, make_zimage_pair
from lora_colab.lora.writer import save_file

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T, quants  # noqa: E402

QUANTIZABLE = {T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1}
K_QUANTS = {T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}


def blocks_for(qtype, values, rng):
    """The raw bytes of `values` stored as `qtype`: quantized where gguf can, else random blocks with
    sane float16 scales (gguf's Python has no K-quant quantizer; its dequantizer reads any bytes)."""
    if qtype in QUANTIZABLE:
        return quants.quantize(values, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(values.size // block, size), dtype=np.uint8)
    scale_at = {T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
                T.IQ4_NL: [0]}[qtype]
    for at in scale_at:
        raw[:, at:at + 2] = np.full((raw.shape[0], 1), 0.01, np.float16).view(np.uint8)
    return raw.reshape(values.shape[0], -1)


def write_gguf(path, tensors, arch="lumina2", metadata=None):
    """tensors: {name: (float32 array, GGML type)}; returns {name: what gguf's reference reads back}."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY if isinstance(value, list)
                             else gguf.GGUFValueType.STRING)
    expected = {}
    for name, (values, qtype) in tensors.items():
        if qtype in (T.F32, T.F16):
            data = values.astype(np.float32 if qtype == T.F32 else np.float16)
            writer.add_tensor(name, data)
            expected[name] = data.astype(np.float32)
            continue
        if qtype == T.BF16:
            data = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
        else:
            data = blocks_for(qtype, values, rng)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
        expected[name] = quants.dequantize(data, qtype).reshape(values.shape).astype(np.float32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K,
                                   T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
def test_every_type_reads_bit_for_bit_as_the_reference(tmp_path, qtype):
    values = np.random.default_rng(1).standard_normal((12, 512)).astype(np.float32)
    expected = write_gguf(tmp_path / "m.gguf", {"w.weight": (values, qtype)})["w.weight"]
    with open_checkpoint(tmp_path / "m.gguf") as ckpt:
        assert ckpt.shape("w.weight") == (12, 512) and ckpt.st_dtype("w.weight") == qtype.name
        whole = ckpt.read("w.weight")
        np.testing.assert_array_equal(whole.float().numpy(), expected)
        np.testing.assert_array_equal(ckpt.read_rows("w.weight", 3, 7).float().numpy(), expected[3:7])
        assert ckpt.read("w.weight", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_a_type_without_a_torch_dequantizer_uses_the_reference_with_a_warning(tmp_path, capsys):
    values = np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)
    expected = write_gguf(tmp_path / "m.gguf", {"w.weight": (values, T.IQ4_NL)})["w.weight"]
    with open_checkpoint(tmp_path / "m.gguf") as ckpt:
        np.testing.assert_array_equal(ckpt.read("w.weight").numpy(), expected)
        ckpt.read("w.weight")
    assert capsys.readouterr().err.count("IQ4_NL tensors are dequantized by the gguf package's reference") == 1


def test_comfy_orig_shape_and_metadata(tmp_path, capsys):
    conv = np.random.default_rng(3).standard_normal((8, 4 * 3 * 3)).astype(np.float32)
    write_gguf(tmp_path / "m.gguf", {"conv.weight": (conv, T.F16)}, arch="sdxl",
               metadata={"comfy.gguf.orig_shape.conv.weight": [8, 4, 3, 3]})
    with open_checkpoint(tmp_path / "m.gguf") as ckpt:
        assert ckpt.shape("conv.weight") == (8, 4, 3, 3) and ckpt.read("conv.weight").shape == (8, 4, 3, 3)
        assert ckpt.metadata["general.architecture"] == "sdxl"
    assert main(["inspect", str(tmp_path / "m.gguf")]) == 0
    assert "GGUF (sdxl)" in capsys.readouterr().out


def test_extraction_from_a_gguf_equals_extraction_from_its_values(tmp_path):
    """A Q8_0 GGUF fine-tune (ComfyUI-GGUF style: quantized 2-D weights, small tensors F32) against a bf16
    base gives exactly the LoRA the same values give from a float32 safetensors file."""
    cfg = ZImageConfig(dim=128, n_layers=2, n_refiner_layers=1, n_heads=4, cap_feat_dim=32)
    base, tuned, _ = make_zimage_pair(tmp_path, cfg, rank=4, noise=0.0005, delta_scale=0.05)
    with open_checkpoint(tuned) as ckpt:
        tensors = {k: ckpt.read(k, dtype=torch.float32).numpy() for k in ckpt.keys()}
    plan = {k: (v, T.Q8_0 if v.ndim == 2 and v.shape[1] % 32 == 0 and v.size >= 4096 else T.F32)
            for k, v in tensors.items()}
    values = write_gguf(tmp_path / "tuned.gguf", plan)
    assert sum(q == T.Q8_0 for _, q in plan.values()) >= 15
    save_file({k: torch.from_numpy(v) for k, v in values.items()}, tmp_path / "tuned_f32.safetensors")
    a = extract(base, tmp_path / "tuned.gguf", tmp_path / "a.safetensors", rank=8, progress=False, device="cpu")
    b = extract(base, tmp_path / "tuned_f32.safetensors", tmp_path / "b.safetensors", rank=8, progress=False,
                device="cpu")
    assert a.architecture.startswith("Z-Image") and len(a.extracted) == len(b.extracted) == 20
    with open_checkpoint(tmp_path / "a.safetensors") as x, open_checkpoint(tmp_path / "b.safetensors") as y:
        assert x.keys() == y.keys()
        for key in x.keys():
            assert torch.equal(x.read(key), y.read(key)), key
    worst = max(layer.rel_error for layer in a.extracted)
    assert worst < 0.35, "the planted rank-4 change is still what the LoRA holds, Q8_0 noise or not"


# --- bad files, built byte by byte ------------------------------------------------------------------

def _string(text):
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def gguf_bytes(tensors, kv=(), data=b"", version=3):
    """A GGUF file: tensors as (name, dims, type id, offset); kv as (key, string value)."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kv))
    for key, value in kv:
        out += _string(key) + struct.pack("<I", 8) + _string(value)
    for name, dims, type_id, offset in tensors:
        out += _string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", type_id, offset)
    out += b"\0" * (-len(out) % 32)
    return out + data


@pytest.mark.parametrize("content, says", [
    (gguf_bytes([("w.weight", [32, 2], 99, 0)], data=b"\0" * 64), r"\[w.weight\]: unknown GGUF quant type 99"),
    (gguf_bytes([("w.weight", [32, 2], 0, 0)], kv=[("general.architecture", "llama"),
                                                 ("tokenizer.ggml.model", "gpt2")], data=b"\0" * 256),
     r"is a GGUF of a language model \(llama\)"),
    (gguf_bytes([("w.weight", [32, 2], 0, 0)], data=b"\0" * 100), r"\[w.weight\]: data \[\d+, \d+\) runs past the end"),
    (gguf_bytes([("a.weight", [32, 2], 0, 0), ("b.weight", [32, 2], 0, 128)], data=b"\0" * 512),
     r"\[b.weight\]: data overlaps tensor 'a.weight'"),
    (gguf_bytes([("w.weight", [32, 2], 0, 0)], data=b"\0" * 256)[:40], "GGUF header runs past the end"),
    (b"GGUF" + struct.pack("<IQQ", 7, 0, 0), "GGUF version 7 is not supported"),
    (gguf_bytes([("w.weight", [30, 2], 8, 0)], data=b"\0" * 256), r"rows of 30 values do not fill Q8_0 blocks"),
])
def test_bad_gguf_files_are_one_line_naming_file_and_tensor(tmp_path, capsys, content, says):
    import re
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=says):
        open_checkpoint(path)
    out = tmp_path / "out.safetensors"
    assert main(["extract", str(path), str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and re.search(says, err) and not out.exists()


@pytest.mark.parametrize("stored", ["Q8_0", "Q4_0", "Q5_1", "F8_E4M3"])
def test_the_rounding_noise_estimate_matches_the_actual_rounding(stored):
    from lora_colab.io.quant_noise import noise_sq
    values = np.random.default_rng(4).standard_normal((64, 512)).astype(np.float32)
    if stored.startswith("F8"):
        rounded = torch.from_numpy(values).to(torch.float8_e4m3fn).float()
    else:
        qtype = getattr(T, stored)
        rounded = torch.from_numpy(quants.dequantize(quants.quantize(values, qtype), qtype).reshape(values.shape))
    actual = float((rounded - torch.from_numpy(values)).double().pow(2).sum())
    assert noise_sq(rounded, stored) == pytest.approx(actual, rel=0.3)
    assert noise_sq(rounded, "BF16") == 0.0


def test_a_quantized_fine_tune_gets_its_rounding_noise_reported(tmp_path):
    cfg = ZImageConfig(dim=128, n_layers=1, n_refiner_layers=1, n_heads=4, cap_feat_dim=32)
    base, tuned, _ = make_zimage_pair(tmp_path, cfg, rank=4, delta_scale=0.002)  # a small change: Q4_0 noise dominates
    with open_checkpoint(tuned) as ckpt:
        tensors = {k: ckpt.read(k, dtype=torch.float32).numpy() for k in ckpt.keys()}
    write_gguf(tmp_path / "tuned.gguf", {k: (v, T.Q4_0 if v.ndim == 2 and v.shape[1] % 32 == 0 else T.F32)
                                         for k, v in tensors.items()})
    report = extract(base, tmp_path / "tuned.gguf", tmp_path / "a.safetensors", rank=8, progress=False, device="cpu")
    note = next(w for w in report.warnings if w.startswith("quantization noise"))
    assert "tuned F32, Q4_0, base BF16" in note and "a pair in one precision extracts cleaner" in note
    with open_checkpoint(tmp_path / "tuned.gguf") as q:
        for layer in report.extracted:
            key = layer.name + ".weight"
            actual = float((q.read(key) - torch.from_numpy(tensors[key])).norm()) / layer.diff_norm
            assert layer.quant_noise == pytest.approx(actual, rel=0.3), key
    clean = extract(base, tuned, tmp_path / "b.safetensors", rank=8, progress=False, device="cpu")
    assert not any(w.startswith("quantization noise") for w in clean.warnings)
    assert all(layer.quant_noise == 0 for layer in clean.extracted)
