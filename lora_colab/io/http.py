"""HTTP GETs for range reads: scoped credentials, redirects followed by hand, retries with bounded backoff,
keep-alive connections per thread, and a meter of bytes received.

Only the standard library: every header sent is decided here, so a token never follows a redirect to
another host or path.
"""

import http.client
import os
import posixpath
import random
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass

from ..errors import SourceError

RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 10


def _env_float(name, default):
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass
class Policy:
    """How hard to try: `timeout` s without a byte is a stall; `retries` tries after the first, waiting
    `backoff`·2^k s (at most `max_wait`, or the server's Retry-After up to that)."""

    timeout: float = _env_float("LORA_COLAB_HTTP_TIMEOUT", 60.0)
    retries: int = int(_env_float("LORA_COLAB_HTTP_RETRIES", 6))
    backoff: float = 0.5
    max_wait: float = 20.0

    def wait(self, attempt, retry_after=None):
        """Seconds to sleep before try number `attempt` (1-based retries)."""
        if retry_after is not None:
            return min(retry_after, self.max_wait)
        return min(self.backoff * 2 ** (attempt - 1), self.max_wait) * (0.75 + 0.5 * random.random())


POLICY = Policy()


def origin(url):
    """(scheme, host, port) of `url`, the unit a credential is scoped to."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port


def display_url(url):
    """`url` without user info, query or fragment: safe to print (signed CDN URLs, `?token=`)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


class Credential:
    """A bearer token valid for one origin and path prefix: the URL it was given for and its folder
    (so shards next to an index get it), or a whole host (the Hub). Its repr hides the token."""

    def __init__(self, token, url, prefix=None, hub=False):
        self.token = token or None
        self.hub = hub  # a Hugging Face token: errors name the Hub's ways to give one
        self.origin = origin(url)
        if prefix is None:
            prefix = posixpath.dirname(urllib.parse.urlsplit(url).path).rstrip("/") + "/"
        self.prefix = prefix

    def applies(self, url):
        """True when `url` is on this credential's origin and under its path prefix."""
        if not self.token:
            return False
        path = posixpath.normpath(urllib.parse.urlsplit(url).path or "/")
        return origin(url) == self.origin and (path + "/").startswith(self.prefix)

    def headers(self, url):
        return {"Authorization": f"Bearer {self.token}"} if self.applies(url) else {}

    def __repr__(self):
        return f"Credential({self.origin[1]}{self.prefix}, token={'set' if self.token else 'none'})"


class HttpStatus(SourceError):
    """A final HTTP error status; `status` holds the code."""

    def __init__(self, status, message):
        self.status = status
        super().__init__(message)


def status_message(status, reason, name, hub=False):
    """One line for an HTTP error, naming the source and (never printing it) the token it needs."""
    if status in (401, 403):
        need = ("a Hugging Face token with access to this repo (HF_TOKEN, `hf auth login`, or Colab's HF_TOKEN "
                "secret; gated repos also need their terms accepted on the Hub)" if hub else
                "a token for this server (--token or LORA_COLAB_URL_TOKEN)")
        return (f"{name}: HTTP {status} {reason}: access refused (the token is missing, wrong or has no access); "
                f"it needs {need}")
    if status == 404:
        return f"{name}: HTTP 404: no such file at this address"
    if status == 416:
        return f"{name}: HTTP 416: the server refused the byte range (the file is shorter than expected)"
    return f"{name}: HTTP {status} {reason}"


class Client:
    """GET with headers decided per hop: the credential only where it applies, redirects followed by hand.

    Connections are kept alive per thread and per origin.
    """

    def __init__(self, policy=None):
        self.policy = policy or POLICY
        self._local = threading.local()
        self._context = ssl.create_default_context()

    def _connection(self, url):
        key = origin(url)
        pool = self._local.__dict__.setdefault("pool", {})
        conn = pool.get(key)
        if conn is None:
            scheme, host, port = key
            if scheme == "https":
                conn = http.client.HTTPSConnection(host, port, timeout=self.policy.timeout, context=self._context)
            else:
                conn = http.client.HTTPConnection(host, port, timeout=self.policy.timeout)
            pool[key] = conn
        return conn

    def discard(self, url):
        """Close this thread's connection to `url`'s origin (after an error mid-body)."""
        conn = self._local.__dict__.setdefault("pool", {}).pop(origin(url), None)
        if conn is not None:
            conn.close()

    def _send(self, url, headers):
        parts = urllib.parse.urlsplit(url)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        conn = self._connection(url)
        try:
            conn.request("GET", target, headers=headers)
            return conn.getresponse()
        except (OSError, http.client.HTTPException):
            # a kept-alive connection the server closed: one fresh try before it counts as a failure
            self.discard(url)
            conn = self._connection(url)
            conn.request("GET", target, headers=headers)
            return conn.getresponse()

    def get(self, url, credential=None, headers=None, name=None):
        """GET `url`, following redirects; returns (response, final url) with a 2xx status or raises
        HttpStatus. 429/5xx and connection failures are retried with bounded backoff."""
        name = name or display_url(url)
        attempt = 0
        while True:
            try:
                response, final = self._follow(url, credential, headers or {}, name)
            except (OSError, http.client.HTTPException) as exc:
                attempt += 1
                refused = isinstance(exc, ConnectionRefusedError)  # nothing listens there: not a passing fault
                if attempt > (1 if refused else self.policy.retries):
                    raise SourceError(f"{name}: {describe_failure(exc, self.policy)} "
                                      f"({attempt} tries)") from None
                time.sleep(self.policy.wait(attempt))
                continue
            if response.status < 300:
                return response, final
            status, reason = response.status, response.reason
            retry_after = _retry_after(response)
            _drain(response)
            if status not in RETRY_STATUS:
                raise HttpStatus(status, status_message(status, reason, name, hub=bool(credential and credential.hub)))
            attempt += 1
            if attempt > self.policy.retries:
                raise HttpStatus(status, f"{name}: HTTP {status} {reason} after {attempt} tries")
            time.sleep(self.policy.wait(attempt, retry_after))

    def _follow(self, url, credential, headers, name):
        for _ in range(_MAX_REDIRECTS + 1):
            hop = {"User-Agent": "lora_colab", "Accept-Encoding": "identity", **headers}
            if credential is not None:
                hop.update(credential.headers(url))
            response = self._send(url, hop)
            if response.status not in _REDIRECTS:
                return response, url
            location = response.getheader("Location")
            _drain(response)
            if not location:
                raise HttpStatus(response.status, f"{name}: HTTP {response.status} redirect without a Location")
            url = urllib.parse.urljoin(url, location)
            if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                raise SourceError(f"{name}: redirected to a non-HTTP address")
        raise SourceError(f"{name}: more than {_MAX_REDIRECTS} redirects")


def _retry_after(response):
    value = response.getheader("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _drain(response, limit=1 << 16):
    """Read a small body so the connection can be reused; close it otherwise."""
    try:
        length = int(response.getheader("Content-Length") or -1)
    except ValueError:
        length = -1
    if 0 <= length <= limit:
        response.read()
    else:
        response.close()


def describe_failure(exc, policy):
    """A short reason for a network failure: a stall names the timeout."""
    if isinstance(exc, TimeoutError):
        return f"stalled: no data for {policy.timeout:g} s"
    if isinstance(exc, http.client.IncompleteRead):
        return "connection cut mid-body"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return f"network error ({text})"
