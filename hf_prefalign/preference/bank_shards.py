"""The sharded layout of a [`PreferenceBank`]: users stacked in safetensors shards, one JSON index, lazy row reads.

A folder per user costs three files per user (three million for a million users). The sharded layout stores
`users_per_shard` users per file instead:

```
bank/
├── bank.json                  # the index: layout, format version, backbone, sizes, shards (file, sha256, size, ids)
├── shard-00000.safetensors    # bias (N, 2Z), down (N, F, r), up (N, r, 2Z), config_offsets (N + 1,),
├── shard-00001.safetensors    #   config_bytes (total,) uint8, row_sha256 (N, 32) uint8
└── ...
```

Row `i` of a shard is one user: its three tensors, its `PreferenceEmbeddingConfig` as JSON bytes
(`config_bytes[config_offsets[i]:config_offsets[i + 1]]`) and a sha256 of both (`row_sha256[i]`). The index lists each
shard's ids in row order (`ids[row]`, `None` for a row a later shard superseded): that is the id -> (shard, row) table.
A shard holds users of one rank (the shapes are stacked), so a write groups users by rank.

Invariants:
- shards are immutable: a write adds new shards (numbers never reused: the index keeps `next_shard`), fsyncs them,
  then replaces `bank.json` atomically (temporary file + `os.replace`); a reader, even after a kill -9 of the writer,
  reads the old index or the new one, and every shard an index names was complete before the index was;
- one writer at a time: `bank.lock`, created with `O_EXCL` (it holds the writer's host and pid); a second writer is
  refused with an error naming the file (a lock left by a dead process on this host is taken over, with a warning);
- a lookup opens the shard with `safe_open` and reads its row with `get_slice`: the shard is never loaded whole. The
  row is checked against its sha256 and for finiteness; opening a bank checks that every shard exists with the
  size the index records (`verify=True` also hashes each shard against its recorded sha256).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..utils import locking
from ..utils.serialization import INTERNAL_PREFIX, IntegrityError, atomic_path, sha256_file, write_json_atomic
from ..version import __version__
from .embedding import PreferenceEmbedding, PreferenceEmbeddingConfig


SHARDED_LAYOUT = "sharded"
SHARDED_FORMAT_VERSION = 1
WRITER_LOCK_NAME = "bank.lock"
DEFAULT_USERS_PER_SHARD = 4096
SHARD_PATTERN = re.compile(r"shard-(\d{5,9})\.safetensors")
_USER_TENSORS = ("bias", "down", "up")


class BankLockedError(OSError):
    """Another process is writing the sharded bank (its `bank.lock` exists)."""


@dataclass(frozen=True, slots=True)
class ShardRow:
    """Where one user of a sharded bank lives: `directory/file`, row `row` (what a lazy bank entry holds)."""

    directory: Path
    file: str
    row: int
    size: int

    @property
    def path(self) -> Path:
        return self.directory / self.file


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def is_sharded_index(index: dict) -> bool:
    return index.get("layout") == SHARDED_LAYOUT


# ----------------------------------------------------------------------
# Index
# ----------------------------------------------------------------------
def check_sharded_index(index: dict, index_file: Path) -> list[dict]:
    """The validated shard entries of a sharded `bank.json`; an `OSError` naming the file when it is malformed,
    a `ValueError` when it is of a newer format than this version reads."""
    version = index.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise OSError(f"{index_file} has no valid `format_version` (found {version!r}); the bank index is corrupt.")
    if version > SHARDED_FORMAT_VERSION:
        raise ValueError(
            f"{index_file} is a sharded bank of format version {version}, but this hf_prefalign {__version__} reads "
            f"up to version {SHARDED_FORMAT_VERSION}. Upgrade hf_prefalign."
        )
    shards = index.get("shards")
    if not isinstance(shards, list):
        raise OSError(f"{index_file} is not a sharded bank index (expected a `shards` list).")
    for shard in shards:
        if (
            not isinstance(shard, dict)
            or not isinstance(shard.get("file"), str)
            or not SHARD_PATTERN.fullmatch(shard["file"])
            or not isinstance(shard.get("ids"), list)
            or not isinstance(shard.get("size"), int)
            or not isinstance(shard.get("sha256"), str)
        ):
            raise OSError(
                f"{index_file} has a malformed shard entry {str(shard)[:120]!r} (expected `file` "
                "shard-NNNNN.safetensors, `size`, `sha256` and `ids`); the bank index is corrupt."
            )
    return shards


def index_ids(index: dict) -> list[str]:
    """Every live id of a sharded index, in shard and row order."""
    return [pid for shard in index["shards"] for pid in shard["ids"] if pid is not None]


def check_shard_files(directory: Path, shards: Sequence[dict], verify: bool = False) -> None:
    """Every shard the index names exists with its recorded size (and, with `verify`, its sha256)."""
    for shard in shards:
        path = directory / shard["file"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise FileNotFoundError(
                f"The sharded bank at {directory} is missing {path.name}, which its {directory.name}/bank.json "
                "lists; the bank is incomplete (copy the whole folder again, or reload if it was just rewritten)."
            ) from None
        if size != shard["size"]:
            raise IntegrityError(
                f"The shard {path} has {size} bytes but the bank index records {shard['size']}: it was truncated, "
                "damaged or replaced. Copy the bank folder again."
            )
        if verify and sha256_file(path) != shard["sha256"]:
            raise IntegrityError(
                f"The shard {path} does not match the sha256 recorded in the bank index ({shard['sha256'][:12]}...): "
                "its content was altered or damaged. Copy the bank folder again."
            )


# ----------------------------------------------------------------------
# Writer lock (the generic `O_EXCL` lock lives in utils/locking.py; the latent cache uses it too)
# ----------------------------------------------------------------------
def writer_lock(
    directory: Path,
    name: str = WRITER_LOCK_NAME,
    error: type[OSError] = BankLockedError,
    what: str = "Another writer holds the sharded bank",
) -> contextlib.AbstractContextManager[None]:
    """Hold `directory/name` while writing the bank; a held lock is a `BankLockedError` (see `utils.locking`)."""
    return locking.writer_lock(directory, name, error=error, what=what)


# ----------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------
def _row_digest(tensors: dict[str, torch.Tensor], config_bytes: bytes) -> bytes:
    # sha256 over the user's tensors (fp32, in `_USER_TENSORS` order) and its config bytes: checked on every lookup.
    digest = hashlib.sha256()
    for name in _USER_TENSORS:
        digest.update(tensors[name].detach().float().cpu().contiguous().reshape(-1).numpy().tobytes())
    digest.update(config_bytes)
    return digest.digest()


def write_shard(path: Path, embeddings: Sequence[PreferenceEmbedding]) -> dict[str, Any]:
    """Stack `embeddings` (all of one rank) into the safetensors shard `path`, atomically; returns `size`, `sha256`."""
    rank = embeddings[0].config.rank
    configs = [json.dumps(asdict(e.config), sort_keys=True).encode("utf-8") for e in embeddings]
    rows = []
    for embedding, config in zip(embeddings, configs, strict=True):
        if embedding.config.rank != rank:
            raise ValueError(f"A shard holds users of one rank; got ranks {rank} and {embedding.config.rank}.")
        params = {name: getattr(embedding, name).detach().float().cpu() for name in _USER_TENSORS}
        rows.append((params, config))
    offsets = [0]
    for config in configs:
        offsets.append(offsets[-1] + len(config))
    tensors = {
        name: torch.stack([params[name] for params, _ in rows]).contiguous()  # (N, ...) one row per user
        for name in _USER_TENSORS
    }
    tensors["config_offsets"] = torch.tensor(offsets, dtype=torch.int64)  # (N + 1,)
    tensors["config_bytes"] = torch.frombuffer(bytearray(b"".join(configs) or b"\0"), dtype=torch.uint8)  # (total,)
    tensors["row_sha256"] = torch.stack(
        [torch.frombuffer(bytearray(_row_digest(params, config)), dtype=torch.uint8) for params, config in rows]
    )  # (N, 32)
    metadata = {
        "format": "pt",
        "layout": SHARDED_LAYOUT,
        "format_version": str(SHARDED_FORMAT_VERSION),
        "rank": str(rank),
        "users": str(len(rows)),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return {"file": path.name, "size": path.stat().st_size, "sha256": sha256_file(path), "rank": rank}


def read_row(location: ShardRow, preference_id: str) -> PreferenceEmbedding:
    """One user of a shard, read through `get_slice` (only its row's bytes), checked against its row sha256."""
    path, row = location.path, location.row
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(
            f"User {preference_id!r} lives in {path}, which is missing: the sharded bank was rewritten or damaged. "
            "Load the bank again (or copy the whole folder again)."
        ) from None
    if size != location.size:
        raise IntegrityError(
            f"The shard {path} has {size} bytes but the bank index records {location.size}: it was truncated, "
            "damaged or replaced. Copy the bank folder again."
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_slice(name)[row : row + 1][0] for name in _USER_TENSORS}
            start, end = handle.get_slice("config_offsets")[row : row + 2].tolist()
            config_bytes = handle.get_slice("config_bytes")[start:end].numpy().tobytes()
            expected = handle.get_slice("row_sha256")[row : row + 1][0].numpy().tobytes()
    except Exception as err:  # safetensors raises its own SafetensorError for bad headers / truncation
        raise OSError(
            f"Could not read user {preference_id!r} (row {row}) from the shard {path}: {err}. The shard is corrupt "
            "or truncated; copy the bank folder again."
        ) from err
    if _row_digest(tensors, config_bytes) != expected:
        raise IntegrityError(
            f"User {preference_id!r} (row {row}) of the shard {path} does not match its recorded sha256: the shard "
            "was altered or damaged. Copy the bank folder again."
        )
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise IntegrityError(
                f"User {preference_id!r} (row {row}) of the shard {path} holds non-finite values (NaN or inf) in "
                f"{name!r}; the embedding is unusable. Retrain the user."
            )
    try:
        raw = json.loads(config_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OSError(
            f"The config of user {preference_id!r} (row {row}) in {path} is not valid JSON ({err})."
        ) from err
    config = PreferenceEmbeddingConfig.from_dict(raw, source=f"{path} row {row}")
    try:
        return PreferenceEmbedding._from_tensors(config, {name: t.clone() for name, t in tensors.items()})
    except ValueError as err:
        raise OSError(f"User {preference_id!r} (row {row}) of {path} does not match its config: {err}") from err


def next_shard_number(directory: Path, index: dict | None) -> int:
    """A shard number no index of this folder has used: above the index's `next_shard` and every file present."""
    numbers = [int(m.group(1)) for p in directory.iterdir() if (m := SHARD_PATTERN.fullmatch(p.name))]
    recorded = int(index.get("next_shard", 0)) if index else 0
    return max([recorded, *(n + 1 for n in numbers)])


def remove_orphans(directory: Path, index: dict | None) -> None:
    """Delete shards no index names (a writer killed before its index) and half-written temporary shards.

    Called under the writer lock, before a write: a reader only opens the shards its index names, and every index
    this folder ever had named only shards that are still listed or that the writer itself retired."""
    named = {shard["file"] for shard in (index or {}).get("shards", [])}
    for entry in directory.iterdir():
        orphan = SHARD_PATTERN.fullmatch(entry.name) and entry.name not in named
        half_written = entry.name.startswith(INTERNAL_PREFIX) and entry.name.endswith(".tmp")
        if (orphan or half_written) and entry.is_file():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()


def new_index(fingerprint: str, latent_dim: int, feature_dim: int, shards: list[dict], next_shard: int) -> dict:
    return {
        "layout": SHARDED_LAYOUT,
        "format_version": SHARDED_FORMAT_VERSION,
        "fingerprint": fingerprint,
        "latent_dim": latent_dim,
        "feature_dim": feature_dim,
        "hf_prefalign_version": __version__,
        "next_shard": next_shard,
        "shards": shards,
    }


def write_index(index: dict, path: Path) -> None:
    """Replace `bank.json` atomically (compact JSON: a million ids stay a few tens of MB)."""
    if sum(len(shard["ids"]) for shard in index["shards"]) < 1000:
        write_json_atomic(index, path)
        return
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(index, sort_keys=True, separators=(",", ":")) + "\n", encoding="utf-8")


__all__ = [
    "DEFAULT_USERS_PER_SHARD",
    "SHARDED_FORMAT_VERSION",
    "SHARDED_LAYOUT",
    "BankLockedError",
    "ShardRow",
]
