"""Where a checkpoint's files are: a local path, a URL, or a file or folder of a Hub repo.

`locate(text)` parses what a user typed; a Location lists a folder, names a sibling (the shards next to
an index), and opens a file as a ByteSource. Remote files are read in place with range requests; a server
that ignores ranges gets the file downloaded to a temporary file instead, with a line saying so.
"""

import os
import posixpath
import re
import sys
import tempfile
import urllib.parse
from pathlib import Path

from ..errors import SourceError
from .http import Credential, display_url
from .http_file import HttpFile, RangeIgnored, save_body
from .local_file import LocalFile

DRIVE_ROOT = "/content/drive"
URL_TOKEN_ENV = "LORA_COLAB_URL_TOKEN"
_REPO = r"[\w.-]+/[\w.-]+"


class Location:
    """A file or folder a checkpoint can be read from."""

    display = ""
    remote = False

    @property
    def name(self):
        """The last path component."""
        return posixpath.basename(self.display.rstrip("/"))

    def open(self):
        """The file's bytes as a ByteSource."""
        raise NotImplementedError

    def is_dir(self):
        return False

    def exists(self):
        return True

    def list(self):
        """Names of a folder's entries (files and folders)."""
        raise SourceError(f"{self.display}: cannot list a folder here; name the file itself")

    def child(self, relative):
        """The location `relative` (a '/'-separated path) inside this folder."""
        raise NotImplementedError

    def sibling(self, relative):
        """The location `relative` next to this file."""
        raise NotImplementedError

    def local_path(self):
        """A path on local disk, or None for a remote location."""
        return None

    def __str__(self):
        return self.display


class LocalLocation(Location):
    def __init__(self, path):
        self.path = Path(os.fspath(path)).expanduser()
        self.display = str(self.path)

    def open(self):
        return LocalFile(self.path)

    def is_dir(self):
        return self.path.is_dir()

    def exists(self):
        return self.path.exists()

    def list(self):
        return sorted(os.listdir(self.path))

    def child(self, relative):
        return LocalLocation(self.path / relative)

    def sibling(self, relative):
        return LocalLocation(self.path.parent / relative)

    def local_path(self):
        return self.path


class UrlLocation(Location):
    """A file at an http(s) URL; `token` is sent only to that URL's host, under its folder."""

    remote = True

    def __init__(self, url, token=None, credential=None):
        self.url = url
        self.display = display_url(url)
        self.credential = credential or Credential(token, url)

    def open(self):
        return open_remote(self.url, self.credential, self.display)

    def sibling(self, relative):
        return UrlLocation(urllib.parse.urljoin(self.url, urllib.parse.quote(relative)), credential=self.credential)


class HubLocation(Location):
    """A file or folder of a Hub repo at its pinned commit."""

    remote = True

    def __init__(self, repo, path=""):
        self.repo = repo
        self.path = path.strip("/")
        self.display = f"{repo.name}:{self.path}" if self.path else f"hf://{repo.name}"

    def open(self):
        return open_remote(self.repo.url(self.path), self.repo.credential, self.display)

    def _tree(self):
        return self.repo.tree()

    def is_dir(self):
        return self.path in self._tree()[1]

    def exists(self):
        files, folders = self._tree()
        return self.path in files or self.path in folders

    def list(self):
        files, folders = self._tree()
        prefix = self.path + "/" if self.path else ""
        return sorted({p[len(prefix):].split("/", 1)[0] for p in list(files) + list(folders)
                       if p.startswith(prefix) and p != self.path})

    def child(self, relative):
        return HubLocation(self.repo, posixpath.join(self.path, relative))

    def sibling(self, relative):
        return HubLocation(self.repo, posixpath.normpath(posixpath.join(posixpath.dirname(self.path), relative)))


class _DownloadedFile(LocalFile):
    """A temporary local copy of a remote file, deleted when closed."""

    def __init__(self, path, name):
        super().__init__(path, name)

    def close(self):
        super().close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def open_remote(url, credential, name):
    """HttpFile for `url`; when the server ignores ranges, the file downloaded to a temporary file."""
    try:
        return HttpFile(url, credential, name)
    except RangeIgnored as ignored:
        response = ignored.response
        size = response.getheader("Content-Length")
        size = int(size) if size and size.isdigit() else None
        folder = os.environ.get("LORA_COLAB_WORKDIR") or tempfile.gettempdir()
        print(f"{name}: the server ignores range requests, so it cannot be read in place: downloading it "
              f"first" + (f" ({size / 1e9:.2f} GB)" if size else ""), file=sys.stderr)
        fd, path = tempfile.mkstemp(prefix="lora_colab_", suffix=".download", dir=folder)
        os.close(fd)
        try:
            save_body(response, path, size, name)
            return _DownloadedFile(path, name)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            response.close()


def _hub_url(text, endpoint):
    """(repo, revision, path, is_folder) for a Hub web address, else None."""
    for base in dict.fromkeys((endpoint, "https://huggingface.co")):
        if not text.startswith(base + "/"):
            continue
        rest = urllib.parse.urlsplit(text).path[len(urllib.parse.urlsplit(base).path):].strip("/")
        hit = re.fullmatch(rf"({_REPO})/(?:resolve|blob)/([^/]+)/(.+)", rest)
        if hit:
            return hit.group(1), urllib.parse.unquote(hit.group(2)), urllib.parse.unquote(hit.group(3)), False
        hit = re.fullmatch(rf"({_REPO})(?:/tree/([^/]+)(?:/(.*))?)?", rest)
        if hit:
            return hit.group(1), hit.group(2), urllib.parse.unquote(hit.group(3) or ""), True
    return None


def _split_revision(repo):
    repo, _, revision = repo.partition("@")
    return repo, revision or None


def locate(source, token=None, hf_token=None):
    """A Location for `source`: a path, `http(s)://` URL, Hub URL, `hf://owner/repo[@rev][/path]`,
    `owner/repo[@rev]:path`, or `drive:MyDrive/...`. `token` is for plain URLs (else $LORA_COLAB_URL_TOKEN);
    `hf_token` for the Hub (else huggingface_hub's own)."""
    if isinstance(source, Location):
        return source
    if isinstance(source, os.PathLike):
        return LocalLocation(source)
    text = str(source).strip()
    if text.startswith(("http://", "https://")):
        from .hub import HubRepo, endpoint

        hit = _hub_url(text, endpoint())
        if hit:
            repo, revision, path, _ = hit
            return HubLocation(HubRepo(repo, revision, hf_token), path)
        return UrlLocation(text, token or url_token())
    if text.startswith("hf://"):
        from .hub import HubRepo

        parts = text[len("hf://"):].strip("/").split("/", 2)
        if len(parts) < 2:
            raise SourceError(f"{text}: a Hub source is hf://owner/repo[/path]")
        repo, revision = _split_revision("/".join(parts[:2]))
        return HubLocation(HubRepo(repo, revision, hf_token), parts[2] if len(parts) == 3 else "")
    if text.startswith("drive:"):
        return LocalLocation(os.path.join(DRIVE_ROOT, text[len("drive:"):].lstrip("/")))
    hit = re.fullmatch(rf"({_REPO}(?:@[\w./-]+)?):(.+)", text)
    if hit and not os.path.exists(text):
        from .hub import HubRepo

        repo, revision = _split_revision(hit.group(1))
        return HubLocation(HubRepo(repo, revision, hf_token), hit.group(2))
    return LocalLocation(text)


def missing(location):
    """Why a local source is not there: that Google Drive is not mounted, for a path under its mount point
    where nothing is mounted; else that there is no such file or folder."""
    path = str(getattr(location, "path", ""))
    if path.startswith(DRIVE_ROOT) and not os.path.isdir(DRIVE_ROOT):
        return (f"Google Drive is not mounted here ({DRIVE_ROOT} does not exist): in Colab, run the cell that "
                f"mounts Drive first; elsewhere, give the file's own path")
    return "no such file or folder"


def url_token():
    """The token for plain URLs: $LORA_COLAB_URL_TOKEN, else Colab's secret of that name, else None."""
    if os.environ.get(URL_TOKEN_ENV):
        return os.environ[URL_TOKEN_ENV]
    if "google.colab" not in sys.modules:
        return None
    try:
        from google.colab import userdata  # noqa: PLC0415

        return userdata.get(URL_TOKEN_ENV)
    except Exception:  # no such secret, or access not granted
        return None


def file_name(source):
    """The last component of a path, URL or Hub `owner/repo:file`, without folders, hosts or queries."""
    return describe(source).rstrip("/").replace(":", "/").rsplit("/", 1)[-1]


def describe(source):
    """`source` as safe to print: a URL without query or user info."""
    text = str(source)
    return display_url(text) if text.startswith(("http://", "https://")) else text
