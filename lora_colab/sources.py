"""Where models come from and results go: the Hugging Face Hub, direct URLs, Google Drive, local disk."""

import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import LoraColabError

DRIVE_ROOT = "/content/drive"
_HUB_URL = re.compile(r"https://huggingface\.co/([^/]+/[^/]+)/(?:resolve|blob)/([^/]+)/(.+)")
_CHUNK = 1 << 20


class SourceError(LoraColabError):
    """A download or copy that cannot be done; the message says why, without any token."""


@dataclass(frozen=True)
class Source:
    """A parsed source: kind is "hub-file", "hub-folder", "url", "drive" or "local"."""

    kind: str
    location: str        # repo id, URL or path
    filename: str = ""   # file inside a Hub repo
    revision: str = None


def parse_source(text):
    """Recognise `owner/repo:file`, `hf://owner/repo[/file]`, Hub URLs, other URLs, Drive and local paths."""
    text = str(text).strip()
    hit = _HUB_URL.fullmatch(text)
    if hit:
        return Source("hub-file", hit.group(1), urllib.parse.unquote(hit.group(3)), hit.group(2))
    if text.startswith(("http://", "https://")):
        return Source("url", text)
    if text.startswith("hf://"):
        parts = text[len("hf://"):].split("/", 2)
        if len(parts) == 3:
            return Source("hub-file", "/".join(parts[:2]), parts[2])
        return Source("hub-folder", "/".join(parts))
    if text.startswith("drive:"):
        return Source("drive", os.path.join(DRIVE_ROOT, text[len("drive:"):].lstrip("/")))
    if text.startswith(DRIVE_ROOT):
        return Source("drive", text)
    if re.fullmatch(r"[\w.-]+/[\w.-]+:.+", text) and not os.path.exists(text):
        repo, filename = text.split(":", 1)
        return Source("hub-file", repo, filename)
    return Source("local", os.path.expanduser(text))


def hf_token():
    """The Hub token from $HF_TOKEN or Colab's `HF_TOKEN` secret, or None. Never printed."""
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    try:
        from google.colab import userdata  # noqa: PLC0415
        return userdata.get("HF_TOKEN")
    except Exception:  # not in Colab, no secret, or access not granted
        return None


def check_disk(folder, needed, what):
    """Refuse, with the numbers, when `needed` bytes will not fit in `folder`'s file system."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed and needed > free:
        raise SourceError(f"{what}: needs {needed / 1e9:.2f} GB but {folder} has {free / 1e9:.2f} GB free")


def download_url(url, folder, token=None, progress=True, retries=5, timeout=60):
    """Download `url` into `folder`, resuming a `.part` file after a cut connection.

    The name comes from Content-Disposition, else from the URL. Returns the final path.
    """
    folder = Path(folder)
    headers = {"User-Agent": "lora_colab"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    safe_url = _strip_query(url)
    name, total = None, None
    part = None
    for attempt in range(retries + 1):
        done = part.stat().st_size if part is not None and part.exists() else 0
        request = urllib.request.Request(url, headers={**headers, **({"Range": f"bytes={done}-"} if done else {})})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if name is None:
                    name = _filename(response, url)
                    total = _total_size(response, done)
                    check_disk(folder, total, safe_url)
                    part = folder / (name + ".part")
                    if done == 0 and part.exists():
                        done = part.stat().st_size
                        if done:
                            continue  # an earlier run left a partial file: ask for the rest
                if done and response.status != 206:
                    done = 0  # the server ignored Range: start over
                _copy_stream(response, part, done, total, progress, name)
            if total is None or part.stat().st_size >= total:
                break
            if attempt == retries:
                break  # reported below, with what arrived
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise SourceError(f"{safe_url}: {exc.code} {exc.reason}: the token is missing, wrong or has no "
                                  f"access to this file") from None
            if exc.code == 416 and part is not None and part.exists():
                break  # nothing left to fetch
            if exc.code < 500 or attempt == retries:
                raise SourceError(f"{safe_url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            if isinstance(exc, SourceError):
                raise
            if attempt == retries:
                raise SourceError(f"{safe_url}: download failed after {retries + 1} tries "
                                  f"({getattr(exc, 'reason', exc)}); run again to resume") from None
        time.sleep(min(2 ** attempt * 0.1, 5))
    final = folder / name
    if total is not None and part.stat().st_size != total:
        raise SourceError(f"{safe_url}: got {part.stat().st_size} of {total} bytes; run again to resume")
    os.replace(part, final)
    return final


def _strip_query(url):
    parsed = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parsed._replace(query="", fragment=""))


def _filename(response, url):
    disposition = response.headers.get("Content-Disposition", "")
    hit = re.search(r"filename\*=UTF-8''([^;]+)", disposition) or re.search(r'filename="?([^";]+)"?', disposition)
    name = urllib.parse.unquote(hit.group(1)) if hit else os.path.basename(urllib.parse.urlsplit(url).path)
    name = os.path.basename(name.strip()) or "download"
    return re.sub(r"[^\w.+-]", "_", name)


def _total_size(response, done):
    content_range = response.headers.get("Content-Range", "")
    if "/" in content_range and content_range.rsplit("/", 1)[1].isdigit():
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    return int(length) + done if length and length.isdigit() else None


def _copy_stream(response, part, done, total, progress, name):
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, desc=name, dynamic_ncols=True)
    try:
        with open(part, "ab" if done else "wb") as out:
            while True:
                chunk = response.read(_CHUNK)
                if not chunk:
                    break
                out.write(chunk)
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()


def from_drive(path, local_folder, progress=True):
    """A Drive file, copied to local disk when it fits (Drive's FUSE mount is slow to read); says which."""
    path = Path(path)
    if not path.exists():
        mounted = os.path.isdir(os.path.join(DRIVE_ROOT, "MyDrive"))
        raise SourceError(f"{path}: not found" + ("" if mounted else " (Google Drive is not mounted: run "
                                                                      "lora_colab.sources.mount_drive())"))
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    local_folder = Path(local_folder)
    local_folder.mkdir(parents=True, exist_ok=True)
    if size > shutil.disk_usage(local_folder).free * 0.9:
        print(f"{path}: {size / 1e9:.1f} GB does not fit on local disk; reading it from Drive (slower)")
        return path
    target = local_folder / path.name
    print(f"copying {path} ({size / 1e9:.2f} GB) from Drive to {target} (local disk reads much faster)")
    if path.is_dir():
        shutil.copytree(path, target, dirs_exist_ok=True)
    else:
        shutil.copyfile(path, target)
    return target


def mount_drive():
    """Mount Google Drive at /content/drive (Colab only)."""
    try:
        from google.colab import drive  # noqa: PLC0415
    except ImportError:
        raise SourceError("Google Drive can only be mounted inside Colab") from None
    drive.mount(DRIVE_ROOT)


def fetch(source, folder, token=None, allow_patterns=None, progress=True):
    """Make `source` (see parse_source) available as a local path in `folder` and return it."""
    src = source if isinstance(source, Source) else parse_source(source)
    folder = Path(folder)
    if src.kind == "local":
        if not os.path.exists(src.location):
            raise SourceError(f"{src.location}: no such file or folder")
        return Path(src.location)
    if src.kind == "drive":
        return from_drive(src.location, folder, progress)
    if src.kind == "url":
        return download_url(src.location, folder, token=token, progress=progress)
    return _from_hub(src, folder, token if token is not None else hf_token(), allow_patterns)


def _hub_size(src, token, allow_patterns):
    """Bytes a Hub download will take (None when the Hub does not say)."""
    import fnmatch

    from huggingface_hub import HfApi  # noqa: PLC0415
    try:
        if src.kind == "hub-file":
            infos = HfApi(token=token or None).get_paths_info(src.location, [src.filename], revision=src.revision)
        else:
            infos = HfApi(token=token or None).model_info(src.location, revision=src.revision, files_metadata=True).siblings
    except Exception:  # offline, gated, ...: the download itself reports it
        return None
    sizes = []
    for info in infos or []:
        name = getattr(info, "path", None) or getattr(info, "rfilename", "")
        if allow_patterns and not any(fnmatch.fnmatch(name, p) for p in ([allow_patterns] if isinstance(
                allow_patterns, str) else allow_patterns)):
            continue
        sizes.append(getattr(info, "size", None) or 0)
    return sum(sizes) or None


def _from_hub(src, folder, token, allow_patterns):
    from huggingface_hub import errors as hub_errors  # noqa: PLC0415
    from huggingface_hub import hf_hub_download, snapshot_download  # noqa: PLC0415
    try:
        check_disk(folder, _hub_size(src, token, allow_patterns), f"{src.location}/{src.filename}".rstrip("/"))
        if src.kind == "hub-file":
            return Path(hf_hub_download(src.location, src.filename, revision=src.revision, token=token or None,
                                        local_dir=folder / src.location.replace("/", "__")))
        return Path(snapshot_download(src.location, revision=src.revision, token=token or None,
                                      allow_patterns=allow_patterns, local_dir=folder / src.location.replace("/", "__")))
    except (hub_errors.GatedRepoError, hub_errors.RepositoryNotFoundError) as exc:
        raise SourceError(f"{src.location}: {type(exc).__name__}: check the repo name and that your HF_TOKEN has "
                          f"access") from None
    except hub_errors.EntryNotFoundError:
        raise SourceError(f"{src.location}: no file {src.filename!r} in this repo") from None
    except (OSError, ValueError) as exc:
        raise SourceError(f"{src.location}: download failed ({str(exc).splitlines()[0][:200]})") from None
