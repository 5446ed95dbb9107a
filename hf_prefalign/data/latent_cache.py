"""LatentCache: the frozen encoder's outputs for prompts and responses, computed once and shared by every user.

Latent DPO never runs the LM: it needs, per preference pair, the posterior q(z|x,y) of the chosen and the rejected
response and the prompt features that the user's prior reads. They depend only on the (frozen) backbone and the
text, so they are cached by a key of (backbone fingerprint, rendered prompt, response): users who rank the same
response pool hit the same entries, and the encoder runs once per distinct text.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging

from ..modeling.distributions import DiagonalGaussian
from ..modeling.modeling_prefalign import PrefAlignForCausalLM
from ..utils.serialization import (
    IntegrityError,
    atomic_directory,
    read_consistent,
    read_tensors,
    save_tensors_atomic,
    sha256_file,
    write_json_atomic,
)
from .prompts import (
    context_limit,
    is_conversational,
    render_prompt,
    response_text,
    tokenize_prompt,
    tokenize_response,
)


logger = logging.get_logger(__name__)

PAIR_COLUMNS = ("features", "chosen_mean", "chosen_logvar", "rejected_mean", "rejected_logvar")
CACHE_INDEX = "index.json"
CACHE_TENSORS = "latents.safetensors"
KEY_FORMAT = "sha256-json-v2"


def _read_cache(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The entries of a saved cache (none if there is no cache yet), checked; an `OSError` names a damaged file."""
    index_file = directory / CACHE_INDEX
    if not index_file.is_file():
        return {}, {}
    hint = f"Delete {directory} to rebuild the cache."
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise OSError(f"The latent cache index {index_file} is not valid JSON ({err}). {hint}") from err
    if not isinstance(index, dict) or not all(isinstance(index.get(k), list) for k in ("prompts", "responses")):
        raise OSError(f"The latent cache index {index_file} lacks its `prompts` / `responses` lists. {hint}")
    tensors_file = directory / CACHE_TENSORS
    expected = index.get("latents_sha256")
    if expected is not None and tensors_file.is_file() and sha256_file(tensors_file) != expected:
        raise IntegrityError(f"{tensors_file} does not match the sha256 recorded in {index_file}. {hint}")
    tensors, _ = read_tensors(tensors_file)
    prompts, responses = tensors.get("prompt_features"), tensors.get("response_posteriors")
    if prompts is None or responses is None:
        raise OSError(f"{tensors_file} lacks `prompt_features` / `response_posteriors`. {hint}")
    if len(index["prompts"]) != len(prompts) or len(index["responses"]) != len(responses):
        raise OSError(
            f"The latent cache at {directory} is inconsistent: {index_file} lists {len(index['prompts'])} prompts and "
            f"{len(index['responses'])} responses, {tensors_file} holds {len(prompts)} and {len(responses)}. {hint}"
        )
    if index.get("key_format") != KEY_FORMAT:
        return {}, {}  # keys of an older format never match the current ones: start afresh, nothing is lost
    return dict(zip(index["prompts"], prompts, strict=True)), dict(zip(index["responses"], responses, strict=True))


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
        prompts, responses = read_consistent(self.directory, _read_cache)
        self._prompts = {**prompts, **self._prompts}
        self._responses = {**responses, **self._responses}

    def save(self) -> None:
        """Write the cache, merged with what other processes saved meanwhile (under a file lock, atomically)."""
        if self.directory is None:
            return
        feature_dim = self.model.config.text_config.hidden_size
        latent_dim = self.model.config.latent_dim
        with atomic_directory(self.directory) as tmp:
            try:
                on_disk = _read_cache(self.directory)  # under the lock: nobody writes it now
            except OSError as err:  # a damaged cache is replaced by this one, not merged
                logger.warning(f"Replacing the damaged latent cache at {self.directory}: {err}")
                on_disk = ({}, {})
            for key, value in on_disk[0].items():
                self._prompts.setdefault(key, value)
            for key, value in on_disk[1].items():
                self._responses.setdefault(key, value)
            prompts = torch.stack(list(self._prompts.values())) if self._prompts else torch.zeros(0, feature_dim)
            responses = (
                torch.stack(list(self._responses.values())) if self._responses else torch.zeros(0, 2, latent_dim)
            )
            save_tensors_atomic({"prompt_features": prompts, "response_posteriors": responses}, tmp / CACHE_TENSORS)
            write_json_atomic(
                {
                    "fingerprint": self.fingerprint,
                    "key_format": KEY_FORMAT,
                    "prompts": list(self._prompts),
                    "responses": list(self._responses),
                    "latents_sha256": sha256_file(tmp / CACHE_TENSORS),
                },
                tmp / CACHE_INDEX,
            )

    # Encoding ---------------------------------------------------------
    def _pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, sequences))
        device = self.model.device
        ids = torch.full((len(sequences), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        return ids.to(device), mask.to(device)

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

    def encode_pool(self, pool: Dataset) -> None:
        """Encode every prompt and response of a response pool ahead of time (what all users of the pool share)."""
        prompts = list(pool["prompt"])
        pairs = [(p, r) for p, responses in zip(prompts, pool["responses"], strict=True) for r in responses]
        self._encode_missing(prompts, pairs)


__all__ = ["PAIR_COLUMNS", "LatentCache", "normalize_preference_dataset", "read_preference_pairs"]
