"""Loading a base causal LM by Hub id, local path or the embedded default's reference."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..utils.constants import EMBEDDED_DEFAULT_BASE
from ..utils.precision import resolve_dtype
from . import embedded


def load_base_model(
    name_or_path: str,
    revision: str | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    **hub_kwargs,
) -> PreTrainedModel:
    """Load a base causal LM by Hub id, local path or the embedded default's reference.

    `dtype` is resolved for `device`, where the model will run (bf16 only where it is native there); the model is
    returned on the CPU. Raises an `OSError` naming what was looked for when the model cannot be found, and a
    `ValueError` when the checkpoint is not a causal LM.
    """
    if name_or_path == EMBEDDED_DEFAULT_BASE:
        model, _ = embedded.load_default_base(  # looked up here, so a stand-in set on `embedded` is used
            dtype=dtype or torch.float32, device=device
        )
        return model
    if dtype != "auto":  # transformers' own "auto" is the checkpoint's dtype
        dtype = resolve_dtype(dtype, device)
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, revision=revision, dtype=dtype, **hub_kwargs)
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise ValueError(f"{name_or_path!r} is not a causal language model (no causal-LM head): {err}") from err
        raise
    except OSError as err:
        raise OSError(
            f"Could not load the base model {name_or_path!r}"
            + (f" (revision {revision!r})" if revision else "")
            + f": {err}\nPass it explicitly with `base_model=...`, or make it available at that path / Hub id."
        ) from err


__all__ = ["load_base_model"]
