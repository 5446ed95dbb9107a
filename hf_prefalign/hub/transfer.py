"""Pushing folders to and pulling them from the Hub with huggingface_hub's client (tokens, revisions, offline)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


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
    api = HfApi(endpoint=endpoint, token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write(folder)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            path_in_repo=path_in_repo,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
            delete_patterns=delete_patterns,
        )
    return str(commit)


def pull_folder(
    repo_id: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    what: str = "repo",
) -> Path:
    """Download a repo snapshot (only `subfolder/*` when given) and return the local folder to read.

    Honours `HF_HUB_OFFLINE` (cache only). Raises an `OSError` naming the repo for every Hub-side miss.
    """
    patterns = [f"{subfolder.strip('/')}/*"] if subfolder else None
    try:
        root = snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            allow_patterns=patterns,
            local_files_only=local_files_only or hub_constants.HF_HUB_OFFLINE,
        )
    except RepositoryNotFoundError as err:
        raise OSError(f"{what} {repo_id!r} was not found on the Hub (or you lack access to it).") from err
    except RevisionNotFoundError as err:
        raise OSError(f"Revision {revision!r} of {what} {repo_id!r} does not exist.") from err
    except (EntryNotFoundError, LocalEntryNotFoundError) as err:
        raise OSError(f"Could not get {what} {repo_id!r} (revision {revision!r}): {err}") from err
    folder = Path(root) / subfolder if subfolder else Path(root)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise OSError(
            f"{what} {repo_id!r} has no folder {subfolder!r}." if subfolder else f"{what} {repo_id!r} is empty."
        )
    return folder


def is_local(path: str | os.PathLike) -> bool:
    return Path(path).is_dir()


__all__ = ["is_local", "pull_folder", "push_folder"]
