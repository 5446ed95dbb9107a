"""Sentiment users: VADER's compound polarity (vaderSentiment, a lexicon model: no download, no GPU)."""

from __future__ import annotations

import torch

from .base import register_scorer


class VaderSentimentScorer:
    """VADER compound score in [-1, 1]; `sign=-1` makes a user who prefers negative responses."""

    def __init__(self, sign: float = 1.0):
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as err:
            raise ImportError("The sentiment scorers need vaderSentiment: pip install vaderSentiment") from err
        self._analyzer = SentimentIntensityAnalyzer()
        self.sign = sign
        self.name = "positive" if sign > 0 else "negative"

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.sign * self._analyzer.polarity_scores(t)["compound"] for t in texts])


@register_scorer("positive")
def positive_sentiment() -> VaderSentimentScorer:
    return VaderSentimentScorer(sign=1.0)


@register_scorer("negative")
def negative_sentiment() -> VaderSentimentScorer:
    return VaderSentimentScorer(sign=-1.0)
