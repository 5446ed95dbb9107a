"""Preference pairs from a scored response pool, the way the paper builds its simulated users."""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset

from .pools import PROMPT_COLUMN, RESPONSES_COLUMN, as_response_pool


def preference_pairs_from_pool(pool: Dataset, scorer: Any) -> Dataset:
    """Rank each prompt's responses by `scorer` and pair (best, 2nd worst) and (2nd best, worst).

    Args:
        pool (`Dataset`): a response pool (`prompt`, `responses`), at least 4 responses per prompt.
        scorer (`Callable[[list[str]], torch.Tensor]`): the user's reward (higher is preferred).

    Returns:
        `Dataset`: a TRL preference dataset (`prompt`, `chosen`, `rejected`, plus `score_chosen`, `score_rejected`).
        Pairs whose two scores tie carry no preference and are left out.
    """
    pool = as_response_pool(pool)
    rows: list[dict[str, Any]] = []
    for row in pool:
        responses = row[RESPONSES_COLUMN]
        if len(responses) < 4:
            raise ValueError(f"Building pairs needs at least 4 responses per prompt, got {len(responses)}.")
        scores = torch.as_tensor(scorer(responses), dtype=torch.float32)
        order = torch.argsort(scores, descending=True, stable=True).tolist()  # best first
        for good, bad in ((order[0], order[-2]), (order[1], order[-1])):
            if scores[good] > scores[bad]:
                rows.append(
                    {
                        PROMPT_COLUMN: row[PROMPT_COLUMN],
                        "chosen": responses[good],
                        "rejected": responses[bad],
                        "score_chosen": float(scores[good]),
                        "score_rejected": float(scores[bad]),
                    }
                )
    if not rows:
        raise ValueError("The scorer gave every response of every prompt the same score: no preference pairs.")
    return Dataset.from_list(rows)


__all__ = ["preference_pairs_from_pool"]
