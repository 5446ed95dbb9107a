"""Style users: questions, lists and exclamations, counted from the text itself (no model, no download).

Each is a share in [0, 1], so a user's gain reads the same on short and long answers.
"""

from __future__ import annotations

import re

import torch

from .base import register_scorer


_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
_LIST_ITEM = re.compile(r"^\s*(?:[-*\u2022+]|\d+[.)])\s+\S")


def _sentences(text: str) -> list[str]:
    """Sentence-final punctuation marks of `text` ("..." counts once); a text without any counts as one sentence."""
    marks = _SENTENCE_END.findall(text)
    return marks or ["."]


def question_share(text: str) -> float:
    """Share of the sentences that are questions (end with `?`)."""
    marks = _sentences(text)
    return sum("?" in mark for mark in marks) / len(marks)


def exclamation_share(text: str) -> float:
    """Share of the sentences that end with `!`."""
    marks = _sentences(text)
    return sum("!" in mark for mark in marks) / len(marks)


def list_share(text: str) -> float:
    """Share of the non-empty lines that are bulleted or numbered list items."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return 0.0
    return sum(bool(_LIST_ITEM.match(line)) for line in lines) / len(lines)


class ShareScorer:
    """A per-text share (see the functions above), as a user's reward."""

    def __init__(self, name: str, share):
        self.name = name
        self._share = share

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([float(self._share(t)) for t in texts])


@register_scorer("questioning")
def questioning() -> ShareScorer:
    """A user who likes answers that ask questions (share of question sentences)."""
    return ShareScorer("questioning", question_share)


@register_scorer("structured")
def structured() -> ShareScorer:
    """A user who likes lists (share of lines that are list items)."""
    return ShareScorer("structured", list_share)


@register_scorer("excited")
def excited() -> ShareScorer:
    """A user who likes exclamations (share of sentences ending with `!`)."""
    return ShareScorer("excited", exclamation_share)


__all__ = ["ShareScorer", "exclamation_share", "list_share", "question_share"]
