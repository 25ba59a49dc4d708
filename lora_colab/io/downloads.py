"""Download-first (`--download DIR`), Google Drive, and where results go: copies of sources on local disk.

Reading in place (io.locations) is the default; these make a local copy when that is wanted: a server
without range support, many runs over the same files, or a pickle.
"""

import http.client
import os
import sys
import re
import shutil
import time
import urllib.parse
from pathlib import Path

from ..errors import SourceError
from ..memory import NETWORK
from .http import HttpStatus, describe_failure
from .http_file import CLIENT
from .hub import hub_token as hf_token  # noqa: F401  (the notebook's save step uses it)
from .locations import DRIVE_ROOT, HubLocation, LocalLocation, UrlLocation, locate, missing

_CHUNK = 1 << 20


def check_disk(folder, needed, what):
    """Refuse, with the numbers, when `needed` bytes will not fit in `folder`'s file system."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed and needed > free:
        raise SourceError(f"{what}: needs {needed / 1e9:.2f} GB but {folder} has {free / 1e9:.2f} GB free")


def download_url(url, folder, token=None, progress=True, credential=None):
    """Download `url` into `folder`, resuming a `.part` file after a cut connection; returns the path.

    The name comes from Content-Disposition, else from the URL. `token` goes only to the URL's own host
    and folder (never across a redirect elsewhere)."""
    location = UrlLocation(url, token, credential)
    folder = Path(folder)
    name = part = total = None
    failures = 0
    while True:
        done = part.stat().st_size if part is not None and part.exists() else 0
        try:
            response, final = CLIENT.get(url, location.credential, {"Range": f"bytes={done}-"} if done else {},
                                         location.display)
        except HttpStatus as exc:
            if exc.status == 416 and done:
                break  # nothing left to fetch
            raise
        if name is None:
            name = _filename(response, final)
            total = _total_size(response, done)
            check_disk(folder, total, location.display)
            part = folder / (name + ".part")
            if not done and part.exists() and part.stat().st_size:
                response.close()
                continue  # an earlier run left a partial file: ask for the rest
        if done and response.status != 206:
            done = 0  # the server ignored Range: start over
        try:
            _copy_stream(response, part, done, total, progress, name)
            break
        except (OSError, http.client.HTTPException) as exc:
            CLIENT.discard(final)
            failures += 1
            if failures > CLIENT.policy.retries:
                raise SourceError(f"{location.display}: download failed ({describe_failure(exc, CLIENT.policy)}, "
                                  f"{failures} tries); run again to resume") from None
            time.sleep(CLIENT.policy.wait(failures))
    if total is not None and part.stat().st_size != total:
        raise SourceError(f"{location.display}: got {part.stat().st_size} of {total} bytes; run again to resume")
    final_path = folder / name
    os.replace(part, final_path)
    return final_path


def _filename(response, url):
    disposition = response.getheader("Content-Disposition") or ""
    hit = re.search(r"filename\*=UTF-8''([^;]+)", disposition) or re.search(r'filename="?([^";]+)"?', disposition)
    name = urllib.parse.unquote(hit.group(1)) if hit else os.path.basename(urllib.parse.urlsplit(url).path)
    name = os.path.basename(name.strip()) or "download"
    return re.sub(r"[^\w.+-]", "_", name)


def _total_size(response, done):
    content_range = response.getheader("Content-Range") or ""
    if "/" in content_range and content_range.rsplit("/", 1)[1].isdigit():
        return int(content_range.rsplit("/", 1)[1])
    length = response.getheader("Content-Length")
    if not (length and length.isdigit()):
        return None
    return int(length) + (done if response.status == 206 else 0)


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
                NETWORK.add(len(chunk))
                if bar is not None:
                    bar.update(len(chunk))
        if total is not None and part.stat().st_size < total:
            raise http.client.IncompleteRead(b"", total - part.stat().st_size)
    finally:
        if bar is not None:
            bar.close()


def from_drive(path, local_folder, progress=True):
    """A Drive file, copied to local disk when it fits (Drive's FUSE mount is slow to read); says which."""
    path = Path(path)
    if not path.exists():
        mounted = os.path.isdir(os.path.join(DRIVE_ROOT, "MyDrive"))
        raise SourceError(f"{path}: not found" + ("" if mounted else " (Google Drive is not mounted: run "
                                                                      "lora_colab.io.downloads.mount_drive())"))
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


def drive_folder(text):
    """A folder given in a notebook: an absolute path as it is, `drive:MyDrive/x` or `MyDrive/x` or `x`
    under the mounted Drive (mounted first inside Colab)."""
    text = str(text).strip()
    if os.path.isabs(text):
        path = Path(text)
    else:
        rest = text[len("drive:"):] if text.startswith("drive:") else text
        rest = rest.lstrip("/")
        path = Path(DRIVE_ROOT) / (rest if rest.split("/", 1)[0] in ("MyDrive", "Shareddrives") else
                                   os.path.join("MyDrive", rest))
    if str(path).startswith(DRIVE_ROOT) and not os.path.isdir(os.path.join(DRIVE_ROOT, "MyDrive")):
        mount_drive()
    return path


def is_drive(source):
    """True for a `drive:` source or a path under /content/drive."""
    text = str(source)
    return text.startswith("drive:") or text.startswith(DRIVE_ROOT)


def fetch(source, folder, token=None, allow_patterns=None, progress=True):
    """Make `source` (see io.locations.locate) a local path in `folder`, downloading it if remote (a Drive
    source inside Colab mounts Drive first)."""
    if is_drive(source) and "google.colab" in sys.modules and not os.path.isdir(os.path.join(DRIVE_ROOT, "MyDrive")):
        mount_drive()
    location = locate(source, token)
    folder = Path(folder)
    if isinstance(location, LocalLocation):
        if is_drive(location.path):
            return from_drive(location.path, folder, progress)
        if not location.exists():
            raise SourceError(f"{location.display}: {missing(location)}")
        return location.path
    if isinstance(location, UrlLocation):
        path = download_url(location.url, folder, progress=progress, credential=location.credential)
        if path.name.endswith(".index.json"):  # a sharded checkpoint: its shards sit next to the index
            for shard in _shard_names(path):
                download_url(location.sibling(shard).url, folder, progress=progress, credential=location.credential)
        return path
    return _from_hub(location, folder, allow_patterns)


def _shard_names(index_path):
    from .checkpoint import _read_weight_map

    return list(dict.fromkeys(_read_weight_map(LocalLocation(index_path))[0].values()))


def _from_hub(location: HubLocation, folder, allow_patterns):
    from huggingface_hub import errors as hub_errors  # noqa: PLC0415
    from huggingface_hub import hf_hub_download, snapshot_download  # noqa: PLC0415

    repo = location.repo
    target = folder / repo.repo_id.replace("/", "__")
    files, folders = repo.tree()
    if location.path in files:
        needed = files[location.path]
    else:
        prefix = location.path + "/" if location.path else ""
        allow_patterns = allow_patterns or ([prefix + "*"] if prefix else None)
        needed = sum(size for path, size in files.items() if path.startswith(prefix))
    check_disk(folder, needed, location.display)
    try:
        if location.path in files:
            return Path(hf_hub_download(repo.repo_id, location.path, revision=repo.commit, token=repo.token,
                                        endpoint=repo.endpoint, local_dir=target))
        path = snapshot_download(repo.repo_id, revision=repo.commit, token=repo.token, endpoint=repo.endpoint,
                                 allow_patterns=allow_patterns, local_dir=target)
        return Path(path) / location.path
    except hub_errors.EntryNotFoundError:
        raise SourceError(f"{location.display}: no such file in this repo") from None
    except (OSError, ValueError) as exc:
        raise SourceError(f"{location.display}: download failed ({str(exc).splitlines()[0][:200]})") from None
