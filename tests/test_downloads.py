import http.server
import threading
from collections import namedtuple

import pytest

from lora_colab.io import downloads as sources
from lora_colab.io.downloads import download_url, fetch, from_drive
from lora_colab.errors import SourceError

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class Handler(http.server.BaseHTTPRequestHandler):
    cuts = {"remaining": 0}
    requests = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.requests.append((self.path, self.headers.get("Range"), self.headers.get("Authorization")))
        if self.path.startswith("/secret") and self.headers.get("Authorization") != "Bearer good":
            self.send_error(401, "Unauthorized")
            return
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD) - start))
        if self.path.startswith("/named"):
            self.send_header("Content-Disposition", 'attachment; filename="my model v1.safetensors"')
        self.end_headers()
        body = PAYLOAD[start:]
        if self.cuts["remaining"] > 0:
            self.cuts["remaining"] -= 1
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.connection.shutdown(2)  # cut the connection mid-body
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    Handler.requests.clear()
    Handler.cuts["remaining"] = 0
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_resumes_after_a_cut_connection(server, tmp_path):
    Handler.cuts["remaining"] = 2
    path = download_url(f"{server}/files/model.safetensors?sig=abc", tmp_path, progress=False)
    assert path.name == "model.safetensors" and path.read_bytes() == PAYLOAD
    ranges = [r for _, r, _ in Handler.requests]
    assert ranges[0] is None and all(r and r.startswith("bytes=") for r in ranges[1:]) and len(ranges) == 3
    assert not list(tmp_path.glob("*.part"))


def test_download_continues_a_part_file_left_by_an_earlier_run(server, tmp_path):
    (tmp_path / "model.safetensors.part").write_bytes(PAYLOAD[:1000])
    path = download_url(f"{server}/files/model.safetensors", tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert Handler.requests[-1][1] == "bytes=1000-"


def test_filename_from_content_disposition(server, tmp_path):
    path = download_url(f"{server}/named/123?token=zzz", tmp_path, progress=False)
    assert path.name == "my_model_v1.safetensors"


def test_wrong_or_missing_token_is_a_clear_error_without_the_token(server, tmp_path):
    with pytest.raises(SourceError, match="401 Unauthorized: access refused .the token is missing, wrong") as info:
        download_url(f"{server}/secret/m.safetensors?key=hidden", tmp_path, token="bad-token-123", progress=False)
    assert "bad-token-123" not in str(info.value) and "hidden" not in str(info.value)
    path = download_url(f"{server}/secret/m.safetensors", tmp_path, token="good", progress=False)
    assert path.read_bytes() == PAYLOAD


def test_not_enough_disk_is_refused_with_the_numbers(server, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sources.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 500_000, 500_000))
    with pytest.raises(SourceError, match=r"needs 0\.00 GB but .* has 0\.00 GB free"):
        download_url(f"{server}/files/big.safetensors", tmp_path, progress=False)
    assert not list(tmp_path.iterdir())


def test_drive_copies_to_local_disk_and_says_so(tmp_path, capsys):
    drive_file = tmp_path / "drive" / "m.safetensors"
    drive_file.parent.mkdir()
    drive_file.write_bytes(b"x" * 1000)
    local = from_drive(drive_file, tmp_path / "local", progress=False)
    assert local == tmp_path / "local" / "m.safetensors" and local.read_bytes() == b"x" * 1000
    assert "copying" in capsys.readouterr().out
    with pytest.raises(SourceError, match="Google Drive is not mounted"):
        fetch("/content/drive/MyDrive/missing.safetensors", tmp_path)


def test_hub_token_comes_from_the_environment(monkeypatch, tmp_path):
    from lora_colab.io.hub import hub_token
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no token file from a login on this machine
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert hub_token() == "hf_secret" and hub_token("explicit") == "explicit"
    monkeypatch.delenv("HF_TOKEN")
    assert hub_token() is None


def test_a_refused_connection_fails_at_once_not_after_a_minute_of_retries():
    """Nothing listens on the port: a refused connection is no passing fault, so it is not retried for long."""
    import socket
    import time
    from lora_colab import open_checkpoint
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(SourceError, match=r"127\.0\.0\.1.*refused"):
        open_checkpoint(f"http://127.0.0.1:{port}/lora.safetensors")
    assert time.monotonic() - started < 5


def test_a_drive_source_outside_colab_says_drive_is_not_mounted(monkeypatch, tmp_path):
    from lora_colab import open_checkpoint
    from lora_colab.io import locations
    monkeypatch.setattr(locations, "DRIVE_ROOT", str(tmp_path / "no_drive"))
    from lora_colab import LoraColabError
    with pytest.raises(LoraColabError, match=r"no_drive/MyDrive/x\.safetensors: Google Drive is not mounted here"):
        open_checkpoint("drive:MyDrive/x.safetensors")
    with pytest.raises(SourceError, match=r"Google Drive is not mounted here"):
        fetch("drive:MyDrive/x.safetensors", tmp_path / "copies")
