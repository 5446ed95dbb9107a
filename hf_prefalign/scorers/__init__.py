"""Simulated users for experiments: reward functions over texts, registered by name."""

from . import length, sentiment, style  # noqa: F401  (registers the built-in scorers)
from .base import Scorer, available_scorers, get_scorer, register_scorer


__all__ = ["Scorer", "available_scorers", "get_scorer", "register_scorer"]
