"""A loopback HTTP/1.1 file server for tests and benchmarks: byte ranges, a fake Hub, and faults on demand.

    /files/<path>                       a file under `root` (Range, ETag, keep-alive)
    /api/models/<repo>/revision/<rev>   the fake Hub's repo info (its commit)
    /api/models/<repo>/tree/<rev>[/p]   the fake Hub's file listing
    /<repo>/resolve/<rev>/<path>        302 to the CDN (`cdn_host`: another host name, a signed query)
    /cdn/<repo>/<path>                  the fake CDN (no token wanted)
    /stats                              {"bytes_sent": body bytes sent so far}

Faults (attributes of `Faults`, changed by tests while the server runs): cut bodies, 503s, stalls, a
bandwidth limit, required tokens, redirects, servers that ignore Range. Every request is logged.

Run as a script for benchmarks: `python tests/range_server.py ROOT --bandwidth 200e6` prints the port.
"""

import argparse
import hashlib
import http.server
import json
import os
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Faults:
    cut: int = 0                 # the next N file bodies are cut after `cut_after` bytes
    cut_after: int = 100_000
    fail: int = 0                # the next N file requests answer 503
    stall: int = 0               # the next N file bodies stop after `cut_after` bytes and hang
    stall_seconds: float = 30.0
    bandwidth: float = 0.0       # bytes/s over all connections (0: unlimited)
    tokens: dict = field(default_factory=dict)     # path prefix -> token it needs
    redirects: dict = field(default_factory=dict)  # path prefix -> URL prefix it moves to
    ignore_range: tuple = ()     # path prefixes answered 200 with the whole file
    html: tuple = ()             # path prefixes answered with an HTML login page
    hub_token: str = ""          # the fake Hub's API and resolve URLs need it
    expire_cdn: int = 0          # the next N CDN requests answer 403 (a signed address that expired)


class _Pacer:
    """A token bucket: all connections together send at most `rate` bytes/s, with a burst of `burst`
    seconds' worth (as a link's buffers allow: time a busy server thread lost is not lost for good)."""

    def __init__(self, burst=0.1):
        self._lock = threading.Lock()
        self._next = 0.0
        self._burst = burst

    def wait(self, n, rate):
        if rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now - self._burst, self._next)
            self._next = start + n / rate
        if start > now:
            time.sleep(start - now)


class RangeServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root, hub_repos=None, faults=None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = Path(root)
        self.hub_repos = {name: Path(path) for name, path in (hub_repos or {}).items()}
        self.faults = faults or Faults()
        self.log = []
        self.bytes_sent = 0
        self.lock = threading.Lock()
        self.pacer = _Pacer()
        self.thread = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    @property
    def cdn_url(self):
        return f"http://localhost:{self.server_address[1]}"

    @staticmethod
    def commit(repo):
        return hashlib.sha1(repo.encode()).hexdigest()

    def start(self):
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.shutdown()
        self.server_close()

    def take(self, name):
        """Use up one of the fault counter `name`; True when there was one."""
        with self.lock:
            left = getattr(self.faults, name)
            if left > 0:
                setattr(self.faults, name, left - 1)
                return True
            return False

    def served(self, prefix=""):
        """Body bytes sent for paths starting with `prefix`."""
        with self.lock:
            return sum(entry["sent"] for entry in self.log if entry["path"].startswith(prefix))


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        parts = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(parts.path)
        entry = {"path": path, "host": self.headers.get("Host", ""), "range": self.headers.get("Range"),
                 "auth": self.headers.get("Authorization"), "status": None, "sent": 0}
        with self.server.lock:
            self.server.log.append(entry)
        faults = self.server.faults
        if path == "/stats":
            return self._small(entry, 200, json.dumps({"bytes_sent": self.server.bytes_sent}).encode(),
                               "application/json")
        for prefix, target in faults.redirects.items():
            if path.startswith(prefix):
                return self._redirect(entry, target + path[len(prefix):] + ("?" + parts.query if parts.query else ""))
        for prefix, token in faults.tokens.items():
            if path.startswith(prefix) and entry["auth"] != f"Bearer {token}":
                return self._small(entry, 401, b"token needed")
        if path.startswith(faults.html):
            return self._small(entry, 200, b"<!DOCTYPE html><html><body>Please log in</body></html>", "text/html")
        if path.startswith("/api/models/"):
            return self._hub_api(entry, path[len("/api/models/"):])
        if "/resolve/" in path:
            return self._hub_resolve(entry, path)
        if path.startswith("/cdn/"):
            if self.server.take("expire_cdn"):
                return self._small(entry, 403, b"Request has expired")
            repo, _, rest = path[len("/cdn/"):].partition("/")
            owner_repo = repo + "/" + rest.split("/", 1)[0]
            root = self.server.hub_repos.get(owner_repo)
            return self._file(entry, root / rest.split("/", 1)[1] if root and "/" in rest else None, path)
        if path.startswith("/files/"):
            return self._file(entry, self.server.root / path[len("/files/"):], path)
        return self._small(entry, 404, b"not found")

    # -- plain responses ------------------------------------------------------------------------
    def _small(self, entry, status, body, kind="text/plain", headers=()):
        entry["status"] = status
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, entry, location, headers=()):
        self._small(entry, 302, b"", headers=(("Location", location),) + tuple(headers))

    # -- fake Hub -------------------------------------------------------------------------------
    def _hub_auth_ok(self, entry):
        token = self.server.faults.hub_token
        return not token or entry["auth"] == f"Bearer {token}"

    def _hub_api(self, entry, rest):
        if not self._hub_auth_ok(entry):
            return self._small(entry, 401, b'{"error": "Invalid credentials"}', "application/json",
                               (("X-Error-Code", "RepoNotFound"),))
        owner, name, kind, rest = (rest.split("/", 3) + ["", "", "", ""])[:4]
        repo = f"{owner}/{name}"
        root = self.server.hub_repos.get(repo)
        if root is None:
            return self._small(entry, 404, b'{"error": "Repository not found"}', "application/json",
                               (("X-Error-Code", "RepoNotFound"),))
        if kind == "revision":
            body = json.dumps({"id": repo, "modelId": repo, "sha": self.server.commit(repo), "siblings": []})
            return self._small(entry, 200, body.encode(), "application/json")
        sub = rest.split("/", 1)[1] if "/" in rest else ""
        entries = []
        for item in sorted((root / sub).rglob("*")):
            rel = item.relative_to(root).as_posix()
            if item.is_dir():
                entries.append({"type": "directory", "path": rel, "oid": "0" * 40})
            else:
                entries.append({"type": "file", "path": rel, "size": item.stat().st_size, "oid": "0" * 40})
        return self._small(entry, 200, json.dumps(entries).encode(), "application/json")

    def _hub_resolve(self, entry, path):
        repo, _, rest = path.lstrip("/").partition("/resolve/")
        revision, _, file = rest.partition("/")
        root = self.server.hub_repos.get(repo)
        if not self._hub_auth_ok(entry):
            return self._small(entry, 401, b"Invalid credentials", headers=(("X-Error-Code", "GatedRepo"),))
        if root is None or not (root / file).is_file():
            return self._small(entry, 404, b"Entry not found", headers=(("X-Error-Code", "EntryNotFound"),))
        target = root / file
        stat = target.stat()
        self._redirect(entry, f"{self.server.cdn_url}/cdn/{repo}/{file}?Expires=9999&Signature=sig{stat.st_mtime_ns}",
                       (("X-Repo-Commit", self.server.commit(repo)), ("X-Linked-Size", str(stat.st_size)),
                        ("X-Linked-Etag", f'"{stat.st_size}-{stat.st_mtime_ns}"')))

    # -- files ----------------------------------------------------------------------------------
    def _file(self, entry, target, path):
        server, faults = self.server, self.server.faults
        if target is None or not target.is_file() or ".." in Path(path).parts:
            return self._small(entry, 404, b"not found")
        if server.take("fail"):
            return self._small(entry, 503, b"busy", headers=(("Retry-After", "0"),))
        size = target.stat().st_size
        etag = f'"{size}-{target.stat().st_mtime_ns}"'
        start, end = 0, size - 1
        ranged = entry["range"] and not path.startswith(faults.ignore_range)
        if ranged:
            spec = entry["range"].split("=", 1)[1]
            first, _, last = spec.partition("-")
            start = int(first)
            end = min(int(last), size - 1) if last else size - 1
            if start >= size:
                return self._small(entry, 416, b"", headers=(("Content-Range", f"bytes */{size}"),))
        length = end - start + 1
        entry["status"] = 206 if ranged else 200
        self.send_response(entry["status"])
        self.send_header("Content-Length", str(length))
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        limit = length
        cut = server.take("cut")
        stall = not cut and server.take("stall")
        if cut or stall:
            limit = min(length, faults.cut_after)
        self._send_body(entry, target, start, limit)
        if stall:
            time.sleep(faults.stall_seconds)
        if cut or stall:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _send_body(self, entry, target, start, length):
        server = self.server
        chunk = 256 << 10
        with open(target, "rb") as f:
            sent = 0
            while sent < length:
                n = min(chunk, length - sent)
                server.pacer.wait(n, server.faults.bandwidth)
                try:
                    n = os.sendfile(self.connection.fileno(), f.fileno(), start + sent, n)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                    break
                if n == 0:
                    break
                sent += n
                with server.lock:
                    entry["sent"] += n
                    server.bytes_sent += n


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--bandwidth", type=float, default=0.0, help="bytes/s over all connections")
    args = parser.parse_args()
    server = RangeServer(args.root, faults=Faults(bandwidth=args.bandwidth))
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
