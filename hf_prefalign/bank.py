"""PreferenceBank: many users' preference embeddings by id, attached to one backbone."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from .hub.transfer import push_folder
from .personalisation import normalize_mix_weights
from .preference import PreferenceEmbedding
from .utils.paths import PREFERENCE_ID_PATTERN as _VALID_ID
from .utils.paths import validate_preference_id
from .utils.serialization import (
    atomic_directory,
    locked_directory,
    read_consistent,
    require_directory,
    write_json_atomic,
)


BANK_INDEX = "bank.json"
# What a row asks for: one user, a mix of users {id: weight}, or `None` (the neutral z = 0).
PreferenceSpec = str | Mapping[str, float] | None


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
        self._lazy: dict[str, Path] = {}
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
            self._lazy[preference_id] = path

    def remove(self, preference_id: str) -> None:
        with self._lock:
            if self._loaded.pop(preference_id, None) is None and self._lazy.pop(preference_id, None) is None:
                raise KeyError(self._unknown(preference_id))

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(set(self._loaded) | set(self._lazy))

    def __contains__(self, preference_id: object) -> bool:
        with self._lock:
            return preference_id in self._loaded or preference_id in self._lazy

    def __len__(self) -> int:
        return len(self.ids())

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids())

    def _unknown(self, preference_id: str) -> str:
        known = self.ids()
        listing = ", ".join(map(repr, known[:10])) + (f" and {len(known) - 10} more" if len(known) > 10 else "")
        return f"Unknown preference id {preference_id!r}; the bank holds {len(known)} user(s): {listing or 'none'}."

    def get(self, preference_id: str) -> PreferenceEmbedding:
        """The embedding of `preference_id` (loading it now if it was registered lazily)."""
        with self._lock:
            if preference_id in self._loaded:
                return self._loaded[preference_id]
            if preference_id not in self._lazy:
                raise KeyError(self._unknown(preference_id))
            embedding = PreferenceEmbedding.from_pretrained(self._lazy[preference_id])
            embedding.check_compatible(self.fingerprint, self.latent_dim, self.feature_dim, name=preference_id)
            self._loaded[preference_id] = embedding.eval()
            del self._lazy[preference_id]
            return embedding

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
    def save(self, directory: str | os.PathLike, merge: bool = True) -> None:
        """Write every user to `directory/<id>/` plus a `bank.json` index (users already on disk are copied).

        The bank folder is replaced whole ([`atomic_directory`]) under a file lock: after a kill -9 a reader finds the
        old bank or the new one, and two processes saving into one folder lose no user.

        Args:
            merge (`bool`, *optional*, defaults to `True`): keep the users already saved in `directory` (for this
                backbone) that this bank does not hold; with `False`, `directory` ends up with exactly this bank.
        """
        directory = Path(directory)
        ids = self.ids()
        embeddings = {preference_id: self.get(preference_id) for preference_id in ids}  # read before the swap
        kept: list[str] = []

        def carry(name: str) -> bool:
            return name in kept

        with atomic_directory(directory, carry=carry) as tmp:
            previous = _read_index(directory) if (directory / BANK_INDEX).is_file() else None
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

    def save_user(self, directory: str | os.PathLike, preference_id: str) -> None:
        """Write one registered user into the bank saved at `directory`, in place, leaving every other user alone.

        The user's folder is replaced whole ([`atomic_directory`]) and `bank.json` gains its id if it is new, both
        under the bank folder's lock (so no [`~PreferenceBank.save`] swaps the folder meanwhile); no other user's
        files are read, rewritten or re-linked, so the cost does not grow with the bank. This is how
        [`update_user`] stores an online update.
        """
        directory = Path(directory)
        self._check_id(preference_id)
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
    ) -> str:
        """Upload every user as a folder `<id>/` of one repo (plus `bank.json`), in one commit.

        One repo with a folder per user, not a repo per user: a bank of thousands of users stays one versioned object
        (one commit updates many users atomically, one revision pins them all), while
        `model.load_preference(repo_id, preference_id, subfolder=id)` still downloads a single user's files only.
        Private by default: a bank is a list of users.
        """
        return push_folder(
            self.save, repo_id, token=token, private=private, revision=revision, commit_message=commit_message
        )

    def load(self, directory: str | os.PathLike, lazy: bool = True) -> list[str]:
        """Register every user of a bank saved with [`~PreferenceBank.save`]; returns their ids."""
        directory = Path(directory)
        index = read_bank_index(directory)
        if index.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"The bank at {directory} was built for another backbone (fingerprint "
                f"{str(index.get('fingerprint'))[:12]}, this model's is {self.fingerprint[:12]})."
            )
        ids = list(index.get("preference_ids", []))
        for preference_id in ids:
            self._check_id(preference_id)  # an id from a file names a folder: validate it before any read
        for preference_id in ids:
            self.add_from_directory(preference_id, directory / preference_id, lazy=lazy)
        return ids


def read_bank_index(directory: str | os.PathLike) -> dict:
    """The `bank.json` of a saved bank (`fingerprint`, `latent_dim`, `feature_dim`, `preference_ids`), read
    consistently with concurrent writers; an `OSError` names a missing or damaged index."""
    return read_consistent(Path(directory), _read_index)


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


__all__ = ["BANK_INDEX", "PreferenceBank", "read_bank_index"]
