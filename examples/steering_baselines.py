"""CAA steering vectors from preference pairs, shared by the example scripts (benchmark.py, preference_space_evidence.py).

CAA (contrastive activation addition, Rimsky et al., 2024): at one decoder layer, the mean over pairs of the chosen
minus the rejected response's mean residual stream (entering that layer); at generation, `multiplier` times that
vector is added to the residual stream entering the layer, at every position, by a forward pre-hook.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer
from trl.trainer.utils import pad

from hf_prefalign.data.prompts import tokenize_prompt, tokenize_response
from hf_prefalign.models.prefalign.hidden_state_encoder import masked_mean, read_hidden_states


def pad_right(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as a right-padded `(B, T)` batch and its attention mask (TRL's `pad`)."""
    ids = pad([torch.tensor(seq, dtype=torch.long) for seq in sequences], padding_value=pad_token_id)
    mask = pad([torch.ones(len(seq), dtype=torch.long) for seq in sequences], padding_value=0)
    return ids, mask


@torch.no_grad()
def caa_vectors_for(
    base: PreTrainedModel,
    layout: Any,
    tokenizer: Tokenizer,
    pairs: Dataset,
    layers: list[int],
    max_length: int,
    batch_size: int = 16,
) -> dict[int, torch.Tensor]:
    """CAA vectors from preference pairs: per layer, the mean over pairs of chosen minus rejected mean residual stream.

    Args:
        base (`PreTrainedModel`): the frozen base model.
        layout (`DecoderLayout`): where its decoder layers live (`PrefAlignForCausalLM.layout`).
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer.
        pairs (`datasets.Dataset`): rows with `prompt`, `chosen`, `rejected` (text or TRL chat format).
        layers (`list[int]`): decoder layers to read; one pass reads them all.
        max_length (`int`): prompt + response tokens kept per sequence.
        batch_size (`int`, *optional*, defaults to 16): pairs per forward pass.

    Returns:
        `dict[int, torch.Tensor]`: per layer, a `(hidden,)` vector.
    """
    sums: dict[int, Any] = {layer: 0.0 for layer in layers}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs.select(range(start, min(start + batch_size, len(pairs))))
        for column, sign in (("chosen", 1.0), ("rejected", -1.0)):
            rows, starts = [], []
            for row in chunk:
                prompt_ids = tokenize_prompt(tokenizer, row["prompt"])
                rows.append((prompt_ids + tokenize_response(tokenizer, row[column]))[:max_length])
                starts.append(len(prompt_ids))
            ids, mask = pad_right(rows, tokenizer.pad_token_id)
            response_mask = mask.clone()
            for r, s_ in enumerate(starts):
                response_mask[r, :s_] = 0
            states = read_hidden_states(base, layout, layers, ids, mask)  # per layer (B, T, hidden)
            for layer, layer_states in zip(layers, states, strict=True):
                sums[layer] = sums[layer] + sign * masked_mean(layer_states, response_mask).sum(0)  # (hidden,)
    return {layer: total / len(pairs) for layer, total in sums.items()}


@contextlib.contextmanager
def caa_steering(base: PreTrainedModel, layout: Any, layer: int, offset: torch.Tensor) -> Iterator[None]:
    """Add `offset` to the residual stream entering decoder layer `layer` while the block runs.

    Args:
        offset (`torch.Tensor`): `(hidden,)` (every row) or `(B, hidden)` (one vector per row), already multiplied.
    """
    module = layout.decoder_layers(base)[layer]
    dtype = next(base.parameters()).dtype
    offset = offset.to(dtype)
    offset = offset.view(1, 1, -1) if offset.dim() == 1 else offset.unsqueeze(1)  # (1 or B, 1, hidden)

    def hook(mod: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (args[0] + offset, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + offset}

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def caa_generate(base: PreTrainedModel, layout: Any, layer: int) -> Callable[..., Any]:
    """`generate` of `base` with per-row CAA offsets at `layer`: `run(offsets=(B, hidden), **generate_kwargs)`."""

    def run(offsets: torch.Tensor, **kwargs: Any) -> Any:
        with caa_steering(base, layout, layer, offsets):
            return base.generate(**kwargs)

    return run
