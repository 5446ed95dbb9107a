"""Sequence log-likelihoods of labelled tokens (response tokens of prompt + response), in fp32."""

from __future__ import annotations

import torch
from trl.trainer.utils import selective_log_softmax


def sequence_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-likelihood of each sequence's labelled tokens, in fp32.

    Args:
        logits (`torch.Tensor` of shape `(N, T, V)`): next-token logits.
        labels (`torch.Tensor` of shape `(N, T)`): targets, -100 where not scored (prompt, padding).

    Returns:
        `(log_likelihood, num_tokens)`, both of shape `(N,)`.
    """
    logits, targets = logits[:, :-1].float(), labels[:, 1:]  # position t predicts token t+1
    scored = targets != -100
    # TRL's log_softmax -> gather without the full (N, T-1, V) log-probability tensor.
    token_ll = selective_log_softmax(logits, targets.clamp(min=0)) * scored  # (N, T-1)
    return token_ll.sum(-1), scored.sum(-1)


def positions_to_score(labels: torch.Tensor) -> int:
    """How many trailing positions hold every prediction of a labelled token (from the first labelled token - 1).

    Passed as `logits_to_keep`, it skips the LM head over the shared prompt (~20% of a pass on small models).
    """
    labelled = (labels != -100).any(0).nonzero()
    first = int(labelled[0]) if len(labelled) else labels.shape[1] - 1
    return labels.shape[1] - max(first - 1, 0)


__all__ = ["positions_to_score", "sequence_log_likelihood"]
