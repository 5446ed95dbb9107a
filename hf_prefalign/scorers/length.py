"""Length users: a concise user prefers fewer words, a detailed user more."""

from __future__ import annotations

import torch

from .base import register_scorer


class WordCountScorer:
    """Number of whitespace-separated words, times `sign` (-1: concise, +1: detailed)."""

    def __init__(self, sign: float):
        self.sign = sign
        self.name = "concise" if sign < 0 else "detailed"

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.sign * float(len(t.split())) for t in texts])


@register_scorer("concise")
def concise() -> WordCountScorer:
    return WordCountScorer(sign=-1.0)


@register_scorer("detailed")
def detailed() -> WordCountScorer:
    return WordCountScorer(sign=1.0)
