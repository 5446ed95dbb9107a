"""Which checkpoint a resume reads: a kill -9 while the Trainer writes one leaves it incomplete."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from transformers.utils import logging

from ..utils.constants import WEIGHTS_NAME


logger = logging.get_logger(__name__)

TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """The Trainer writes `trainer_state.json` last: a checkpoint is complete when it parses and the weights exist."""
    path = Path(path)
    try:
        state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(state, dict) and "global_step" in state and (path / WEIGHTS_NAME).is_file()


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete `checkpoint-N` of `output_dir`; newer incomplete ones are skipped with a warning."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = sorted(
        (int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.fullmatch(p.name)) and p.is_dir()
    )
    skipped = []
    for _, path in reversed(found):
        if is_complete_checkpoint(path):
            if skipped:
                logger.warning(
                    f"Skipping incomplete checkpoint(s) {', '.join(skipped)} (interrupted while being written); "
                    f"resuming from {path.name}."
                )
            return str(path)
        skipped.append(path.name)
    if skipped:
        logger.warning(f"No complete checkpoint in {folder} ({', '.join(skipped)} are incomplete); starting afresh.")
    return None


def resolve_resume(resume_from_checkpoint: str | bool | None, output_dir: str | os.PathLike) -> str | bool | None:
    """What to pass the Trainer: `True` becomes the last complete checkpoint (or `None`: train from scratch); a path
    must be a complete checkpoint, else a `FileNotFoundError` / `ValueError` says so (never a silent fresh start)."""
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True or str(resume_from_checkpoint).lower() in ("true", "last"):
        return last_complete_checkpoint(output_dir)
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint={resume_from_checkpoint}: no such checkpoint folder.")
    if (path / TRAINER_STATE).exists() and not is_complete_checkpoint(path):
        raise ValueError(
            f"The checkpoint {path} is incomplete (interrupted while being written); pass its parent's last complete "
            "one, or `resume_from_checkpoint=True` to pick it."
        )
    return str(path)


__all__ = ["is_complete_checkpoint", "last_complete_checkpoint", "resolve_resume"]
