"""The models of hf-prefalign; one folder per model, as in `transformers.models` (only `prefalign` today)."""

from . import prefalign
from .prefalign import *  # noqa: F403 - the package's public names are those of its models


__all__ = list(prefalign.__all__)
