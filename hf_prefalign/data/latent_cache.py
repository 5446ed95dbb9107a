"""LatentCache: the frozen encoder's outputs for prompts and responses, computed once and shared by every user.

Latent DPO never runs the LM: it needs, per preference pair, the posterior q(z|x,y) of the chosen and the rejected
response and the prompt features that the user's prior reads. They depend only on the (frozen) backbone and the
text, so they are cached by a key of (backbone fingerprint, rendered prompt, response): users who rank the same
response pool hit the same entries, and the encoder runs once per distinct text.

On disk (`cache_dir/<fingerprint[:24]>/`), a cache is immutable shard files and one index:

```
index.json                      # fingerprint, key_format, format_version, shards: [{file, size, sha256, prompts, responses}]
latents-<16 hex>.safetensors    # prompt_features (P, F), response_posteriors (R, 2, Z) of that shard's keys, in order
```

A save appends one shard holding the entries the index does not have yet (written to a temporary file, fsynced,
renamed) and then replaces `index.json` atomically, both under the folder's file lock: nothing already written is
rewritten, a kill -9 leaves the old index or the new one, and a shard no index names (a writer killed before its
index) is deleted by the next save. Shards never change once indexed, so any number of processes read the cache
while others append to it. Encoding a pool splits across processes with `encode_pool(pool, num_shards=n,
shard_index=i)`: each process encodes the texts whose key hashes to its shard and appends them as its own file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from datasets import Dataset
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging
from trl.trainer.utils import pad

from ..distributions import DiagonalGaussian
from ..utils.locking import writer_lock
from ..utils.serialization import (
    INTERNAL_PREFIX,
    IntegrityError,
    locked_directory,
    read_consistent,
    read_tensors,
    save_tensors_atomic,
    sha256_file,
    write_json_atomic,
)
from ..utils.sharding import check_shard_spec, shard_of, shard_tag
from .prompts import (
    context_limit,
    is_conversational,
    render_prompt,
    response_text,
    tokenize_prompt,
    tokenize_response,
)


if TYPE_CHECKING:
    from ..models.prefalign.modeling_prefalign import PrefAlignForCausalLM


logger = logging.get_logger(__name__)

PAIR_COLUMNS = ("features", "chosen_mean", "chosen_logvar", "rejected_mean", "rejected_logvar")
CACHE_INDEX = "index.json"
CACHE_TENSORS = "latents.safetensors"  # the single tensors file of format 1 caches (read as their one shard)
KEY_FORMAT = "sha256-json-v2"
CACHE_FORMAT_VERSION = 2
SHARD_FILE = re.compile(r"latents-[0-9a-f]{16}\.safetensors")


class CacheShardLockedError(OSError):
    """Another process is encoding the same shard of a pool into the same latent cache."""


def _read_index(directory: Path) -> dict | None:
    """The cache's `index.json` with its `shards` list (a format 1 index read as one shard); `None` if there is no
    index yet. An `OSError` names a damaged index."""
    index_file = directory / CACHE_INDEX
    if not index_file.is_file():
        return None
    hint = f"Delete {directory} to rebuild the cache."
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise OSError(f"The latent cache index {index_file} is not valid JSON ({err}). {hint}") from err
    if (
        isinstance(index, dict)
        and "shards" not in index
        and all(isinstance(index.get(k), list) for k in ("prompts", "responses"))
    ):  # format 1: one tensors file, its keys in the index
        legacy = {"file": CACHE_TENSORS, "sha256": index.pop("latents_sha256", None)}
        index = {**index, "shards": [{**legacy, "prompts": index.pop("prompts"), "responses": index.pop("responses")}]}
    shards = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(shards, list) or not all(
        isinstance(shard, dict)
        and isinstance(shard.get("file"), str)
        and (shard["file"] == CACHE_TENSORS or SHARD_FILE.fullmatch(shard["file"]))
        and all(isinstance(shard.get(k), list) for k in ("prompts", "responses"))
        for shard in shards
    ):
        raise OSError(f"The latent cache index {index_file} lacks a valid `shards` list. {hint}")
    return index


def _read_shard(directory: Path, shard: dict, fingerprint: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One shard's `prompt_features` and `response_posteriors`, checked; every failure names the file."""
    path = directory / shard["file"]
    hint = f"Delete {directory} to rebuild the cache."
    if not path.is_file():
        raise FileNotFoundError(
            f"The latent cache index {directory / CACHE_INDEX} lists {path.name}, which is missing. {hint}"
        )
    if isinstance(shard.get("size"), int) and path.stat().st_size != shard["size"]:
        raise IntegrityError(
            f"{path} has {path.stat().st_size} bytes, the cache index records {shard['size']}: it was truncated or "
            f"replaced. {hint}"
        )
    if shard.get("sha256") is not None and sha256_file(path) != shard["sha256"]:
        raise IntegrityError(f"{path} does not match the sha256 recorded in {directory / CACHE_INDEX}. {hint}")
    tensors, metadata = read_tensors(path)
    if metadata.get("fingerprint", fingerprint) != fingerprint:
        raise ValueError(
            f"{path} was encoded by another backbone (fingerprint {metadata['fingerprint'][:12]}, this cache's is "
            f"{fingerprint[:12]}): shards of another cache were copied here. {hint}"
        )
    prompts, responses = tensors.get("prompt_features"), tensors.get("response_posteriors")
    if prompts is None or responses is None:
        raise OSError(f"{path} lacks `prompt_features` / `response_posteriors`. {hint}")
    if len(shard["prompts"]) != len(prompts) or len(shard["responses"]) != len(responses):
        raise OSError(
            f"The latent cache at {directory} is inconsistent: its index lists {len(shard['prompts'])} prompts and "
            f"{len(shard['responses'])} responses for {path.name}, which holds {len(prompts)} and {len(responses)}. "
            f"{hint}"
        )
    return prompts, responses


def _shard_problem(directory: Path, shard: dict) -> str | None:
    """What is wrong with a shard, read from its header only (cheap enough for every save), or `None`."""
    path = directory / shard["file"]
    if not path.is_file():
        return "the file is missing"
    if isinstance(shard.get("size"), int) and path.stat().st_size != shard["size"]:
        return f"it has {path.stat().st_size} bytes, the index records {shard['size']}"
    try:
        with safe_open(str(path), framework="pt") as handle:
            counts = [handle.get_slice(name).get_shape()[0] for name in ("prompt_features", "response_posteriors")]
    except Exception as err:  # safetensors raises its own SafetensorError for bad headers / truncation
        return f"it is not a readable latent shard ({err})"
    if counts != [len(shard["prompts"]), len(shard["responses"])]:
        listed = f"{len(shard['prompts'])} and {len(shard['responses'])}"
        return f"it holds {counts[0]} prompts and {counts[1]} responses, the index lists {listed}"
    return None


def _read_cache(directory: Path, fingerprint: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The entries of every shard of a saved cache (none if there is no cache yet), checked.

    An `OSError` names a missing or damaged file; a `ValueError`, a cache of another backbone."""
    index = _read_index(directory)
    if index is None or index.get("key_format") != KEY_FORMAT:
        return {}, {}  # keys of an older format never match the current ones: start afresh, nothing is lost
    if index.get("fingerprint") != fingerprint:
        raise ValueError(
            f"The latent cache at {directory} was built for another backbone (fingerprint "
            f"{str(index.get('fingerprint'))[:12]}, this model's is {fingerprint[:12]}). Use another `cache_dir`."
        )
    prompts: dict[str, torch.Tensor] = {}
    responses: dict[str, torch.Tensor] = {}
    for shard in index["shards"]:
        features, posteriors = _read_shard(directory, shard, fingerprint)
        prompts.update(zip(shard["prompts"], features, strict=True))
        responses.update(zip(shard["responses"], posteriors, strict=True))
    return prompts, responses


def read_preference_pairs(dataset: Dataset, name: str = "train") -> list[tuple[Any, str, str] | None]:
    """Each row of a TRL preference dataset (standard, conversational or implicit prompt) as `(prompt, chosen,
    rejected)` the way the encoder reads them, or `None` for a row whose chosen and rejected are identical.

    The columns are read whole (not row by row), which keeps datasets of many users' pairs cheap to read.
    """
    if len(dataset) == 0:
        raise ValueError(f"The {name} preference dataset is empty.")
    columns = set(dataset.column_names)
    missing = {"chosen", "rejected"} - columns
    if missing:
        raise ValueError(
            f"The {name} preference dataset lacks column(s) {sorted(missing)}; found {dataset.column_names}. "
            "Expected TRL's preference format: `prompt`, `chosen`, `rejected`."
        )
    table = dataset.with_format(None)[:]
    pairs: list[tuple[Any, str, str] | None] = []
    for index, (chosen_value, rejected_value) in enumerate(zip(table["chosen"], table["rejected"], strict=True)):
        if "prompt" in columns:
            prompt, good, bad = table["prompt"][index], response_text(chosen_value), response_text(rejected_value)
        elif is_conversational(chosen_value):  # implicit prompt: the conversation up to the last turn
            prompt, good, bad = chosen_value[:-1], chosen_value[-1]["content"], rejected_value[-1]["content"]
        else:
            raise ValueError(
                f"The {name} preference dataset has no `prompt` column and plain-text responses; found "
                f"{dataset.column_names}."
            )
        pairs.append(None if good == bad else (prompt, good, bad))
    return pairs


def normalize_preference_dataset(dataset: Dataset, name: str = "train") -> tuple[list[Any], list[str], list[str]]:
    """Prompts, chosen and rejected texts of a TRL preference dataset (standard, conversational or implicit prompt).

    Rows whose chosen and rejected responses are identical are skipped with a counted warning.
    """
    pairs = read_preference_pairs(dataset, name)
    kept = [pair for pair in pairs if pair is not None]
    identical = len(pairs) - len(kept)
    if identical:
        logger.warning(f"Skipped {identical} row(s) of the {name} dataset whose chosen and rejected are identical.")
    if not kept:
        raise ValueError(f"The {name} preference dataset has no usable pair (all chosen == rejected).")
    prompts, chosen, rejected = (list(column) for column in zip(*kept, strict=True))
    return prompts, chosen, rejected


class LatentCache:
    """Encoder outputs keyed by text, in memory and (optionally) on disk.

    Args:
        model (`PrefAlignForCausalLM`): the frozen backbone; its fingerprint keys the cache.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer.
        cache_dir (`str`, *optional*): where entries persist between runs (a sub-folder per backbone fingerprint).
        batch_size (`int`, *optional*, defaults to 32): sequences per encoder call.

    Many processes may open one `cache_dir` at once: readers see whole shards only, and writers append their own
    shard files (see the module docstring). A cache folder whose index names a missing or damaged shard is refused
    with an error naming the file; one recorded for another backbone fingerprint, with a `ValueError`.
    """

    def __init__(
        self,
        model: PrefAlignForCausalLM,
        tokenizer: PreTrainedTokenizerBase,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 32,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.fingerprint = model.fingerprint()
        self.directory = Path(cache_dir) / self.fingerprint[:24] if cache_dir is not None else None
        self._prompts: dict[str, torch.Tensor] = {}
        self._responses: dict[str, torch.Tensor] = {}  # key -> (2, Z): mean, logvar
        self.encoder_sequences = 0  # how many sequences the encoder has read (cache misses)
        # Longest sequence the encoder can read: its queries take positions after the text's.
        limit = context_limit(model.config.text_config)
        self.max_tokens = None if limit is None else max(2, limit - model.config.num_encoder_queries)
        self._load()

    # Keys -------------------------------------------------------------
    @staticmethod
    def _key(*parts: str) -> str:
        # A JSON list, not a separator join: ("a\x00b", "c") and ("a", "b\x00c") get different keys.
        return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()

    def _prompt_key(self, prompt: Any) -> str:
        return self._key("prompt", render_prompt(self.tokenizer, prompt))

    def _response_key(self, prompt: Any, response: str) -> str:
        return self._key("response", render_prompt(self.tokenizer, prompt), response)

    # Disk -------------------------------------------------------------
    def _load(self) -> None:
        if self.directory is None:
            return
        prompts, responses = read_consistent(self.directory, lambda folder: _read_cache(folder, self.fingerprint))
        self._prompts = {**prompts, **self._prompts}
        self._responses = {**responses, **self._responses}

    def save(self) -> None:
        """Append the entries not on disk yet as one new shard file, then the index (under the folder's file lock).

        Entries other processes appended meanwhile are kept (the index is re-read under the lock) and not
        duplicated; nothing already written is rewritten."""
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        with locked_directory(self.directory) as folder:
            try:
                index = _read_index(folder)  # under the lock: nobody writes it now
            except OSError as err:  # a damaged index is replaced by one naming only the shard written now
                logger.warning(f"Replacing the damaged latent cache index of {folder}: {err}")
                index = None
            if (
                index is not None
                and index.get("key_format") == KEY_FORMAT
                and index.get("fingerprint") != self.fingerprint
            ):
                raise ValueError(
                    f"The latent cache at {folder} was built for another backbone (fingerprint "
                    f"{str(index.get('fingerprint'))[:12]}, this model's is {self.fingerprint[:12]}); not writing into it."
                )
            if index is None or index.get("key_format") != KEY_FORMAT:  # older keys never match: start afresh
                index = {"shards": []}
            shards = []
            for shard in index["shards"]:  # a shard that is missing or does not match its entry is dropped
                problem = _shard_problem(folder, shard)
                if problem is None:
                    shards.append({"size": (folder / shard["file"]).stat().st_size, **shard})  # format 1: no size
                else:
                    logger.warning(f"Dropping {shard['file']} from the latent cache at {folder}: {problem}")
            index["shards"] = shards
            named = {shard["file"] for shard in shards}
            for entry in folder.iterdir():  # shards of writers killed before their index, half-written files
                orphan = SHARD_FILE.fullmatch(entry.name) and entry.name not in named
                if (
                    orphan or (entry.name.startswith(INTERNAL_PREFIX) and entry.name.endswith(".tmp"))
                ) and entry.is_file():
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()
            on_disk = {key for shard in shards for key in (*shard["prompts"], *shard["responses"])}
            prompts = {k: v for k, v in self._prompts.items() if k not in on_disk}
            responses = {k: v for k, v in self._responses.items() if k not in on_disk}
            if prompts or responses:
                feature_dim = self.model.config.text_config.hidden_size
                latent_dim = self.model.config.latent_dim
                tensors = {
                    "prompt_features": torch.stack(list(prompts.values())) if prompts else torch.zeros(0, feature_dim),
                    "response_posteriors": (
                        torch.stack(list(responses.values())) if responses else torch.zeros(0, 2, latent_dim)
                    ),
                }
                path = folder / f"latents-{uuid.uuid4().hex[:16]}.safetensors"
                save_tensors_atomic(tensors, path, metadata={"fingerprint": self.fingerprint})
                shards.append(
                    {
                        "file": path.name,
                        "size": path.stat().st_size,
                        "sha256": sha256_file(path),
                        "prompts": list(prompts),
                        "responses": list(responses),
                    }
                )
                index.update(fingerprint=self.fingerprint, key_format=KEY_FORMAT, format_version=CACHE_FORMAT_VERSION)
                write_json_atomic(index, folder / CACHE_INDEX)

    @property
    def shard_files(self) -> list[str]:
        """The shard files the on-disk index names, in the order they were appended (empty without a `cache_dir`)."""
        if self.directory is None:
            return []
        index = read_consistent(self.directory, _read_index)
        return [] if index is None else [shard["file"] for shard in index["shards"]]

    # Encoding ---------------------------------------------------------
    def _pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded `(B, T)` ids and attention mask on the model's device (TRL's `pad`)."""
        ids = pad([torch.tensor(seq, dtype=torch.long) for seq in sequences], self.tokenizer.pad_token_id or 0)
        mask = pad([torch.ones(len(seq), dtype=torch.long) for seq in sequences], 0)
        return ids.to(self.model.device), mask.to(self.model.device)

    @torch.no_grad()
    def _encode_missing(self, prompts: list[Any], responses: list[tuple[Any, str]]) -> None:
        todo_prompts = {self._prompt_key(p): p for p in prompts if self._prompt_key(p) not in self._prompts}
        todo_responses = {
            self._response_key(p, r): (p, r) for p, r in responses if self._response_key(p, r) not in self._responses
        }
        total = len(todo_prompts) + len(todo_responses)
        if not total:
            return
        was_training = self.model.training
        self.model.eval()
        limit, truncated = self.max_tokens, 0

        def fit(ids: list[int]) -> list[int]:
            nonlocal truncated
            if limit is None or len(ids) <= limit:
                return ids
            truncated += 1
            return ids[-limit:]  # the end of a prompt (the question, the generation prompt) matters most

        progress = tqdm(total=total, desc="Encoding prompts and responses", unit="seq")
        items = list(todo_prompts.items())
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            ids, mask = self._pad([fit(tokenize_prompt(self.tokenizer, p)) for _, p in chunk])
            features = self.model.prompt_features(ids, mask).cpu()
            for (key, _), feature in zip(chunk, features, strict=True):
                self._prompts[key] = feature
            progress.update(len(chunk))
        items = list(todo_responses.items())
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            prompt_ids, sequences = [], []
            for _, (p, r) in chunk:
                prompt, response = tokenize_prompt(self.tokenizer, p), tokenize_response(self.tokenizer, r)
                if limit is not None and len(prompt) + len(response) > limit:
                    truncated += 1
                    # Keep the response's start and the prompt's end (at least half the context, when it is long).
                    response = response[: limit - min(len(prompt), limit // 2)]
                    prompt = prompt[max(0, len(prompt) - (limit - len(response))) :]
                prompt_ids.append(prompt)
                sequences.append(prompt + response)
            ids, mask = self._pad(sequences)
            response_mask = mask.clone()
            for row, prompt in enumerate(prompt_ids):
                response_mask[row, : len(prompt)] = 0  # right padding: the prompt comes first
            posterior = self.model.posterior(ids, mask, response_mask)
            stacked = torch.stack([posterior.mean, posterior.logvar], dim=1).cpu()  # (b, 2, Z)
            for (key, _), value in zip(chunk, stacked, strict=True):
                self._responses[key] = value
            progress.update(len(chunk))
        progress.close()
        if truncated:
            logger.warning(
                f"{truncated} text(s) exceed the backbone's context of {limit} tokens and were truncated before encoding."
            )
        self.encoder_sequences += total
        self.model.train(was_training)
        self.save()

    def encode_pairs(self, dataset: Dataset, name: str = "train") -> Dataset:
        """Latent columns for a TRL preference dataset: `features` `(F,)` and the chosen / rejected posteriors' mean
        and log-variance `(Z,)` per pair. Entries already cached are reused; the rest are encoded and cached."""
        columns = self.pair_latents(*normalize_preference_dataset(dataset, name))
        return Dataset.from_dict({key: tensor.numpy() for key, tensor in columns.items()}).with_format("torch")

    def pair_latents(self, prompts: list[Any], chosen: list[str], rejected: list[str]) -> dict[str, torch.Tensor]:
        """The latent columns of `encode_pairs` (`PAIR_COLUMNS`: `(N, F)` features, `(N, Z)` means and
        log-variances) for pairs given as lists, without building a dataset: how many users' pairs are encoded once.
        """
        self._encode_missing(
            prompts, list(zip(prompts, chosen, strict=True)) + list(zip(prompts, rejected, strict=True))
        )
        features = torch.stack([self._prompts[self._prompt_key(p)] for p in prompts])
        good = torch.stack([self._responses[self._response_key(p, r)] for p, r in zip(prompts, chosen, strict=True)])
        bad = torch.stack([self._responses[self._response_key(p, r)] for p, r in zip(prompts, rejected, strict=True)])
        return {
            "features": features,
            "chosen_mean": good[:, 0],
            "chosen_logvar": good[:, 1],
            "rejected_mean": bad[:, 0],
            "rejected_logvar": bad[:, 1],
        }

    def posteriors(self, prompts: list[Any], responses: list[str]) -> DiagonalGaussian:
        """q(z|x,y) of each (prompt, response), encoded exactly as for Latent DPO (cached entries reused).

        [`PreferenceEmbedding.from_examples`] reads a user's liked examples through this, so a user built from
        examples and one trained on pairs see the same posteriors of the same texts.

        Returns:
            [`DiagonalGaussian`] with `mean` and `logvar` of shape `(N, Z)`, on the CPU.
        """
        pairs = list(zip(prompts, responses, strict=True))
        self._encode_missing([], pairs)
        stacked = torch.stack([self._responses[self._response_key(p, r)] for p, r in pairs])  # (N, 2, Z)
        return DiagonalGaussian(stacked[:, 0], stacked[:, 1])

    def encode_pool(self, pool: Dataset, *, num_shards: int = 1, shard_index: int = 0) -> int:
        """Encode every prompt and response of a response pool ahead of time (what all users of the pool share).

        With `num_shards=n, shard_index=i` (as `datasets.Dataset.shard` takes them), only the distinct texts whose
        key hashes to shard `i` of `n`: `n` processes, each given its own `shard_index`, encode the pool together,
        each appending its entries to the shared `cache_dir` as its own shard file (no file is written twice, none
        rewritten). A second process given the same shard of the same cache meanwhile is refused
        ([`CacheShardLockedError`]). Returns how many texts this call encoded (texts already cached are skipped).
        """
        num_shards, shard_index = check_shard_spec(num_shards, shard_index)
        prompts = list(pool["prompt"])
        pairs = [(p, r) for p, responses in zip(prompts, pool["responses"], strict=True) for r in responses]
        if num_shards > 1:
            prompts = [p for p in prompts if shard_of(self._prompt_key(p), num_shards) == shard_index]
            pairs = [(p, r) for p, r in pairs if shard_of(self._response_key(p, r), num_shards) == shard_index]
        before = self.encoder_sequences
        if self.directory is None or num_shards == 1:
            self._encode_missing(prompts, pairs)
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            tag = shard_tag(num_shards, shard_index)
            with writer_lock(
                self.directory,
                name=f"encode-{tag}.lock",
                error=CacheShardLockedError,
                what=f"Another process is encoding shard {shard_index} of {num_shards} into the latent cache",
            ):
                self._encode_missing(prompts, pairs)
        return self.encoder_sequences - before


__all__ = [
    "PAIR_COLUMNS",
    "CacheShardLockedError",
    "LatentCache",
    "normalize_preference_dataset",
    "read_preference_pairs",
]
