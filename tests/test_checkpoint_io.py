import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save_file as st_save_file

from lora_colab import CheckpointError, SafetensorsWriter, open_checkpoint, save_file
from lora_colab.io.opener import resolve_folder

from conftest import bits, random_tensor

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e4m3fn,
          torch.float8_e5m2, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool]


def _all_dtypes_tensors(gen):
    tensors = {}
    for i, dtype in enumerate(DTYPES):
        tensors[f"t{i}.{str(dtype).split('.')[1]}"] = random_tensor((7, 5, 3), dtype, gen)
    tensors["scalar"] = torch.tensor(3.5, dtype=torch.float32)
    tensors["empty"] = torch.empty(0, 4, dtype=torch.bfloat16)
    return tensors


def test_reads_every_dtype_bit_exact_from_reference_writer(tmp_path, gen):
    tensors = _all_dtypes_tensors(gen)
    path = tmp_path / "ref.safetensors"
    st_save_file(tensors, str(path), metadata={"a": "b"})
    with open_checkpoint(path) as ckpt:
        assert set(ckpt.keys()) == set(tensors)
        assert ckpt.metadata == {"a": "b"}
        for name, ref in tensors.items():
            got = ckpt.read(name)
            assert got.dtype == ref.dtype and got.shape == ref.shape, name
            assert torch.equal(bits(got), bits(ref)), name
            assert ckpt.dtype(name) == ref.dtype and ckpt.shape(name) == tuple(ref.shape)


def test_our_writer_loads_bit_exact_in_safetensors(tmp_path, gen):
    tensors = _all_dtypes_tensors(gen)
    path = tmp_path / "ours.safetensors"
    save_file(tensors, path, metadata={"ss_network_dim": "8", "unicode": "größe"})
    loaded = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"ss_network_dim": "8", "unicode": "größe"}
        assert set(f.keys()) == set(tensors)
        for name, ref in tensors.items():
            assert torch.equal(bits(f.get_tensor(name)), bits(ref)), name
            assert torch.equal(bits(loaded[name]), bits(ref)), name
    assert not list(tmp_path.glob("ours.safetensors*.tmp"))
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    assert header_len % 8 == 0


def test_writer_keeps_every_tensor_aligned(tmp_path, gen):
    # odd-sized bf16 tensors between float32 scalars would misalign the scalars in file order
    specs = [("a.lora_down.weight", torch.bfloat16, (3, 5)), ("a.alpha", torch.float32, ()),
             ("b.lora_down.weight", torch.bfloat16, (1, 3)), ("b.alpha", torch.float32, ())]
    with SafetensorsWriter(tmp_path / "x.safetensors", specs) as w:
        for name, dtype, shape in reversed(specs):  # any order
            w.write(name, torch.ones(shape, dtype=dtype))
    header = json.loads((tmp_path / "x.safetensors").read_bytes()[8:8 + 512].split(b"}}")[0] + b"}}")
    for name, dtype, _ in specs:
        begin = header[name]["data_offsets"][0]
        assert begin % torch.empty((), dtype=dtype).element_size() == 0, name


@pytest.mark.parametrize("shape,start,stop", [((12, 5), 3, 9), ((12, 5), 0, 12), ((12, 5), 4, 4),
                                              ((9, 2, 3, 3), 3, 6), ((6,), 1, 5)])
def test_read_rows_matches_slicing_and_reads_only_those_bytes(tmp_path, gen, shape, start, stop):
    ref = torch.randn(shape, generator=gen).to(torch.bfloat16)
    path = tmp_path / "r.safetensors"
    st_save_file({"w": ref, "other": torch.zeros(100)}, str(path))
    with open_checkpoint(path) as ckpt:
        before = ckpt.bytes_read
        rows = ckpt.read_rows("w", start, stop)
        assert torch.equal(bits(rows), bits(ref[start:stop]))
        assert ckpt.bytes_read - before == rows.numel() * 2
        converted = ckpt.read_rows("w", start, stop, dtype=torch.float32)
        assert converted.dtype == torch.float32 and torch.equal(converted, ref[start:stop].float())


def test_read_rows_rejects_bad_ranges(tmp_path):
    path = tmp_path / "r.safetensors"
    st_save_file({"w": torch.zeros(4, 2), "s": torch.tensor(1.0)}, str(path))
    with open_checkpoint(path) as ckpt:
        for start, stop in [(-1, 2), (3, 2), (0, 5)]:
            with pytest.raises(CheckpointError, match=r"r\.safetensors \[w\]: row range"):
                ckpt.read_rows("w", start, stop)
        with pytest.raises(CheckpointError, match=r"\[s\]"):
            ckpt.read_rows("s", 0, 1)
        with pytest.raises(CheckpointError, match=r"\[missing\]: no such tensor"):
            ckpt.read("missing")


def test_read_casts_dtype_and_counts_bytes(tmp_path, gen):
    ref = torch.randn(16, 8, generator=gen).to(torch.float8_e4m3fn)
    path = tmp_path / "f8.safetensors"
    st_save_file({"w": ref}, str(path))
    with open_checkpoint(path) as ckpt:
        before = ckpt.bytes_read
        got = ckpt.read("w", dtype=torch.float32)
        assert got.dtype == torch.float32 and torch.equal(got, ref.float())
        assert ckpt.bytes_read - before == 128


def _shard(tmp_path, gen, folder, n_shards=3, prefix="diffusion_pytorch_model"):
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"layers.{i}.w": torch.randn(4, 3, generator=gen).to(torch.bfloat16) for i in range(7)}
    names = list(tensors)
    weight_map = {}
    for s in range(n_shards):
        shard = f"{prefix}-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[s::n_shards]}
        st_save_file(part, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    index = folder / f"{prefix}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 7 * 24}, "weight_map": weight_map}))
    return tensors, index


def test_sharded_index_reads_each_tensor_from_its_shard(tmp_path, gen):
    tensors, index = _shard(tmp_path, gen, tmp_path / "m")
    for target in (index, tmp_path / "m"):
        with open_checkpoint(target) as ckpt:
            assert sorted(ckpt.keys()) == sorted(tensors)
            assert len(ckpt.files) == 3
            assert ckpt.metadata == {"format": "pt"}
            for name, ref in tensors.items():
                assert torch.equal(bits(ckpt.read(name)), bits(ref))


def test_sharded_index_errors_name_shard_and_tensor(tmp_path, gen):
    _, index = _shard(tmp_path, gen, tmp_path / "m")
    data = json.loads(index.read_text())
    data["weight_map"]["ghost.w"] = "diffusion_pytorch_model-00001-of-00003.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"00001-of-00003\.safetensors \[ghost\.w\]: listed"):
        open_checkpoint(index)
    data["weight_map"] = {"a": "missing.safetensors"}
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="missing.safetensors"):
        open_checkpoint(index)
    data["weight_map"] = {"a": "../escape.safetensors"}
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="outside"):
        open_checkpoint(index)


def test_diffusers_pipeline_folder_takes_transformer_or_unet(tmp_path, gen):
    pipe = tmp_path / "pipe"
    tensors, _ = _shard(tmp_path, gen, pipe / "transformer")
    (pipe / "model_index.json").write_text("{}")
    (pipe / "vae").mkdir()
    st_save_file({"decoder.w": torch.zeros(2)}, str(pipe / "vae" / "diffusion_pytorch_model.safetensors"))
    with open_checkpoint(pipe) as ckpt:
        assert sorted(ckpt.keys()) == sorted(tensors)

    sdxl = tmp_path / "sdxl"
    (sdxl / "unet").mkdir(parents=True)
    st_save_file({"conv_in.weight": torch.ones(2, 2)}, str(sdxl / "unet" / "diffusion_pytorch_model.safetensors"))
    st_save_file({"conv_in.weight": torch.ones(2, 2).half()},
                 str(sdxl / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    assert resolve_folder(sdxl).name == "diffusion_pytorch_model.safetensors"


def test_folder_with_one_file_and_ambiguous_folder(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    st_save_file({"w": torch.ones(3)}, str(one / "my_model.safetensors"))
    with open_checkpoint(one) as ckpt:
        assert ckpt.keys() == ["w"]
    st_save_file({"w": torch.ones(3)}, str(one / "other.safetensors"))
    with pytest.raises(CheckpointError, match=r"several checkpoints here \(my_model\.safetensors, other"):
        open_checkpoint(one)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="holds no .safetensors"):
        open_checkpoint(empty)
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "nope.safetensors")


def test_pickles_load_only_plain_tensors(tmp_path):
    torch.save({"state_dict": {"model.diffusion_model.out.2.weight": torch.arange(12.0).reshape(4, 3)},
                "global_step": 7}, tmp_path / "model.ckpt")
    with open_checkpoint(tmp_path / "model.ckpt") as ckpt:
        assert ckpt.keys() == ["model.diffusion_model.out.2.weight"]
        assert torch.equal(ckpt.read_rows("model.diffusion_model.out.2.weight", 1, 3),
                           torch.arange(3.0, 9.0).reshape(2, 3))
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="garbage.ckpt: refused: not a plain tensor pickle"):
        open_checkpoint(garbage)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if ever unpickled unsafely


def test_pickles_with_code_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"w": torch.ones(2), "x": _Payload(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt: refused: .*holds objects other than tensors"):
        open_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_writer_is_atomic_and_never_half_writes(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous contents")
    specs = [("a", torch.float32, (2,)), ("b", torch.float32, (3,))]
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(target, specs) as w:
            w.write("a", torch.ones(2))
            raise RuntimeError("interrupted mid-run")
    assert target.read_bytes() == b"previous contents"
    assert not list(tmp_path.glob("out.safetensors*.tmp"))

    with pytest.raises(CheckpointError, match=r"out\.safetensors \[b\]: 1 declared tensors never written"):
        with SafetensorsWriter(target, specs) as w:
            w.write("a", torch.ones(2))
    assert target.read_bytes() == b"previous contents"

    with pytest.raises(CheckpointError, match=r"\[b\]: got torch.float16 \(3,\), declared F32 \[3\]"):
        with SafetensorsWriter(target, specs) as w:
            w.write("b", torch.ones(3, dtype=torch.float16))
    assert not list(tmp_path.glob("out.safetensors*.tmp"))


def test_writer_refuses_to_overwrite_an_input(tmp_path):
    source = tmp_path / "base.safetensors"
    st_save_file({"w": torch.ones(2)}, str(source))
    before = source.read_bytes()
    with pytest.raises(CheckpointError, match="output path is one of the inputs"):
        save_file({"w": torch.zeros(2)}, source, protect=[source])
    assert source.read_bytes() == before


# --- malformed files -------------------------------------------------------------------------

def _file(tmp_path, header, data=b"", raw_header=None):
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


MALFORMED = {
    "truncated data": ({"w": _entry(shape=(4,), offsets=(0, 16))}, b"\0" * 8, None, r"\[w\]: data_offsets \[0, 16\] run past the 8-byte data area"),
    "invalid json": (None, b"", b"{not json", r"header is not valid UTF-8 JSON"),
    "json not an object": (None, b"", b"[1, 2]", r"header is a JSON list, not an object"),
    "out of bounds": ({"w": _entry(offsets=(8, 16))}, b"\0" * 8, None, r"\[w\]: data_offsets \[8, 16\] run past"),
    "overlap": ({"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(4, 12))}, b"\0" * 12, None, r"\[b\]: data overlaps tensor 'a'"),
    "hole": ({"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(12, 20))}, b"\0" * 20, None, r"\[b\]: 4-byte hole"),
    "size mismatch": ({"w": _entry(shape=(3,), offsets=(0, 8))}, b"\0" * 8, None, r"\[w\]: holds 8 bytes but shape \[3\] of F32 needs 12"),
    "unknown dtype": ({"w": _entry(dtype="Q7")}, b"\0" * 8, None, r"\[w\]: unknown or unsupported dtype 'Q7'"),
    "trailing bytes": ({"w": _entry()}, b"\0" * 12, None, r"data area is 12 bytes but the tensors cover 8"),
    "bad shape": ({"w": _entry(shape=(-2,))}, b"\0" * 8, None, r"\[w\]: shape \[-2\] is not a list"),
    "bad metadata": ({"__metadata__": {"k": 3}, "w": _entry()}, b"\0" * 8, None, r"__metadata__ value for 'k'"),
    "huge shape": ({"w": _entry(shape=(10**6, 10**6))}, b"\0" * 8, None, r"\[w\]: holds 8 bytes but shape"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_raise_one_line_checkpoint_error(tmp_path, case):
    header, data, raw_header, pattern = MALFORMED[case]
    path = _file(tmp_path, header, data, raw_header)
    with pytest.raises(CheckpointError, match=pattern) as info:
        open_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message


def test_header_length_past_eof_and_over_limit(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(CheckpointError, match="header length 1000 runs past the end of the 10-byte file"):
        open_checkpoint(path)
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(CheckpointError, match="exceeds the 100000000-byte limit"):
        open_checkpoint(path)
    path.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too short"):
        open_checkpoint(path)


def test_file_shrinking_after_open_is_a_clean_error(tmp_path):
    path = tmp_path / "s.safetensors"
    st_save_file({"w": torch.ones(1000)}, str(path))
    with open_checkpoint(path) as ckpt:
        os.truncate(path, os.path.getsize(path) - 100)
        with pytest.raises(CheckpointError, match=r"\[w\]: file ended 100 bytes early"):
            ckpt.read("w")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("staging", [32 << 20, 1000])  # whole tensors; chunks through both buffers in turn
def test_cuda_reads_through_pinned_buffer(tmp_path, gen, monkeypatch, staging):
    import lora_colab.io.checkpoint as checkpoint
    monkeypatch.setattr(checkpoint, "STAGING_BYTES", staging)
    tensors = {f"w{i}": torch.randn(64, 32, generator=gen).to(torch.bfloat16) for i in range(4)}
    path = tmp_path / "c.safetensors"
    st_save_file(tensors, str(path))
    with open_checkpoint(path) as ckpt:
        outs = [ckpt.read(k, dtype=torch.float32, device="cuda") for k in tensors]
        rows = ckpt.read_rows("w1", 8, 24, device="cuda")
        for out, ref in zip(outs, tensors.values()):
            assert out.is_cuda and torch.equal(out.cpu(), ref.float())
        assert torch.equal(rows.cpu(), tensors["w1"][8:24])


def test_pickle_checkpoints_inspect_and_fingerprint(tmp_path, capsys):
    from lora_colab.lowrank.norm_cache import fingerprint
    from lora_colab.cli import main
    torch.save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, tmp_path / "m.ckpt")
    assert main(["inspect", str(tmp_path / "m.ckpt")]) == 0
    out = capsys.readouterr().out
    size = (tmp_path / "m.ckpt").stat().st_size  # the file's bytes, in a unit that fits, and the tensors' share
    assert f"size:      {size / 1024:.2f} KiB ({size:,} bytes on disk; tensors 576 bytes" in out
    with open_checkpoint(tmp_path / "m.ckpt") as ckpt:
        assert len(fingerprint(ckpt.sources)) == 32
    torch.save({"model.diffusion_model.input_blocks.0.0.weight": torch.ones(4, 4, 3, 3)}, tmp_path / "n.ckpt")
    with open_checkpoint(tmp_path / "m.ckpt") as a, open_checkpoint(tmp_path / "n.ckpt") as b:
        assert fingerprint(a.sources) != fingerprint(b.sources)


def test_byte_view_keeps_its_tensor_alive():
    """The writer takes byte_view(x.to("cpu")) of GPU factors: the temporary copy must outlive the call,
    or its freed memory is reused and garbage is written (seen on CUDA before this was fixed)."""
    import gc
    import weakref

    from lora_colab.io.buffers import byte_view
    tensor = torch.arange(1 << 20, dtype=torch.float32)
    alive = weakref.ref(tensor)
    view = byte_view(tensor)
    del tensor
    gc.collect()
    assert alive() is not None
    assert torch.equal(torch.frombuffer(view, dtype=torch.float32)[:5], torch.arange(5.0))
    del view
    gc.collect()
    assert alive() is None
    with pytest.raises(ValueError, match="contiguous CPU tensor"):
        byte_view(torch.zeros(4, 4).T)



def test_a_text_file_named_ckpt_is_one_whole_line_and_a_legacy_pickle_loads(tmp_path, capsys):
    from lora_colab.cli import main
    (tmp_path / "notes.ckpt").write_text("hello, this is just text and not a checkpoint at all\n")
    assert main(["inspect", str(tmp_path / "notes.ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("notes.ckpt: is not a PyTorch checkpoint (it begins 'hello, this is just text'): give a "
                        ".safetensors, .ckpt, .pt or .bin model file") and err.count("\n") == 0
    weights = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(4, 4, 3, 3)}
    torch.save(weights, tmp_path / "old.ckpt", _use_new_zipfile_serialization=False)  # pre-1.6 format
    with open_checkpoint(tmp_path / "old.ckpt") as ckpt:
        key = next(iter(weights))
        assert torch.equal(ckpt.read(key), weights[key])


# --- large reads around the page cache (O_DIRECT) -----------------------------------------------------

def _direct_file(tmp_path, size=(3 << 20) + 12345):
    data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    path = tmp_path / "bytes.bin"
    path.write_bytes(data.numpy().tobytes())
    return path, data


def _recording_preadv(monkeypatch, fail=None):
    """os.preadv, recording the descriptors it reads; `fail(fd, offset)` may raise or return a byte count."""
    calls, real = [], os.preadv

    def preadv(fd, buffers, offset):
        calls.append(fd)
        if fail is not None:
            got = fail(fd, buffers, offset)
            if got is not None:
                return got
        return real(fd, buffers, offset)
    monkeypatch.setattr(os, "preadv", preadv)
    return calls


@pytest.mark.parametrize("offset,nbytes", [(0, 1 << 20), (8, (1 << 20) + 3), (4088, 2 << 20), (12344, (3 << 20)),
                                           (104, (3 << 20) + 12241)])  # the last ends at the end of the file
def test_large_reads_bypass_the_page_cache_and_return_exactly_the_bytes(tmp_path, monkeypatch, offset, nbytes):
    from lora_colab.io.local_file import LocalFile, direct_io_enabled
    path, data = _direct_file(tmp_path)
    calls = _recording_preadv(monkeypatch)
    with LocalFile(path) as src:
        if not (direct_io_enabled() and src._use_direct):
            pytest.skip("no O_DIRECT on this file system")
        got = src.read_new(offset, nbytes)
        assert torch.equal(got, data[offset:offset + nbytes])
        assert src.bytes_read == nbytes
        assert calls and set(calls) == {src._direct}  # the direct descriptor only: no page-cache read
        assert torch.equal(src.read_new(7, 1000), data[7:1007]) and calls[-1] == src.fd  # small: buffered
        assert torch.equal(src.read_new(5, 2 << 20), data[5:5 + (2 << 20)]) and calls[-1] == src.fd  # odd offset


def test_a_direct_read_fits_the_slack_at_the_worst_alignment(tmp_path):
    """A buffer at an address one past a block boundary, bytes starting 8 before a block boundary and ending
    nine past one: the aligned span and the shift to an aligned address still fit nbytes + SLACK."""
    from lora_colab.io.byte_source import ALIGN, SLACK
    from lora_colab.io.local_file import LocalFile
    path, data = _direct_file(tmp_path)
    nbytes = (2 << 20) + 9
    room = torch.empty(nbytes + SLACK + 2 * ALIGN, dtype=torch.uint8)
    at = (1 - room.data_ptr()) % ALIGN
    buf = room[at:at + nbytes + SLACK]
    assert buf.data_ptr() % ALIGN == 1
    with LocalFile(path) as src:
        if not src._use_direct:
            pytest.skip("no O_DIRECT on this file system")
        got = src.read_staged(buf, ALIGN - 8, nbytes)
        assert torch.equal(got, data[ALIGN - 8:ALIGN - 8 + nbytes])


def test_direct_reads_fall_back_when_refused_or_short(tmp_path, monkeypatch):
    """A file system that refuses direct reads (EINVAL, or a FUSE mount's EOPNOTSUPP) is read buffered from then
    on; a short unaligned
    direct read is finished through the page cache; either way the bytes are exact."""
    import errno
    from lora_colab.io.local_file import LocalFile
    path, data = _direct_file(tmp_path)
    with LocalFile(path) as src:
        if not src._use_direct:
            pytest.skip("no O_DIRECT on this file system")
        state = {"n": 0}

        def short_once(fd, buffers, offset):
            if fd == src._direct and state["n"] == 0:
                state["n"] += 1
                view = buffers[0][:1000]  # 1000 bytes: not a whole block
                got = os.pread(src.fd, 1000, offset)
                view[:len(got)] = got
                return len(got)
            return None
        calls = _recording_preadv(monkeypatch, short_once)
        assert torch.equal(src.read_new(336, 2 << 20), data[336:336 + (2 << 20)])
        assert calls[0] == src._direct and src.fd in calls[1:] and src._use_direct

        for code in (errno.EINVAL, errno.EOPNOTSUPP):
            src._use_direct = True

            def refuse(fd, buffers, offset, code=code):
                if fd == src._direct:
                    raise OSError(code, os.strerror(code))
            calls = _recording_preadv(monkeypatch, refuse)
            assert torch.equal(src.read_new(4096, 2 << 20), data[4096:4096 + (2 << 20)])
            assert not src._use_direct and calls[-1] == src.fd


def test_direct_io_can_be_turned_off(tmp_path, monkeypatch):
    from lora_colab.io.local_file import LocalFile
    monkeypatch.setenv("LORA_COLAB_DIRECT_IO", "0")
    path, data = _direct_file(tmp_path)
    calls = _recording_preadv(monkeypatch)
    with LocalFile(path) as src:
        assert not src._use_direct
        assert torch.equal(src.read_new(1, 2 << 20), data[1:1 + (2 << 20)]) and set(calls) == {src.fd}
