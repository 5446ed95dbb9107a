"""A writer lock on a folder: a file created with `O_EXCL`, naming its holder (host, pid, time).

Shared by the sharded preference bank (`preference/bank_shards.py`, `BankLockedError`) and the latent cache's
shard claims (`data/latent_cache.py`), so neither package imports the other for it. A lock left by a dead process of
this host is removed and taken; any other held lock is refused with the caller's error.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers.utils import logging


logger = logging.get_logger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def writer_lock(
    directory: Path,
    name: str,
    error: type[OSError] = OSError,
    what: str = "Another writer holds this folder",
) -> Iterator[None]:
    """Hold `directory/name` (created with `O_EXCL`) while writing; a held lock is an `error`.

    Also how one process claims one shard of a split (`align_users(..., bank_directory=..., shard_index=...)`,
    `LatentCache.encode_pool(..., shard_index=...)`): a second process given the same shard is refused."""
    lock = directory / name
    host = socket.gethostname()
    for attempt in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            stale = holder.get("host") == host and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"])
            if stale and attempt == 0:
                logger.warning(f"Removing the stale writer lock {lock} of process {holder['pid']}, which is gone.")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)
                continue
            raise error(
                f"{what} at {directory} ({lock} exists: process "
                f"{holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}). Wait for "
                f"it to finish; if no such process is running, delete {lock}."
            ) from None
        break
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(
                {"host": host, "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, handle
            )
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)


def lock_is_live(lock: Path) -> bool:
    """Whether `lock` is held: it exists and its holder is not a dead process of this host."""
    if not lock.exists():
        return False
    holder = _read_lock(lock)
    dead = holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int)
    return not (dead and not _pid_alive(holder["pid"]))


def _read_lock(lock: Path) -> dict[str, Any]:
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


__all__ = ["lock_is_live", "writer_lock"]
