"""PreferenceBank: many users' preference embeddings by id, attached to one backbone."""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch

from ..hub.transfer import push_folder
from ..utils.paths import PREFERENCE_ID_PATTERN as _VALID_ID
from ..utils.paths import validate_preference_id
from ..utils.serialization import (
    atomic_directory,
    locked_directory,
    read_consistent,
    require_directory,
    resolve_directory,
    write_json_atomic,
)
from .bank_shards import (
    DEFAULT_USERS_PER_SHARD,
    SHARDED_LAYOUT,
    BankLockedError,
    ShardRow,
    check_shard_files,
    check_sharded_index,
    index_ids,
    is_sharded_index,
    new_index,
    next_shard_number,
    read_row,
    remove_orphans,
    shard_name,
    write_index,
    write_shard,
    writer_lock,
)
from .embedding import PreferenceEmbedding
from .personalisation import normalize_mix_weights


BANK_INDEX = "bank.json"
# What a row asks for: one user, a mix of users {id: weight}, or `None` (the neutral z = 0).
PreferenceSpec = str | Mapping[str, float] | None
BankLayout = Literal["folders", "sharded"]
_LAYOUTS = ("folders", SHARDED_LAYOUT)


class PreferenceBank:
    """Users' [`PreferenceEmbedding`]s by preference id, checked against one backbone.

    Embeddings registered from a directory load lazily, on first use, so a bank of thousands of users opens
    instantly. Reads and writes are guarded by a lock, so generation threads can share a bank.

    Args:
        fingerprint (`str` or `Callable[[], str]`): the backbone's [`~PrefAlignForCausalLM.fingerprint`], or a
            function returning it (then computed at each registration, so the bank follows a backbone trained after
            the bank was created).
        latent_dim (`int`), feature_dim (`int`): the backbone's latent size and prompt feature size.
    """

    def __init__(self, fingerprint: str | Callable[[], str], latent_dim: int, feature_dim: int):
        self._fingerprint = fingerprint
        self.latent_dim = latent_dim
        self.feature_dim = feature_dim
        self._loaded: dict[str, PreferenceEmbedding] = {}
        # Registered, not read yet: a user's folder, or its row in a shard of a sharded bank.
        self._lazy: dict[str, Path | ShardRow] = {}
        # Where a loaded user of a sharded bank was read from: saving into that bank again skips it (shards are
        # immutable, so the row still holds exactly this embedding). Cleared when the user is replaced.
        self._origin: dict[str, ShardRow] = {}
        self._lock = threading.RLock()

    @property
    def fingerprint(self) -> str:
        return self._fingerprint() if callable(self._fingerprint) else self._fingerprint

    # ------------------------------------------------------------------
    # Registry
    # ------------------------------------------------------------------
    @staticmethod
    def _check_id(preference_id: str) -> None:
        validate_preference_id(preference_id)

    def add(self, preference_id: str, embedding: PreferenceEmbedding, overwrite: bool = False) -> None:
        """Register `embedding` under `preference_id` after checking it belongs to this backbone."""
        self._check_id(preference_id)
        embedding.check_compatible(self.fingerprint, self.latent_dim, self.feature_dim, name=preference_id)
        with self._lock:
            if preference_id in self and not overwrite:
                raise ValueError(f"Preference id {preference_id!r} is already registered; pass overwrite=True.")
            self._lazy.pop(preference_id, None)
            self._origin.pop(preference_id, None)
            self._loaded[preference_id] = embedding.eval()

    def add_from_directory(self, preference_id: str, path: str | os.PathLike, lazy: bool = True) -> None:
        """Register the embedding saved at `path`; with `lazy`, it is read (and checked) on first use."""
        self._check_id(preference_id)
        path = Path(path)
        require_directory(path, "preference embedding")
        if not lazy:
            self.add(preference_id, PreferenceEmbedding.from_pretrained(path), overwrite=True)
            return
        with self._lock:
            self._loaded.pop(preference_id, None)
            self._origin.pop(preference_id, None)
            self._lazy[preference_id] = path

    def remove(self, preference_id: str) -> None:
        with self._lock:
            self._origin.pop(preference_id, None)
            if self._loaded.pop(preference_id, None) is None and self._lazy.pop(preference_id, None) is None:
                raise KeyError(self._unknown(preference_id))

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(set(self._loaded) | set(self._lazy))

    def __contains__(self, preference_id: object) -> bool:
        with self._lock:
            return preference_id in self._loaded or preference_id in self._lazy

    def __len__(self) -> int:
        with self._lock:
            return len(self._loaded) + len(self._lazy)  # disjoint: a user is loaded or lazy, never both

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids())

    def _unknown(self, preference_id: str) -> str:
        with self._lock:
            count = len(self)
            first = heapq.nsmallest(10, [*self._loaded, *self._lazy])  # no full sort of a million ids
        listing = ", ".join(map(repr, first)) + (f" and {count - 10} more" if count > 10 else "")
        return f"Unknown preference id {preference_id!r}; the bank holds {count} user(s): {listing or 'none'}."

    def get(self, preference_id: str) -> PreferenceEmbedding:
        """The embedding of `preference_id` (loading it now if it was registered lazily)."""
        with self._lock:
            if preference_id in self._loaded:
                return self._loaded[preference_id]
            if preference_id not in self._lazy:
                raise KeyError(self._unknown(preference_id))
            source = self._lazy[preference_id]
            embedding = self._read(preference_id, source)
            self._loaded[preference_id] = embedding
            del self._lazy[preference_id]
            if isinstance(source, ShardRow):
                self._origin[preference_id] = source
            return embedding

    def _read(self, preference_id: str, source: Path | ShardRow) -> PreferenceEmbedding:
        # A lazily registered user, read and checked (not registered: `get` caches it, a sharded save streams it).
        if isinstance(source, ShardRow):
            embedding = read_row(source, preference_id)  # only this user's row of the shard
        else:
            embedding = PreferenceEmbedding.from_pretrained(source)
        embedding.check_compatible(self.fingerprint, self.latent_dim, self.feature_dim, name=preference_id)
        return embedding.eval()

    def _peek(self, preference_id: str) -> PreferenceEmbedding:
        # The embedding of a user without caching a lazy one: a sharded save of a million users streams them.
        with self._lock:
            if preference_id in self._loaded:
                return self._loaded[preference_id]
            if preference_id not in self._lazy:
                raise KeyError(self._unknown(preference_id))
            return self._read(preference_id, self._lazy[preference_id])

    def _stored_at(self, preference_id: str) -> ShardRow | None:
        # The shard row that holds exactly this user's current embedding, if any.
        with self._lock:
            source = self._lazy.get(preference_id)
            return source if isinstance(source, ShardRow) else self._origin.get(preference_id)

    # ------------------------------------------------------------------
    # Latents for a batch
    # ------------------------------------------------------------------
    def mixture_weights(self, preference_id: PreferenceSpec) -> dict[str, float]:
        """The users a row's `preference_id` stands for, with weights summing to 1 (`{}` for `None`).

        A mapping `{"alice": 0.7, "bob": 0.3}` mixes users; its weights must be finite, non-negative and not all
        zero, and every user must be registered (a `KeyError` names an unknown one). Users of weight 0 are dropped.
        """
        if preference_id is None:
            return {}
        if isinstance(preference_id, str):
            if preference_id not in self:
                raise KeyError(self._unknown(preference_id))
            return {preference_id: 1.0}
        if not isinstance(preference_id, Mapping):
            raise TypeError(
                "A preference id must be a string, a mapping {id: weight} or None, got "
                f"{type(preference_id).__name__}: {preference_id!r:.80}"
            )
        for user in preference_id:
            if not isinstance(user, str):
                raise TypeError(f"The users of a mix are named by string ids, got {type(user).__name__}: {user!r}.")
            if user not in self:
                raise KeyError(self._unknown(user))
        weights = normalize_mix_weights([(repr(user), weight) for user, weight in preference_id.items()])
        return {user: weight for user, weight in zip(preference_id, weights, strict=True) if weight > 0}

    @torch.no_grad()
    def latents(
        self,
        preference_ids: Sequence[PreferenceSpec],
        features: torch.Tensor,
        sample: bool = False,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """z for each row: the mean of its user's prior (or a sample); `None` rows get z = 0 (neutral).

        A row given as a mapping `{id: weight}` gets the convex combination of those users' z (weights normalised
        to sum to 1; when sampling, of one draw per user).

        Args:
            preference_ids (`Sequence[str | Mapping[str, float] | None]`): one id, mix or `None` per row.
            features (`torch.Tensor` of shape `(B, F)`): prompt features of each row.

        Returns:
            `torch.Tensor` of shape `(B, Z)`, fp32.
        """
        if len(preference_ids) != features.shape[0]:
            raise ValueError(f"Got {len(preference_ids)} preference ids for a batch of {features.shape[0]} rows.")
        mixes = [self.mixture_weights(pid) for pid in preference_ids]  # checked before any user is loaded
        latents = torch.zeros(features.shape[0], self.latent_dim, device=features.device)
        for preference_id in dict.fromkeys(user for mix in mixes for user in mix):
            rows = [i for i, mix in enumerate(mixes) if preference_id in mix]
            weights = torch.tensor([mixes[i][preference_id] for i in rows], device=features.device)  # (b,)
            embedding = self.get(preference_id).to(features.device)
            user_latents = embedding.latents(features[rows], sample=sample, temperature=temperature)  # (b, Z)
            latents[rows] += weights.unsqueeze(-1) * user_latents  # a single user has weight 1: its z exactly
        return latents

    # ------------------------------------------------------------------
    # Saving and loading
    # ------------------------------------------------------------------
    def save(
        self,
        directory: str | os.PathLike,
        merge: bool = True,
        *,
        layout: BankLayout | None = None,
        users_per_shard: int = DEFAULT_USERS_PER_SHARD,
    ) -> None:
        """Write every user plus a `bank.json` index, one folder per user (`layout="folders"`) or stacked in
        safetensors shards (`layout="sharded"`, for banks of many thousands of users).

        Folders: `directory/<id>/` per user; the bank folder is replaced whole ([`atomic_directory`]) under a file
        lock: after a kill -9 a reader finds the old bank or the new one, and two processes saving into one folder
        lose no user (users already on disk are copied).

        Sharded (see `hf_prefalign/preference/bank_shards.py`): `shard-NNNNN.safetensors` files of `users_per_shard` users each.
        Saving into an existing sharded bank appends: only users the bank does not already hold as they are
        (new users, replaced ones) go into new shards, existing shards are never rewritten, and `bank.json` is
        replaced atomically last. A second process writing the same bank meanwhile is refused ([`BankLockedError`]).

        Args:
            merge (`bool`, *optional*, defaults to `True`): keep the users already saved in `directory` (for this
                backbone) that this bank does not hold; with `False`, `directory` ends up with exactly this bank.
            layout (`str`, *optional*): `"folders"` or `"sharded"`; by default the layout of the bank already at
                `directory`, folders for a new one. A bank is not converted in place: save a loaded bank into a new
                directory to change its layout (or pass `merge=False`).
            users_per_shard (`int`, *optional*, defaults to 4096): users per shard file (sharded layout).
        """
        directory = Path(directory)
        previous = self._existing_index(directory)
        existing = None if previous is None else SHARDED_LAYOUT if is_sharded_index(previous) else "folders"
        if layout is None:
            layout = existing or "folders"
        if layout not in _LAYOUTS:
            raise ValueError(f"Unknown bank layout {layout!r}; expected one of {_LAYOUTS}.")
        if existing is not None and existing != layout and (merge or layout == SHARDED_LAYOUT):
            raise ValueError(
                f"The bank at {directory} uses the {existing!r} layout, not {layout!r}; a bank is not converted in "
                f"place. Save into a new directory (`bank.load({str(directory)!r}); bank.save(new_directory, "
                f"layout={layout!r})`)"
                + (", or pass merge=False to replace it with exactly this bank." if layout == "folders" else ".")
            )
        if layout == SHARDED_LAYOUT:
            self._save_sharded(directory, self.ids(), merge=merge, users_per_shard=users_per_shard)
            return
        self._save_folders(directory, merge)

    @staticmethod
    def _existing_index(directory: Path) -> dict | None:
        if not (directory / BANK_INDEX).is_file():
            return None
        with contextlib.suppress(OSError, ValueError):
            return read_bank_index(directory)
        return None

    def _save_folders(self, directory: Path, merge: bool) -> None:
        ids = self.ids()
        embeddings = {preference_id: self.get(preference_id) for preference_id in ids}  # read before the swap
        kept: list[str] = []

        def carry(name: str) -> bool:
            return name in kept

        with atomic_directory(directory, carry=carry) as tmp:
            previous = _read_index(directory) if (directory / BANK_INDEX).is_file() else None
            if previous is not None and is_sharded_index(previous):
                previous = None  # merge=False over a sharded bank: replaced whole, shards included
            if merge and previous is not None and previous.get("fingerprint") == self.fingerprint:
                kept.extend(
                    pid
                    for pid in previous.get("preference_ids", [])
                    if isinstance(pid, str)
                    and _VALID_ID.fullmatch(pid)
                    and pid not in embeddings
                    and (directory / pid).is_dir()
                )
            for preference_id, embedding in embeddings.items():
                # Straight into the staged bank folder, which becomes visible whole: a nested atomic save per user
                # would lock, scan the ever-growing staging folder and fsync each file (quadratic in the users).
                embedding._write_files(tmp / preference_id)
            write_json_atomic(
                {
                    "fingerprint": self.fingerprint,
                    "latent_dim": self.latent_dim,
                    "feature_dim": self.feature_dim,
                    "preference_ids": sorted([*ids, *kept]),
                },
                tmp / BANK_INDEX,
            )

    def _save_sharded(self, directory: Path, ids: list[str], merge: bool, users_per_shard: int) -> None:
        # Append `ids` to the sharded bank at `directory` (created if needed) under its writer lock: new shards
        # first (fsynced), `bank.json` replaced atomically last, retired shards deleted after.
        if not isinstance(users_per_shard, int) or users_per_shard < 1:
            raise ValueError(f"users_per_shard must be a positive integer, got {users_per_shard!r}.")
        if directory.is_file():
            raise ValueError(f"{directory} must be a directory, not a file.")
        directory.mkdir(parents=True, exist_ok=True)
        with writer_lock(directory), locked_directory(directory) as folder:
            index = _read_index(folder) if (folder / BANK_INDEX).is_file() else None
            if index is not None and not is_sharded_index(index):
                raise ValueError(
                    f"The bank at {directory} uses the 'folders' layout; it is not appended to as shards."
                )
            shards = [] if index is None else check_sharded_index(index, folder / BANK_INDEX)
            if index is not None and index.get("fingerprint") != self.fingerprint:
                if merge:
                    raise ValueError(
                        f"The bank at {directory} was built for another backbone (fingerprint "
                        f"{str(index.get('fingerprint'))[:12]}, this bank's is {self.fingerprint[:12]}); pass "
                        "merge=False to replace it, or save into another directory."
                    )
                shards = []
            if index is not None and (index.get("latent_dim"), index.get("feature_dim")) != (
                self.latent_dim,
                self.feature_dim,
            ):
                if merge:
                    raise ValueError(
                        f"The bank at {directory} has latent_dim={index.get('latent_dim')}, feature_dim="
                        f"{index.get('feature_dim')}, this bank {self.latent_dim} and {self.feature_dim}."
                    )
                shards = []
            remove_orphans(folder, index)
            shards = [{**shard, "ids": list(shard["ids"])} for shard in shards]
            location = {pid: (i, row) for i, shard in enumerate(shards) for row, pid in enumerate(shard["ids"]) if pid}
            real = Path(os.path.realpath(folder))
            wanted = set(ids)
            to_write: list[str] = []
            for preference_id in ids:
                stored = self._stored_at(preference_id)
                here = location.get(preference_id)
                if (
                    stored is not None
                    and here is not None
                    and Path(os.path.realpath(stored.directory)) == real
                    and shards[here[0]]["file"] == stored.file
                    and here[1] == stored.row
                ):
                    continue  # already in this bank, in an immutable shard: nothing to write
                to_write.append(preference_id)
            rewritten = set(to_write)
            for preference_id, (i, row) in location.items():
                superseded = preference_id in rewritten
                if superseded or (not merge and preference_id not in wanted):
                    shards[i]["ids"][row] = None
            number = next_shard_number(folder, index)
            new_rows: dict[str, ShardRow] = {}
            for start in range(0, len(to_write), users_per_shard):
                chunk = {pid: self._peek(pid) for pid in to_write[start : start + users_per_shard]}
                by_rank: dict[int, list[str]] = {}
                for pid, embedding in chunk.items():
                    by_rank.setdefault(embedding.config.rank, []).append(pid)
                for group in by_rank.values():
                    entry = write_shard(folder / shard_name(number), [chunk[pid] for pid in group])
                    shards.append({**entry, "ids": group})
                    new_rows.update(
                        {pid: ShardRow(folder, entry["file"], row, entry["size"]) for row, pid in enumerate(group)}
                    )
                    number += 1
            retired = [shard["file"] for shard in shards if not any(pid is not None for pid in shard["ids"])]
            kept = [shard for shard in shards if shard["file"] not in retired]
            write_index(
                new_index(self.fingerprint, self.latent_dim, self.feature_dim, kept, number), folder / BANK_INDEX
            )
            for name in retired:  # no index names them any more
                with contextlib.suppress(FileNotFoundError):
                    (folder / name).unlink()
        with self._lock:  # later saves into this bank skip the users just written (unless they change)
            for preference_id, row in new_rows.items():
                if preference_id in self._loaded:
                    self._origin[preference_id] = row

    def save_user(self, directory: str | os.PathLike, preference_id: str) -> None:
        """Write one registered user into the bank saved at `directory`, in place, leaving every other user alone.

        The user's folder is replaced whole ([`atomic_directory`]) and `bank.json` gains its id if it is new, both
        under the bank folder's lock (so no [`~PreferenceBank.save`] swaps the folder meanwhile); no other user's
        files are read, rewritten or re-linked, so the cost does not grow with the bank. This is how
        [`update_user`] stores an online update.
        """
        directory = Path(directory)
        self._check_id(preference_id)
        if is_sharded_index(read_bank_index(directory)):
            self._check_saved_backbone(directory, read_bank_index(directory))
            self._origin.pop(preference_id, None)  # written again, even if unchanged
            self._save_sharded(directory, [preference_id], merge=True, users_per_shard=1)
            return
        embedding = self.get(preference_id)
        with locked_directory(directory) as folder:
            index = _read_index(folder)
            if index.get("fingerprint") != self.fingerprint:
                raise ValueError(
                    f"The bank at {directory} was built for another backbone (fingerprint "
                    f"{str(index.get('fingerprint'))[:12]}, this bank's is {self.fingerprint[:12]})."
                )
            embedding.save_pretrained(folder / preference_id)
            ids = [pid for pid in index.get("preference_ids", []) if isinstance(pid, str)]
            if preference_id not in ids:
                write_json_atomic({**index, "preference_ids": sorted([*ids, preference_id])}, folder / BANK_INDEX)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | bool | None = None,
        private: bool | None = True,
        revision: str | None = None,
        commit_message: str = "Upload preference bank",
        layout: BankLayout = "folders",
    ) -> str:
        """Upload every user as a folder `<id>/` of one repo (plus `bank.json`), in one commit.

        With `layout="sharded"` the repo holds the shards and `bank.json` instead (see [`~PreferenceBank.save`]);
        `load_preference(..., subfolder=id)` then no longer applies (download the repo and `load` it).

        One repo with a folder per user, not a repo per user: a bank of thousands of users stays one versioned object
        (one commit updates many users atomically, one revision pins them all), while
        `model.load_preference(repo_id, preference_id, subfolder=id)` still downloads a single user's files only.
        Private by default: a bank is a list of users.
        """
        return push_folder(
            lambda folder: self.save(folder, layout=layout),
            repo_id,
            token=token,
            private=private,
            revision=revision,
            commit_message=commit_message,
        )

    def _check_saved_backbone(self, directory: Path, index: dict) -> None:
        if index.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"The bank at {directory} was built for another backbone (fingerprint "
                f"{str(index.get('fingerprint'))[:12]}, this model's is {self.fingerprint[:12]})."
            )
        if is_sharded_index(index) and (index.get("latent_dim"), index.get("feature_dim")) != (
            self.latent_dim,
            self.feature_dim,
        ):
            raise ValueError(
                f"The bank at {directory} has latent_dim={index.get('latent_dim')}, feature_dim="
                f"{index.get('feature_dim')}, but the model expects {self.latent_dim} and {self.feature_dim}."
            )

    def load(self, directory: str | os.PathLike, lazy: bool = True, verify: bool = False) -> list[str]:
        """Register every user of a bank saved with [`~PreferenceBank.save`] (either layout); returns their ids.

        A sharded bank is checked when it is opened: its backbone and sizes, and that every shard it lists exists
        with the recorded size (with `verify`, also its sha256, which reads every shard); each user's row is checked
        against its own sha256 and for finite values when it is read.
        """
        directory = Path(directory)
        index = read_bank_index(directory)
        self._check_saved_backbone(directory, index)
        if is_sharded_index(index):
            return self._load_sharded(directory, index, lazy=lazy, verify=verify)
        ids = list(index.get("preference_ids", []))
        for preference_id in ids:
            self._check_id(preference_id)  # an id from a file names a folder: validate it before any read
        for preference_id in ids:
            self.add_from_directory(preference_id, directory / preference_id, lazy=lazy)
        return ids

    def _load_sharded(self, directory: Path, index: dict, lazy: bool, verify: bool) -> list[str]:
        folder = resolve_directory(directory)
        check_shard_files(folder, index["shards"], verify=verify)
        rows: dict[str, ShardRow] = {}
        for shard in index["shards"]:
            file, size = shard["file"], shard["size"]
            for row, preference_id in enumerate(shard["ids"]):
                if preference_id is None:
                    continue
                self._check_id(preference_id)  # ids from a file: validated before any use
                if preference_id in rows:
                    raise OSError(f"{folder / BANK_INDEX} lists user {preference_id!r} twice; the index is corrupt.")
                rows[preference_id] = ShardRow(folder, file, row, size)
        with self._lock:
            for preference_id, row in rows.items():
                self._loaded.pop(preference_id, None)
                self._origin.pop(preference_id, None)
                self._lazy[preference_id] = row
        if not lazy:
            for preference_id in rows:
                self.get(preference_id)
        return list(rows)


def read_bank_index(directory: str | os.PathLike) -> dict:
    """The `bank.json` of a saved bank (`fingerprint`, `latent_dim`, `feature_dim`, `preference_ids`), read
    consistently with concurrent writers; an `OSError` names a missing or damaged index.

    For a sharded bank, also `layout`, `format_version` and `shards` (each `file`, `size`, `sha256`, `rank` and
    `ids` in row order); `preference_ids` is then derived from the shards."""
    directory = Path(directory)
    index = read_consistent(directory, _read_index)
    if is_sharded_index(index):
        check_sharded_index(index, directory / BANK_INDEX)
        index["preference_ids"] = index_ids(index)
    return index


def _read_index(directory: Path) -> dict:
    index_file = directory / BANK_INDEX
    if not index_file.is_file():
        raise FileNotFoundError(f"No preference bank at {directory}: {BANK_INDEX} is missing.")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise OSError(f"{index_file} is not valid JSON ({err}); the bank index is corrupt.") from err
    if not isinstance(index, dict) or not isinstance(index.get("preference_ids", []), list):
        raise OSError(f"{index_file} is not a bank index (expected an object with a `preference_ids` list).")
    return index


__all__ = ["BANK_INDEX", "BankLockedError", "PreferenceBank", "read_bank_index"]
