"""Splitting work across processes: a stable assignment of keys to shards, and the shard spec of this process.

A key's shard is a hash of the key, not its position, so the split does not depend on the order or the set of the
other keys: a rerun (after a crash, with more users, in another order) assigns every key to the same shard.
"""

from __future__ import annotations

import hashlib
import os


def shard_of(key: str, num_shards: int) -> int:
    """The shard (0 .. `num_shards` - 1) that `key` belongs to: sha256 of the key, modulo `num_shards`."""
    if num_shards == 1:
        return 0
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little") % num_shards


def check_shard_spec(num_shards: object, shard_index: object) -> tuple[int, int]:
    """`(num_shards, shard_index)` if they name one shard of a split (like `datasets.Dataset.shard`), else a
    `ValueError` saying what is wrong."""
    for name, value in (("num_shards", num_shards), ("shard_index", shard_index)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"`{name}` must be an integer, got {value!r}.")
    if num_shards < 1:
        raise ValueError(f"`num_shards` must be at least 1, got {num_shards}.")
    if not 0 <= shard_index < num_shards:
        raise ValueError(
            f"`shard_index` must be in 0 .. {num_shards - 1} for num_shards={num_shards}, got {shard_index}."
        )
    return num_shards, shard_index


def resolve_shard_spec(num_shards: int | None, shard_index: int | None) -> tuple[int, int]:
    """The shard of this process: the arguments if given, else the `WORLD_SIZE` / `RANK` that `accelerate launch`
    and `torchrun` set for every process they start, else `(1, 0)` (a single process does everything)."""
    if (num_shards is None) != (shard_index is None):
        raise ValueError(
            f"Give both `num_shards` and `shard_index` (got num_shards={num_shards!r}, shard_index={shard_index!r}), "
            "or neither (then a process launched with `accelerate launch` / `torchrun` uses its RANK of WORLD_SIZE)."
        )
    if num_shards is not None:
        return check_shard_spec(num_shards, shard_index)
    world, rank = os.environ.get("WORLD_SIZE"), os.environ.get("RANK")
    if world in (None, "1") and rank in (None, "0"):
        return 1, 0
    try:
        if world is None or rank is None:
            raise ValueError("a launcher sets both")
        return check_shard_spec(int(world), int(rank))
    except ValueError as err:
        raise ValueError(
            f"The launcher's WORLD_SIZE={world!r} / RANK={rank!r} do not name one process of a run: {err}"
        ) from None


def shard_tag(num_shards: int, shard_index: int) -> str:
    """`"00001-of-00004"`: how files and locks of one shard are named."""
    return f"{shard_index:05d}-of-{num_shards:05d}"


__all__ = ["check_shard_spec", "resolve_shard_spec", "shard_of", "shard_tag"]
