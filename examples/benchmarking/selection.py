"""Choosing by reward: a setting on the validation prompts, and the samples the best-of-n oracle keeps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase as Tokenizer


def select_on_validation(
    candidates: list[Any],
    evaluate: Callable[[Any, list[list[int]]], dict[str, float]],
    validation_ids: list[list[int]],
    base_perplexity: float,
    perplexity_budget: float,
) -> tuple[Any, list[dict[str, Any]]]:
    """Pick a setting on the validation prompts: the best reward whose perplexity is within the budget.

    Args:
        candidates (`list`): the settings of the grid (a learning rate, a `(layer, multiplier)` pair, ...).
        evaluate (`Callable`): `evaluate(candidate, validation_ids)` returns `{"reward": float, "perplexity": float}`;
            it is only ever given the validation prompts, never the test prompts.
        validation_ids (`list[list[int]]`): the tokenized validation prompts.
        base_perplexity (`float`): the base model's perplexity on its own validation samples.
        perplexity_budget (`float`): settings whose perplexity exceeds this times `base_perplexity` are skipped; when
            all do, the lowest-perplexity setting is kept.

    Returns:
        `tuple`: the chosen candidate, and the curve (one `{"setting", "reward", "perplexity"}` per candidate).
    """
    curve = []
    for candidate in candidates:
        point = evaluate(candidate, validation_ids)
        curve.append({"setting": candidate, "reward": point["reward"], "perplexity": point["perplexity"]})
    allowed = [i for i, p in enumerate(curve) if p["perplexity"] <= perplexity_budget * base_perplexity]
    if allowed:
        best = max(allowed, key=lambda i: curve[i]["reward"])
    else:
        best = min(range(len(curve)), key=lambda i: curve[i]["perplexity"])
    return candidates[best], curve


def best_of_n_indices(rewards: list[float], n: int) -> list[int]:
    """For consecutive groups of `n` rewards, the index (into `rewards`) of each group's highest one."""
    if len(rewards) % n:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {n}.")
    return [start + max(range(n), key=lambda i: rewards[start + i]) for start in range(0, len(rewards), n)]


def best_of_n_responses(
    candidates: list[list[list[int]]], tokenizer: Tokenizer, scorer: Callable[[list[str]], torch.Tensor], n: int
) -> list[list[list[int]]]:
    """Per prompt, `n` consecutive base samples per slot reranked by `scorer`: the best of each group is kept."""
    out = []
    for rows in candidates:
        texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]
        out.append([rows[i] for i in best_of_n_indices(scorer(texts).tolist(), n)])
    return out
