"""Crash-safe artefacts: files and whole folders become visible only when complete, and are checked when read.

One mechanism for every artefact (backbone, preference embedding, bank, latent cache, pool): [`atomic_directory`].

Invariant (kill -9 at any instant, one writer at a time per target thanks to a file lock):
    `target` is either absent, the complete old version or the complete new version. It is absent only between the
    two renames of the swap, and then the complete new version is at the sibling `.prefalign-<name>.<tx>.new` (and the
    old one at `.prefalign-<name>.<tx>.old`): [`resolve_directory`] renames the `.new` into place (or reads it where it
    may not write), so a reader still sees old or new, never a mix.

The write sequence under the lock `.prefalign-<name>.lock` (in the parent folder):
    1. recover: finish an interrupted swap, delete every leftover (`.tmp` half-written folders, a `.new` that never
       got swapped in, `.old` / `.del` previous versions);
    2. write the new version into `.prefalign-<name>.<tx>.tmp`, fsync every file and folder;
    3. rename it to `.new` (it is complete from now on), hard-link into it the entries of the target that the new
       version keeps (files the artefact does not own, such as a checkpoint folder or a tokenizer saved beside it,
       and a bank's users saved by another process);
    4. rename target -> `.old`, `.new` -> target, fsync the parent;
    5. rename `.old` -> `.del` and delete it.
Concurrent readers of our loaders re-read when the folder they read was swapped meanwhile ([`read_consistent`]).

Tensors are saved with a sha256 of their content in the safetensors metadata; [`load_tensors`] checks it and that
every floating-point value is finite, and names the file when either fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from filelock import FileLock


try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.utils import logging


logger = logging.get_logger(__name__)

INTERNAL_PREFIX = ".prefalign-"
CHECKSUM_KEY = "prefalign_sha256"
_CARRIED_LIST = f"{INTERNAL_PREFIX}carried.json"  # entries moved from the target into a `.new` (never deleted)
LOCK_TIMEOUT_S = 600.0

T = TypeVar("T")


class IntegrityError(OSError):
    """A saved file does not match the checksum recorded when it was saved, or holds non-finite values."""


# ----------------------------------------------------------------------
# fsync helpers
# ----------------------------------------------------------------------
# Staging folders of the `atomic_directory` blocks open in this thread. Files written inside one need no fsync of
# their own: the whole staging tree is synced before it becomes visible (under a bank of thousands of users, per-file
# fsyncs were most of a save).
_STAGING = threading.local()
# Above this many entries, a staged tree is flushed with one sync() instead of an fsync per file and folder.
_SYNC_ALL_ENTRIES = 64


def _staged(path: Path) -> bool:
    text = os.fspath(path)
    return any(text == root or text.startswith(root + os.sep) for root in getattr(_STAGING, "roots", ()))


def _fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's entry list); a no-op where the OS refuses (Windows folders), and for
    paths inside a staging folder, which is synced whole before it is swapped in."""
    if _staged(path):
        return
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Make every file and folder under `root` durable: one fsync each, or, for a large tree where the OS has it,
    one `sync()` (it flushes all file systems and waits for them, hundreds of times faster than thousands of fsyncs)."""
    entries = [(Path(folder), files) for folder, _, files in os.walk(root)]
    if hasattr(os, "sync") and sum(1 + len(files) for _, files in entries) > _SYNC_ALL_ENTRIES and not _staged(root):
        os.sync()
        return
    for folder, files in entries:
        for name in files:
            _fsync_path(folder / name)
        _fsync_path(folder)


# ----------------------------------------------------------------------
# Single files
# ----------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; fsync it and rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{INTERNAL_PREFIX}{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync_path(tmp_path)
        os.replace(tmp_path, path)
        _fsync_path(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write `obj` as indented, key-sorted JSON (the format PEFT and transformers use)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (independent of the file layout)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_tensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Save tensors as safetensors with their content checksum in the metadata; shared storage is copied apart."""
    tensors = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in tensors.items()}
    metadata = {"format": "pt", **(metadata or {}), CHECKSUM_KEY: tensors_digest(tensors)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_tensors(path: str | os.PathLike, check_finite: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, verified: the recorded checksum (files saved by this library)
    must match and every floating-point value must be finite. Every failure is an `OSError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Expected a safetensors weights file at {path}, but there is none.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as err:  # safetensors raises its own SafetensorError for bad headers / truncation
        raise OSError(
            f"Could not read the safetensors file {path}: {err}. The file is corrupt or truncated; "
            "save the model again or re-download it."
        ) from err
    expected = metadata.get(CHECKSUM_KEY)
    if expected is not None and tensors_digest(tensors) != expected:
        raise IntegrityError(
            f"The safetensors file {path} does not match the checksum recorded when it was saved "
            f"({expected[:12]}...): its content was altered or damaged. Save it again or re-download it."
        )
    if check_finite:
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise IntegrityError(
                    f"The safetensors file {path} holds non-finite values (NaN or inf) in tensor {name!r}; "
                    "the weights are unusable. Retrain or re-download them."
                )
    return tensors, metadata


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a verified safetensors file (see [`read_tensors`])."""
    return read_tensors(path)[0]


# ----------------------------------------------------------------------
# Whole folders
# ----------------------------------------------------------------------
def _siblings(target: Path, suffix: str) -> list[Path]:
    """Our leftovers of `target` with that suffix (`.tmp`, `.new`, `.old`), newest first."""
    if not target.parent.is_dir():
        return []
    pattern = re.compile(re.escape(f"{INTERNAL_PREFIX}{target.name}.") + r"[0-9a-f]{12}" + re.escape(suffix))
    found = [p for p in target.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


@contextlib.contextmanager
def _lock(target: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Exclusive lock on `target` between processes, via `.prefalign-<name>.lock` in its parent.

    On POSIX the lock file is removed on release (lock, then check the path still names the locked inode, so a
    waiter never holds a lock on an unlinked file): no lock files pile up beside artefacts. Elsewhere: `filelock`.
    """
    lock_path = _lock_file(target)
    if fcntl is None:
        with FileLock(str(lock_path), timeout=timeout):
            yield
        return
    deadline = time.monotonic() + timeout
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() > deadline:
                raise TimeoutError(f"Another process has held the lock {lock_path} for over {timeout:.0f}s.") from None
            time.sleep(0.005)
            continue
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder before us removed that file: lock the new one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)  # closing releases the lock


def _delete(path: Path) -> None:
    """Rename aside first, so that a half-deleted folder never carries a name a reader would use."""
    doomed = path.with_name(f"{INTERNAL_PREFIX}{uuid.uuid4().hex}.del")
    try:
        os.rename(path, doomed)
    except OSError:
        doomed = path
    shutil.rmtree(doomed, ignore_errors=True)


def _recover_locked(target: Path) -> None:
    """Bring `target` back to a complete version and delete every leftover; the caller holds the lock."""
    new, old = _siblings(target, ".new"), _siblings(target, ".old")
    if not target.exists():
        complete = new[:1] or old[:1]
        if complete:
            logger.warning(f"Finishing an interrupted save of {target} (from {complete[0].name}).")
            os.rename(complete[0], target)
            _fsync_path(target.parent)
    for stale in _siblings(target, ".new"):
        # A crash while entries were carried over from the target: give them back before deleting the rest.
        for entry in stale.iterdir():
            if _carried(stale, entry) and not (target / entry.name).exists():
                os.rename(entry, target / entry.name)
        _delete(stale)
    for suffix in (".tmp", ".old"):
        for stale in _siblings(target, suffix):
            _delete(stale)
    for stale in target.parent.glob(f"{INTERNAL_PREFIX}*.del"):
        shutil.rmtree(stale, ignore_errors=True)
    with contextlib.suppress(OSError):
        (target / _CARRIED_LIST).unlink()


def _carried(folder: Path, entry: Path) -> bool:
    listing = folder / _CARRIED_LIST
    if not listing.is_file():
        return False
    try:
        return entry.name in json.loads(listing.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False


def _lock_file(target: Path) -> Path:
    return target.parent / f"{INTERNAL_PREFIX}{target.name}.lock"


def resolve_directory(path: str | os.PathLike) -> Path:
    """The folder to read for `path`, after finishing what a crashed writer of it (or of a folder above it) left.

    Cheap when nothing crashed: every writer removes its lock file when done, so a lock file beside the folder
    with no writer holding it means a crash, and only then are leftovers looked for. When the folder is missing
    because a crash hit between the two renames of a swap, the complete version beside it is renamed into place
    (or, where we may not write, read where it is).
    """
    path = Path(path)
    real = Path(os.path.realpath(path))  # where writers put their lock and leftovers
    missing = None
    for candidate in [real, *real.parents]:  # the topmost missing folder is the one that was swapped
        if candidate.exists():
            break
        missing = candidate
    if missing is None:
        if not _lock_file(real).exists():
            return path
        with contextlib.suppress(OSError):  # a live writer holds it: the folder is complete, read it
            with _lock(real, timeout=0):
                _recover_locked(real)
        return path
    if not (_siblings(missing, ".new") or _siblings(missing, ".old")):
        return path
    try:
        with _lock(missing, timeout=5):
            _recover_locked(missing)
    except OSError:  # read-only folder or a held lock: read the complete version where it is
        complete = _siblings(missing, ".new")[:1] or _siblings(missing, ".old")[:1]
        return complete[0] / real.relative_to(missing) if complete else path
    return path


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _writer_active(path: Path) -> bool:
    """A lock file beside `path` or its parent: a writer is (or a crashed one was) swapping them."""
    return any(_lock_file(p).exists() for p in (path, path.parent))


def read_consistent(path: str | os.PathLike, read: Callable[[Path], T], attempts: int = 8) -> T:
    """Run `read(folder)` on the resolved `path`; if the folder was swapped by a writer meanwhile, read again.

    A read spanning a concurrent swap could mix the old and the new version, or miss a file that was just renamed
    away; comparing the folder's inode before and after (and seeing a writer's lock) tells it from a genuinely
    missing or damaged file, which fails at once.
    """
    path = Path(path)
    for attempt in range(attempts):
        folder = resolve_directory(path)
        before = _identity(folder)
        try:
            result = read(folder)
        except (OSError, ValueError):
            raced = _identity(resolve_directory(path)) != before or _writer_active(path)
            if attempt + 1 < attempts and raced:
                time.sleep(0.005 * 2**attempt)
                continue
            raise
        if _identity(folder) == before:
            return result
        time.sleep(0.005 * 2**attempt)
    return read(resolve_directory(path))


def require_directory(path: str | os.PathLike, what: str) -> Path:
    """The resolved `path` if it is a folder (re-checked while a writer swaps it), else a `FileNotFoundError`."""

    def check(folder: Path) -> Path:
        if not folder.is_dir():
            raise FileNotFoundError(f"No {what} at {path}.")
        return folder

    return read_consistent(path, check)


def _carry_over(source: Path, staged: Path, carry: Callable[[str], bool] | None) -> None:
    """Give the new version the entries of the old one it keeps, as hard links: the old version stays intact (a
    concurrent reader of it misses nothing) and nothing is copied. Where links are refused (some network or FAT
    file systems), the entries are moved instead, listed first so that recovery gives them back after a crash."""
    if carry is None or not source.is_dir():
        return
    names = [
        e.name
        for e in source.iterdir()
        if not e.name.startswith(INTERNAL_PREFIX) and not (staged / e.name).exists() and carry(e.name)
    ]
    moved = []
    for name in names:
        try:
            if (source / name).is_dir() and not (source / name).is_symlink():
                shutil.copytree(source / name, staged / name, symlinks=True, copy_function=os.link)
            else:
                os.link(source / name, staged / name, follow_symlinks=False)
        except OSError:
            shutil.rmtree(staged / name, ignore_errors=True)
            moved.append(name)
    if moved:
        listing = staged / _CARRIED_LIST
        listing.write_text(json.dumps(moved), encoding="utf-8")
        _fsync_path(listing)
        for name in moved:
            os.rename(source / name, staged / name)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, carry: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield an empty staging folder; if the block succeeds, it replaces `path` whole (see the module docstring).

    Args:
        path: the artefact folder.
        carry: entries of the existing folder that the new version does not write and that must survive the swap
            (those the artefact does not own: checkpoints, a tokenizer saved beside a backbone). `None`: none.
    """
    target = Path(os.path.realpath(path))
    if target.is_file():
        raise ValueError(f"{path} must be a directory, not a file.")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target):
        _recover_locked(target)
        tx = uuid.uuid4().hex[:12]
        staging = target.parent / f"{INTERNAL_PREFIX}{target.name}.{tx}.tmp"
        staging.mkdir()
        roots = _STAGING.__dict__.setdefault("roots", [])
        try:
            roots.append(os.fspath(staging))
            try:
                yield staging
            finally:
                roots.remove(os.fspath(staging))
            for entry in staging.iterdir():  # locks of nested writes into the private staging folder
                if entry.name.startswith(INTERNAL_PREFIX):
                    entry.unlink() if entry.is_file() else shutil.rmtree(entry)
            _fsync_tree(staging)
            ready = staging.with_suffix(".new")
            os.rename(staging, ready)
            _fsync_path(target.parent)
            _carry_over(target, ready, carry)
            cwd_is_target = target.exists() and _identity(Path(os.curdir)) == _identity(target)
            if target.exists():
                previous = ready.with_suffix(".old")
                os.rename(target, previous)
                try:
                    os.rename(ready, target)
                except OSError:
                    os.rename(previous, target)  # put the old version back; the `.new` is cleaned next time
                    raise
                _fsync_path(target.parent)
                if cwd_is_target:
                    os.chdir(target)
                _delete(previous)
            else:
                os.rename(ready, target)
                _fsync_path(target.parent)
            with contextlib.suppress(OSError):
                (target / _CARRIED_LIST).unlink()
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def locked_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the writer lock of the folder `path` (the one [`atomic_directory`] takes) while replacing parts of it in
    place, e.g. one user of a bank: no whole-folder swap can happen meanwhile. An interrupted swap of the folder is
    finished first. Yields the resolved folder; a `FileNotFoundError` if there is none."""
    target = Path(os.path.realpath(path))
    with _lock(target):
        _recover_locked(target)
        if not target.is_dir():
            raise FileNotFoundError(f"No folder at {path}.")
        yield target
