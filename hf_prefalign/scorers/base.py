"""Scorers: simulated users' reward functions (texts -> one score each), registered by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch


class Scorer(Protocol):
    """A reward function over response texts: higher is preferred."""

    name: str

    def __call__(self, texts: list[str]) -> torch.Tensor:  # (N,) float scores
        ...


_REGISTRY: dict[str, Callable[[], Scorer]] = {}


def register_scorer(name: str) -> Callable[[Callable[[], Scorer]], Callable[[], Scorer]]:
    """Register a zero-argument scorer factory under `name` (used by the CLI and the examples)."""

    def decorator(factory: Callable[[], Scorer]) -> Callable[[], Scorer]:
        if name in _REGISTRY:
            raise ValueError(f"A scorer named {name!r} is already registered.")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_scorers() -> list[str]:
    return sorted(_REGISTRY)


def get_scorer(name: str) -> Scorer:
    """Build the scorer registered as `name`; unknown names list the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown scorer {name!r}; available: {', '.join(available_scorers())}.")
    return _REGISTRY[name]()


__all__ = ["Scorer", "available_scorers", "get_scorer", "register_scorer"]
