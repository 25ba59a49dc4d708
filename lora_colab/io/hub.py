"""Hugging Face Hub repositories through huggingface_hub: its endpoint, auth, revision and tree APIs.

A repo is pinned to one commit when first opened in a run (`pinned_run`), so a branch that moves while
the run reads it does not mix two versions; every file URL names that commit.
"""

import contextlib
import threading
from urllib.parse import quote

from ..errors import SourceError
from .http import Credential


def endpoint():
    """The Hub's base URL (HF_ENDPOINT, read by huggingface_hub)."""
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def hub_token(token=None):
    """`token`, else huggingface_hub's: HF_TOKEN, `hf auth login`, or Colab's HF_TOKEN secret. Never printed."""
    if token:
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # a broken token file or OIDC set-up: go on without a token
        return None


_RUN = threading.local()


@contextlib.contextmanager
def pinned_run():
    """Within this block, each (repo, revision) resolves to one commit, however often it is opened."""
    outer = getattr(_RUN, "pins", None)
    if outer is None:
        _RUN.pins = {}
    try:
        yield
    finally:
        if outer is None:
            _RUN.pins = None


class HubRepo:
    """A model repo at one commit: file URLs, the file tree, and the credential for the Hub's own host."""

    def __init__(self, repo_id, revision=None, token=None):
        self.repo_id = repo_id
        self.revision = revision or "main"
        self.endpoint = endpoint()
        self.token = hub_token(token)
        self.credential = Credential(self.token, self.endpoint + "/", prefix="/", hub=True)
        self.commit = self._resolve_commit()
        self._tree = None

    @property
    def name(self):
        return self.repo_id + (f"@{self.revision}" if self.revision != "main" else "")

    def _api(self):
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self.token or False)

    def _resolve_commit(self):
        pins = getattr(_RUN, "pins", None)
        key = (self.endpoint, self.repo_id, self.revision)
        if pins is not None and key in pins:
            return pins[key]
        with _hub_errors(self.name):
            commit = self._api().repo_info(self.repo_id, revision=self.revision).sha
        if not commit:
            raise SourceError(f"{self.name}: the Hub did not say which commit {self.revision!r} is")
        if pins is not None:
            pins[key] = commit
        return commit

    def url(self, path):
        """The resolve URL of `path` at the pinned commit (hf_hub_url's form, on this run's endpoint)."""
        return f"{self.endpoint}/{self.repo_id}/resolve/{quote(self.commit, safe='')}/{quote(path)}"

    def tree(self):
        """{path: size} of every file, and the set of folders, at the pinned commit (listed once)."""
        if self._tree is None:
            files, folders = {}, {""}
            with _hub_errors(self.name):
                for entry in self._api().list_repo_tree(self.repo_id, recursive=True, revision=self.commit):
                    if hasattr(entry, "size"):
                        files[entry.path] = entry.size
                    else:
                        folders.add(entry.path)
            for path in files:
                parts = path.split("/")[:-1]
                folders.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
            self._tree = files, folders
        return self._tree


@contextlib.contextmanager
def _hub_errors(name):
    """huggingface_hub's and the network's exceptions as one-line SourceErrors."""
    from huggingface_hub import errors

    try:
        yield
    except errors.GatedRepoError:
        raise SourceError(f"{name}: a gated repo: accept its terms on the Hub and give a token with access "
                          f"(HF_TOKEN, `hf auth login`, or Colab's HF_TOKEN secret)") from None
    except errors.RevisionNotFoundError:
        raise SourceError(f"{name}: no such revision (branch, tag or commit) in this repo") from None
    except errors.RepositoryNotFoundError:
        raise SourceError(f"{name}: no such model repo, or it is private and needs a token with access "
                          f"(HF_TOKEN, `hf auth login`, or Colab's HF_TOKEN secret)") from None
    except errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        raise SourceError(f"{name}: the Hub answered HTTP {status}") from None
    except (OSError, ValueError) as exc:
        raise SourceError(f"{name}: cannot reach the Hub ({str(exc).splitlines()[0][:160] or type(exc).__name__})") from None
    except Exception as exc:  # httpx's transport errors are not OSErrors
        if type(exc).__module__.split(".")[0].startswith("httpx"):
            raise SourceError(f"{name}: cannot reach the Hub ({type(exc).__name__})") from None
        raise
