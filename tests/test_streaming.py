"""Extract and resize straight from HTTP servers and the Hub, read in place by range, against a loopback
server with faults (tests/range_server.py): outputs equal the local run's, bytes requested stay close to
what the extraction needs, nothing large lands on disk, and tokens go only where they belong."""

import json
import os
from pathlib import Path

import pytest
import torch

from lora_colab import extract, open_checkpoint
from lora_colab.cli import main
from lora_colab.errors import CheckpointError, SourceError
from lora_colab.io import http as lc_http
from lora_colab.io.checkpoint import SafetensorsFile
from lora_colab.notebook.synthetic import ZImageConfig, make_zimage_pair
from lora_colab.lora.writer import save_file

from range_server import RangeServer

CFG = ZImageConfig(dim=128, n_layers=2, n_refiner_layers=1, n_heads=4, cap_feat_dim=32)
TOKEN = "tok-SECRET-123"
HUB_TOKEN = "hf_HUBSECRET456"


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(lc_http.POLICY, "backoff", 0.01)
    monkeypatch.setattr(lc_http.POLICY, "timeout", 5.0)
    monkeypatch.setattr(lc_http.POLICY, "retries", 4)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A Z-Image-layout pair: the base as a diffusers folder with two shards and an index, the tuned as a
    ComfyUI single file; and a local extraction of it to compare with."""
    root = tmp_path_factory.mktemp("models")
    base, tuned, _ = make_zimage_pair(root / "made", CFG, rank=4, noise=0.001)
    shard_folder = root / "files" / "base" / "transformer"
    shard_folder.mkdir(parents=True)
    with open_checkpoint(base) as ckpt:
        keys = ckpt.keys()
        halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
                  "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        weight_map = {}
        for name, part in halves.items():
            save_file({k: ckpt.read(k) for k in part}, shard_folder / name)
            weight_map.update({k: name for k in part})
    (shard_folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (root / "files" / "tuned.safetensors").write_bytes(Path(tuned).read_bytes())
    local = extract(root / "files" / "base", root / "files" / "tuned.safetensors", root / "local.safetensors",
                    rank=8, progress=False)
    return root, local


@pytest.fixture
def server(models):
    root, _ = models
    srv = RangeServer(root / "files", hub_repos={"owner/base": root / "files" / "base",
                                                 "owner/tuned": root / "files"}).start()
    yield srv
    srv.stop()


@pytest.fixture
def clean_disk(tmp_path, monkeypatch):
    """Empty temp, cache and working folders: whatever the run writes besides its output lands here."""
    folders = {name: tmp_path / name for name in ("tmp", "hf_home", "cwd")}
    for folder in folders.values():
        folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folders["tmp"]))
    monkeypatch.setenv("HF_HOME", str(folders["hf_home"]))
    monkeypatch.setenv("LORA_COLAB_CACHE", str(folders["hf_home"] / "lora_colab"))
    monkeypatch.chdir(folders["cwd"])
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    return folders


def disk_bytes(folders):
    return sum(f.stat().st_size for folder in folders.values() for f in folder.rglob("*") if f.is_file())


def tensors_of(path):
    with open_checkpoint(path) as ckpt:
        return {k: ckpt.read(k) for k in ckpt.keys()}, dict(ckpt.metadata)


def assert_same_lora(path, reference):
    got, meta = tensors_of(path)
    want, want_meta = tensors_of(reference)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    varying = {"modelspec.title", "modelspec.date", "ss_output_name"}  # the output's own name and time
    assert {k: v for k, v in meta.items() if k not in varying} == {k: v for k, v in want_meta.items()
                                                                   if k not in varying}


def test_extraction_read_in_place_equals_the_local_one_and_reads_only_what_it_needs(server, models, tmp_path,
                                                                                     clean_disk):
    root, local = models
    report = extract(f"{server.url}/files/base/transformer/diffusion_pytorch_model.safetensors.index.json",
                     f"{server.url}/files/tuned.safetensors", tmp_path / "out.safetensors", rank=8, progress=False)
    assert_same_lora(tmp_path / "out.safetensors", local.output)
    assert report.bytes_read == report.network_bytes == server.served()
    needed = local.bytes_read  # headers and target tensors, as the local run read them
    assert needed <= server.served() <= 1.1 * needed
    assert server.served() < 0.9 * sum(f.stat().st_size for f in (root / "files").rglob("*.safetensors"))
    assert disk_bytes(clean_disk) < 64 << 10, "nothing large may land on disk"
    assert "over the network in place" in str(report)
    assert report.base.startswith(server.url) and "?" not in report.base


def test_cut_bodies_503s_and_a_bandwidth_limit_do_not_change_the_output(server, models, tmp_path):
    _, local = models
    server.faults.cut, server.faults.cut_after = 6, 50_000
    server.faults.fail = 4
    server.faults.bandwidth = 40e6
    extract(f"{server.url}/files/base/transformer/diffusion_pytorch_model.safetensors.index.json",
            f"{server.url}/files/tuned.safetensors", tmp_path / "out.safetensors", rank=8, progress=False)
    assert_same_lora(tmp_path / "out.safetensors", local.output)
    statuses = [entry["status"] for entry in server.log]
    assert statuses.count(503) == 4 and server.faults.cut == 0
    assert server.served() <= 1.1 * local.bytes_read + 6 * 50_000  # a cut body is resumed, not re-read


def test_a_url_token_goes_only_to_its_host_and_folder_never_across_redirects(server, models, tmp_path, capsys):
    root, local = models
    private = root / "files" / "private"
    private.mkdir(exist_ok=True)
    (private / "tuned.safetensors").write_bytes((root / "files" / "tuned.safetensors").read_bytes())
    server.faults.tokens = {"/files/private/": TOKEN}
    # the base's index is private; its first shard moves to another host, its second to another path
    index = root / "files" / "base" / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    (private / "base").mkdir(exist_ok=True)
    for name in os.listdir(index.parent):
        (private / "base" / name).write_bytes((index.parent / name).read_bytes())
    server.faults.redirects = {
        "/files/private/base/diffusion_pytorch_model-00001": f"{server.cdn_url}/files/base/transformer/"
                                                             f"diffusion_pytorch_model-00001",
        "/files/private/base/diffusion_pytorch_model-00002": "/files/base/transformer/diffusion_pytorch_model-00002"}
    out = tmp_path / "out.safetensors"
    status = main(["extract", f"{server.url}/files/private/base/diffusion_pytorch_model.safetensors.index.json",
                   f"{server.url}/files/private/tuned.safetensors?x=1", "-o", str(out), "--rank", "8", "-q",
                   "--token", TOKEN])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert_same_lora(out, local.output)
    with_token = {(e["host"].split(":")[0], e["path"]) for e in server.log if e["auth"]}
    assert with_token and all(host == "127.0.0.1" and path.startswith("/files/private/") for host, path in with_token)
    moved = [e for e in server.log if not e["path"].startswith("/files/private/")]
    assert {e["host"].split(":")[0] for e in moved} == {"localhost", "127.0.0.1"}
    assert all(e["auth"] is None for e in moved)
    assert TOKEN not in printed.out + printed.err and TOKEN.encode() not in out.read_bytes()
    # without the token: one line naming the file and which token it needs, no token printed
    status = main(["extract", f"{server.url}/files/private/tuned.safetensors", f"{server.url}/files/tuned.safetensors",
                   "-o", str(tmp_path / "no.safetensors"), "-q", "--token", "wrong-TOKEN-789"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "401" in err and "--token or LORA_COLAB_URL_TOKEN" in err
    assert "wrong-TOKEN-789" not in err and not (tmp_path / "no.safetensors").exists()


def test_hub_sources_pin_one_commit_and_never_send_the_hub_token_to_the_cdn(server, models, tmp_path, monkeypatch,
                                                                              clean_disk):
    import huggingface_hub.constants
    _, local = models
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    server.faults.hub_token = HUB_TOKEN
    report = extract("hf://owner/base", "owner/tuned:tuned.safetensors", tmp_path / "out.safetensors", rank=8,
                     progress=False)
    assert_same_lora(tmp_path / "out.safetensors", local.output)
    resolves = [e for e in server.log if "/resolve/" in e["path"]]
    assert resolves and all(f"/resolve/{server.commit(e['path'].split('/resolve/')[0].strip('/'))}/" in e["path"]
                            for e in resolves)
    assert len(resolves) == 4  # one per file (index, 2 shards, tuned): later ranges go straight to the CDN
    cdn = [e for e in server.log if e["path"].startswith("/cdn/")]
    assert cdn and all(e["auth"] is None and e["host"].startswith("localhost") for e in cdn)
    hub_calls = [e for e in server.log if e["path"].startswith(("/api/models/", "/owner/"))]
    assert hub_calls and all(e["auth"] == f"Bearer {HUB_TOKEN}" and e["host"].startswith("127.0.0.1") for e in hub_calls)
    assert report.base == "owner/base:transformer/diffusion_pytorch_model.safetensors.index.json"
    assert report.tuned == "owner/tuned:tuned.safetensors"
    assert disk_bytes(clean_disk) < 64 << 10
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no_login"))
    with pytest.raises(SourceError, match="owner/base: no such model repo, or it is private and needs a token") as info:
        extract("hf://owner/base", "owner/tuned:tuned.safetensors", tmp_path / "x.safetensors", progress=False)
    assert HUB_TOKEN not in str(info.value)


def test_a_server_that_ignores_ranges_gets_the_file_downloaded_with_a_line_saying_so(server, models, tmp_path,
                                                                                     capsys, clean_disk):
    _, local = models
    server.faults.ignore_range = ("/files/tuned",)
    extract(f"{server.url}/files/base/transformer/diffusion_pytorch_model.safetensors.index.json",
            f"{server.url}/files/tuned.safetensors", tmp_path / "out.safetensors", rank=8, progress=False)
    assert_same_lora(tmp_path / "out.safetensors", local.output)
    assert "ignores range requests, so it cannot be read in place: downloading it first" in capsys.readouterr().err
    assert disk_bytes(clean_disk) == 0, "the temporary copy is removed when the run ends"


def test_a_file_changed_on_the_server_during_the_run_stops_with_a_clear_error(server, models, tmp_path):
    root, _ = models
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(300_000), "b": torch.ones(300_000)}, path)
    server.root = tmp_path
    with SafetensorsFile(f"{server.url}/files/m.safetensors") as ckpt:
        assert torch.equal(ckpt.read("a"), torch.zeros(300_000))
        save_file({"a": torch.zeros(300_000), "b": torch.full((300_000,), 2.0)}, tmp_path / "new.safetensors")
        os.replace(tmp_path / "new.safetensors", path)
        os.utime(path, ns=(1, 1))
        with pytest.raises(CheckpointError, match=r"\[b\]: the file changed on the server during the run"):
            ckpt.read("b")


def test_a_stalled_source_times_out_with_a_message_instead_of_hanging(server, models, monkeypatch):
    monkeypatch.setattr(lc_http.POLICY, "timeout", 0.3)
    monkeypatch.setattr(lc_http.POLICY, "retries", 1)
    server.faults.stall, server.faults.cut_after, server.faults.stall_seconds = 10, 1000, 3.0
    with pytest.raises(SourceError, match=r"tuned.safetensors: stalled: no data for 0.3 s"):
        with open_checkpoint(f"{server.url}/files/tuned.safetensors"):
            pass


@pytest.mark.parametrize("path, says", [
    ("/files/missing.safetensors", "HTTP 404: no such file at this address"),
    ("/login", "is an HTML page"),
    ("/files/notes.txt", "is not a safetensors file: it starts with text 'just some notes"),
])
def test_bad_remote_sources_are_one_line_exit_2_and_write_nothing(server, models, tmp_path, capsys, path, says):
    root, _ = models
    (root / "files" / "notes.txt").write_text("just some notes about a model\n" * 100)
    server.faults.html = ("/login",)
    out = tmp_path / "out.safetensors"
    assert main(["extract", f"{server.url}{path}", f"{server.url}/files/tuned.safetensors", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and not out.exists()


def test_resize_and_inspect_read_remote_loras_and_checkpoints_in_place(server, models, tmp_path, capsys):
    from lora_colab import resize
    root, local = models
    (root / "files" / "lora.safetensors").write_bytes(Path(local.output).read_bytes())
    reports = resize(f"{server.url}/files/base/transformer/diffusion_pytorch_model.safetensors.index.json",
                     [f"{server.url}/files/lora.safetensors?download=1"], tmp_path, "spn_ckpt=1,thr=-1.2")
    want = resize(root / "files" / "base", [local.output], tmp_path / "local", "spn_ckpt=1,thr=-1.2")
    assert Path(reports[0].output).name.replace("lora_", "local_", 1) == Path(want[0].output).name
    assert "?" not in reports[0].output
    assert_same_lora(reports[0].output, want[0].output)
    assert "?" not in reports[0].lora
    assert main(["inspect", f"{server.url}/files/tuned.safetensors"]) == 0
    out = capsys.readouterr().out
    assert "read in place over the network (by range)" in out and "Z-Image" in out


def test_download_first_keeps_the_old_path(server, models, tmp_path):
    _, local = models
    out = tmp_path / "out.safetensors"
    assert main(["extract", f"{server.url}/files/base/transformer/diffusion_pytorch_model.safetensors.index.json",
                 f"{server.url}/files/tuned.safetensors", "-o", str(out), "--rank", "8", "-q",
                 "--download", str(tmp_path / "dl")]) == 0
    assert (tmp_path / "dl" / "tuned.safetensors").exists()
    assert_same_lora(out, local.output)


def test_the_monitor_line_shows_network_read_speed(server, models, tmp_path):
    from lora_colab.memory import snapshot
    lines = []
    extract(f"{server.url}/files/base/transformer/diffusion_pytorch_model.safetensors.index.json",
            f"{server.url}/files/tuned.safetensors", tmp_path / "out.safetensors", rank=8, progress=False,
            on_layer=lambda layer: lines.append(snapshot(nvml=False).line()))
    assert all(" MB/s (" in line and "read)" in line and "net " in line for line in lines)


def test_hub_sources_parse_every_spelling(monkeypatch):
    from lora_colab.io import hub, locations
    seen = []

    class Repo:
        def __init__(self, repo_id, revision=None, token=None):
            seen.append((repo_id, revision))
            self.name = repo_id + (f"@{revision}" if revision else "")

    monkeypatch.setattr(hub, "HubRepo", Repo)
    monkeypatch.setattr(hub, "endpoint", lambda: "https://huggingface.co")
    cases = {
        "https://huggingface.co/Tongyi-MAI/Z-Image-Turbo/resolve/main/transformer/x.safetensors":
            (("Tongyi-MAI/Z-Image-Turbo", "main"), "transformer/x.safetensors"),
        "https://huggingface.co/owner/repo/blob/v1.0/model.safetensors?download=true":
            (("owner/repo", "v1.0"), "model.safetensors"),
        "https://huggingface.co/owner/repo/tree/main/transformer": (("owner/repo", "main"), "transformer"),
        "https://huggingface.co/owner/repo": (("owner/repo", None), ""),
        "hf://owner/repo/sub/f.safetensors": (("owner/repo", None), "sub/f.safetensors"),
        "hf://owner/repo@refs%2Fpr%2F3": (("owner/repo", "refs%2Fpr%2F3"), ""),
        "owner/repo:model.safetensors": (("owner/repo", None), "model.safetensors"),
        "owner/repo@abc123:transformer/model.safetensors": (("owner/repo", "abc123"), "transformer/model.safetensors"),
    }
    for text, (repo, path) in cases.items():
        location = locations.locate(text)
        assert isinstance(location, locations.HubLocation) and seen[-1] == repo and location.path == path, text
    assert isinstance(locations.locate("https://civitai.com/api/download/models/1?token=x"), locations.UrlLocation)
    assert locations.locate("https://civitai.com/api/download/models/1?token=x").display == \
        "https://civitai.com/api/download/models/1"
    assert locations.locate("drive:MyDrive/m.safetensors").path == Path("/content/drive/MyDrive/m.safetensors")
    assert isinstance(locations.locate("/tmp/x.safetensors"), locations.LocalLocation)


def test_credentials_apply_to_their_origin_and_folder_only():
    from lora_colab.io.http import Credential
    cred = Credential("t", "https://host.example/models/x/index.json")
    assert cred.applies("https://host.example/models/x/shard-1.safetensors")
    assert not cred.applies("https://host.example/models/y/shard-1.safetensors")
    assert not cred.applies("https://host.example/models/x/../y/a.safetensors")
    assert not cred.applies("http://host.example/models/x/a.safetensors")          # another scheme
    assert not cred.applies("https://host.example:8443/models/x/a.safetensors")    # another port
    assert not cred.applies("https://cdn.host.example/models/x/a.safetensors")     # another host
    assert "secret-token" not in repr(Credential("secret-token", "https://h/x"))


def test_downloads_never_carry_a_token_across_a_redirect(server, models, tmp_path):
    from lora_colab.io.downloads import download_url
    server.faults.tokens = {"/files/private/": TOKEN}
    server.faults.redirects = {"/files/private/tuned": f"{server.cdn_url}/files/tuned"}
    path = download_url(f"{server.url}/files/private/tuned.safetensors", tmp_path, token=TOKEN, progress=False)
    assert path.read_bytes() == (models[0] / "files" / "tuned.safetensors").read_bytes()
    assert [e["auth"] for e in server.log if e["host"].startswith("localhost")] == [None]


def test_an_expired_cdn_address_is_resolved_again_on_the_hub(server, models, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
    with open_checkpoint("owner/tuned:tuned.safetensors") as ckpt:
        key = ckpt.keys()[-1]
        server.faults.expire_cdn = 1
        want = ckpt.read(key)
    with open_checkpoint(models[0] / "files" / "tuned.safetensors") as local:
        assert torch.equal(want, local.read(key))
    statuses = [(e["path"].split("/")[1], e["status"]) for e in server.log if e["path"].startswith(("/cdn", "/owner"))]
    assert statuses == [("owner", 302), ("cdn", 206), ("cdn", 403), ("owner", 302), ("cdn", 206)]
