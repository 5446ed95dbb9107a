"""Pushing folders to and pulling them from the Hub with huggingface_hub's client (tokens, revisions, offline)."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ..utils.paths import validate_relative_path
from ..utils.serialization import INTERNAL_PREFIX, resolve_directory


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's connection errors (huggingface_hub talks through httpx, or its fork httpx2)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        try:
            imported = __import__(module)
        except ImportError:
            continue
        error = getattr(imported, "HTTPError", None)
        if isinstance(error, type) and issubclass(error, BaseException):
            found.append(error)
    return tuple(found)


_TransportError = _transport_errors()

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?")


def _network_error(what: str, repo_id: str, err: Exception) -> OSError:
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, HfHubHTTPError):  # the Hub answered, with an error status
        return OSError(f"The Hub refused {what} {repo_id!r}: {first}. Check the repo id, your token and its rights.")
    return OSError(f"Could not reach the Hub for {what} {repo_id!r}: {first}. Check your network and token.")


def push_folder(
    write: Callable[[Path], None],
    repo_id: str,
    *,
    path_in_repo: str | None = None,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload with hf-prefalign",
    create_pr: bool = False,
    delete_patterns: list[str] | None = None,
    endpoint: str | None = None,
) -> str:
    """Create `repo_id` if needed, let `write(folder)` fill a temporary folder, upload it in one commit
    (remote files matching `delete_patterns` that the folder does not hold are deleted in the same commit).

    Returns the commit URL.
    """
    if path_in_repo is not None:
        path_in_repo = validate_relative_path(path_in_repo, "path_in_repo")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "upload"  # a sub-folder: the writers' lock files stay outside what is uploaded
            folder.mkdir()
            write(folder)
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                path_in_repo=path_in_repo,
                commit_message=commit_message,
                revision=revision,
                create_pr=create_pr,
                delete_patterns=delete_patterns,
                ignore_patterns=[f"{INTERNAL_PREFIX}*", f"**/{INTERNAL_PREFIX}*"],
            )
    except HFValidationError as err:
        raise ValueError(f"Invalid Hub repo id {repo_id!r}: {err}") from err
    except (HfHubHTTPError, *_TransportError) as err:
        raise _network_error("pushing to", repo_id, err) from err
    return str(commit)


def pull_folder(
    repo_id: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    what: str = "repo",
) -> Path:
    """Download a repo snapshot (only `subfolder/*` when given) and return the local folder to read.

    Honours `HF_HUB_OFFLINE` (cache only); `force_download` downloads again what the cache holds. Raises an
    `OSError` naming the repo for every Hub-side miss.
    `subfolder` must stay inside the repo (no `..`, no absolute path): it is checked before anything is read.
    A `repo_id` that is a local path is read from disk (finishing an interrupted save of it when needed).
    """
    if subfolder is not None:
        subfolder = validate_relative_path(subfolder, "subfolder")
    local = resolve_directory(Path(str(repo_id)))
    if local.is_dir():
        folder = local / subfolder if subfolder else local
        if folder.is_dir():
            return folder
    if not isinstance(repo_id, str) or not _HUB_ID.fullmatch(repo_id) or Path(repo_id).exists():
        raise FileNotFoundError(
            f"No {what} at {repo_id}{'/' + subfolder if subfolder else ''}: no such local folder, and it is not a "
            "Hub repo id of the form 'owner/name'."
        )
    patterns = [f"{subfolder}/*"] if subfolder else None
    try:
        root = snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            allow_patterns=patterns,
            force_download=force_download,
            local_files_only=local_files_only or hub_constants.HF_HUB_OFFLINE,
        )
    except RepositoryNotFoundError as err:
        raise OSError(f"{what} {repo_id!r} was not found on the Hub (or you lack access to it).") from err
    except RevisionNotFoundError as err:
        raise OSError(f"Revision {revision!r} of {what} {repo_id!r} does not exist.") from err
    except (EntryNotFoundError, LocalEntryNotFoundError) as err:
        raise OSError(f"Could not get {what} {repo_id!r} (revision {revision!r}): {err}") from err
    except HFValidationError as err:
        raise ValueError(f"Invalid Hub repo id {repo_id!r}: {err}") from err
    except (HfHubHTTPError, *_TransportError) as err:
        raise _network_error("downloading", repo_id, err) from err
    folder = Path(root) / subfolder if subfolder else Path(root)
    if not folder.resolve().is_relative_to(Path(root).resolve()):  # a symlink planted in the snapshot
        raise ValueError(f"{what} {repo_id!r}: subfolder {subfolder!r} leads outside the downloaded snapshot.")
    if not folder.is_dir() or not any(folder.iterdir()):
        raise OSError(
            f"{what} {repo_id!r} has no folder {subfolder!r}." if subfolder else f"{what} {repo_id!r} is empty."
        )
    return folder


def is_local(path: str | os.PathLike) -> bool:
    return Path(path).is_dir()


__all__ = ["is_local", "pull_folder", "push_folder"]
