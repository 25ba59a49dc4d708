"""A remote file read in place with HTTP range requests: resumed after a cut, retried, split over
several connections, checked against changes on the server."""

import concurrent.futures
import http.client
import os
import re
import threading
import time

from ..errors import CheckpointError, SourceError
from .byte_source import ByteSource
from ..memory import NETWORK
from .http import Client, HttpStatus, describe_failure, display_url

PROBE_BYTES = 64 << 10   # the first request: a safetensors header usually fits
MIN_PIECE = 1 << 20      # a read is split over connections in pieces of at least this
CONNECTIONS = max(1, int(os.environ.get("LORA_COLAB_HTTP_CONNECTIONS", "8")))
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_EXPIRED = frozenset({401, 403, 404, 410})  # what a signed CDN address answers once its signature expires

CLIENT = Client()
_POOL = None
_POOL_LOCK = threading.Lock()


def _pool():
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = concurrent.futures.ThreadPoolExecutor(CONNECTIONS, thread_name_prefix="lora-colab-http")
        return _POOL


class RangeIgnored(SourceError):
    """The server answered a range request with the whole file; `response` is that answer, still open."""

    def __init__(self, name, response):
        self.response = response
        super().__init__(f"{name}: the server ignores HTTP range requests")


def _validator(response):
    return response.getheader("ETag") or response.getheader("Last-Modified") or ""


class HttpFile(ByteSource):
    """Bytes of `url`, fetched by range when read. `credential` (an http.Credential) decides where a
    token is sent; after a redirect (the Hub to its CDN) later ranges go straight to where it led.

    Raises RangeIgnored on open when the server does not serve ranges."""

    def __init__(self, url, credential=None, name=None, client=None):
        super().__init__()
        self.url = url
        self.name = name or display_url(url)
        self.credential = credential
        self._client = client or CLIENT
        self._final = None
        self._lock = threading.Lock()
        self._probe()

    # -- opening ------------------------------------------------------------------------------
    def _probe(self):
        try:
            response, final = self._client.get(self.url, self.credential, {"Range": f"bytes=0-{PROBE_BYTES - 1}"},
                                               self.name)
        except HttpStatus as exc:
            if exc.status != 416:
                raise
            self.size, self.etag, self._head = 0, "", b""  # an empty file has no byte 0
            return
        if (response.getheader("Content-Type") or "").lower().startswith("text/html"):
            response.close()
            raise SourceError(f"{self.name}: is an HTML page, not a model file (a login or error page? check the "
                              f"address; a Hub page's file is its /resolve/ address)")
        if response.status == 200:
            raise RangeIgnored(self.name, response)
        start, end, total = self._content_range(response)
        if start != 0 or total is None:
            response.close()
            raise SourceError(f"{self.name}: the server answered bytes {start}-{end}/{total} to a request for "
                              f"the first {PROBE_BYTES} bytes")
        self.size, self.etag = total, _validator(response)
        self.identity = f"{total}:{self.etag}"
        self._final = final if final != self.url else None
        head = memoryview(bytearray(end + 1))
        got = 0
        try:
            while got < len(head):
                n = response.readinto(head[got:])
                if not n:
                    break
                got += n
        except (OSError, http.client.HTTPException):
            self._client.discard(final)
        self._count(got)
        NETWORK.add(got)
        self._head = b""
        if got < len(head):  # cut mid-body: the rest by range, resumed like any read
            self._fetch(head[got:], got, None)
        self._head = head.tobytes()

    def _content_range(self, response):
        hit = _CONTENT_RANGE.fullmatch((response.getheader("Content-Range") or "").strip())
        if not hit:
            response.close()
            raise SourceError(f"{self.name}: HTTP 206 without a valid Content-Range header")
        total = None if hit.group(3) == "*" else int(hit.group(3))
        return int(hit.group(1)), int(hit.group(2)), total

    # -- reading ------------------------------------------------------------------------------
    def readinto(self, view, offset, tensor=None):
        """Fill `view` with the bytes at `offset`: large reads run on several connections at once."""
        view = view.cast("B")
        n = len(view)
        if offset < 0 or offset + n > self.size:
            raise CheckpointError(self.name, f"read of {n} bytes at {offset} runs past the {self.size}-byte file",
                                  tensor)
        if offset < len(self._head):
            k = min(n, len(self._head) - offset)
            view[:k] = self._head[offset:offset + k]
            view, offset, n = view[k:], offset + k, n - k
        if not n:
            return
        count = min(CONNECTIONS, max(1, n // MIN_PIECE))
        if count == 1:
            self._fetch(view, offset, tensor)
            return
        step = -(-n // count)
        futures = [_pool().submit(self._fetch, view[a:a + step], offset + a, tensor) for a in range(0, n, step)]
        concurrent.futures.wait(futures)  # every writer into `view` is done before anything is raised
        for future in futures:
            future.result()

    def _fetch(self, view, offset, tensor):
        """One range on one connection; a cut or stalled body resumes from the last byte received."""
        n, done, failures = len(view), 0, 0
        policy = self._client.policy
        while done < n:
            before = done
            url = self._final or self.url
            try:
                response = self._range(url, offset + done, offset + n - 1, tensor)
                while done < n:
                    got = response.readinto(view[done:])
                    if not got:
                        raise http.client.IncompleteRead(b"", n - done)
                    done += got
                    NETWORK.add(got)
            except (OSError, http.client.HTTPException) as exc:
                self._client.discard(url)
                failures = 0 if done > before else failures + 1
                if failures > policy.retries:
                    raise SourceError(f"{self._where(tensor)}: {describe_failure(exc, policy)} "
                                      f"({failures} tries at byte {offset + done})") from None
                time.sleep(policy.wait(failures))
            finally:
                self._count(done - before)

    def _range(self, url, start, end, tensor):
        """A response positioned at byte `start`, checked to be this file, unchanged."""
        try:
            response, final = self._client.get(url, self.credential, {"Range": f"bytes={start}-{end}"}, self.name)
        except HttpStatus as exc:
            if url == self.url or exc.status not in _EXPIRED:
                raise SourceError(f"{self._where(tensor)}: {str(exc).split(': ', 1)[-1]}") from None
            self._final = None  # the CDN's signed address expired: ask the origin again
            return self._range(self.url, start, end, tensor)
        if final != url:
            self._final = final
        if response.status != 206:
            response.close()
            raise CheckpointError(self.name, f"the server stopped honouring range requests (HTTP {response.status})",
                                  tensor)
        got_start, got_end, total = self._content_range(response)
        etag = _validator(response)
        if (total is not None and total != self.size) or (self.etag and etag and etag != self.etag):
            response.close()
            raise CheckpointError(self.name, f"the file changed on the server during the run (now {total} bytes, "
                                             f"validator {etag or 'none'}; it was {self.size}, {self.etag or 'none'}): "
                                             f"run again", tensor)
        if got_start != start or got_end > end:
            response.close()
            raise SourceError(f"{self._where(tensor)}: asked for bytes {start}-{end}, got {got_start}-{got_end}")
        return response

    def _where(self, tensor):
        return f"{self.name} [{tensor}]" if tensor else self.name

    def _count(self, n):
        with self._lock:
            self.bytes_read += n


def save_body(response, path, size=None, name="", progress=None):
    """Write an open response's body to `path` (when a server ignores ranges); returns bytes written."""
    written = 0
    with open(path, "wb") as out:
        while True:
            try:
                chunk = response.read(1 << 20)
            except (OSError, http.client.HTTPException) as exc:
                raise SourceError(f"{name}: download cut ({describe_failure(exc, CLIENT.policy)}); run again") from None
            if not chunk:
                break
            out.write(chunk)
            written += len(chunk)
            NETWORK.add(len(chunk))
            if progress is not None:
                progress(len(chunk))
    if size is not None and written != size:
        raise SourceError(f"{name}: download ended after {written} of {size} bytes; run again")
    return written
