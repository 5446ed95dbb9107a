"""Prefix-tuning helpers: the EOS initialisation of a PEFT prefix and generation with the prefix in place."""

from __future__ import annotations

import functools
from typing import Any

import torch


def init_prefix_from_tokens(model: Any, token_id: int) -> None:
    """Start a PEFT prefix as the base model's own keys and values for `num_virtual_tokens` copies of `token_id`.

    Prefix tuning's real-token initialisation (Li & Liang, 2021): the prefixed model starts as the base reading those
    tokens first, instead of attending to N(0, 1) keys and values, which puts it far from the base (and from the DPO
    reference) before the first step. The prefix keys are computed at positions 0..P-1, where the cache puts them.
    """
    config = model.peft_config[model.active_adapter]
    if config.prefix_projection or config.num_transformer_submodules != 1:
        raise ValueError("init_prefix_from_tokens supports plain prefixes of decoder-only models only.")
    embedding = model.prompt_encoder[model.active_adapter].embedding.weight  # (P, L * 2 * H_kv * D)
    num_tokens, num_layers = config.num_virtual_tokens, config.num_layers
    heads = config.num_attention_heads
    head_dim = config.token_dim // heads
    ids = torch.full((1, num_tokens), token_id, dtype=torch.long, device=embedding.device)
    with torch.no_grad():
        cache = model.get_base_model()(input_ids=ids, use_cache=True).past_key_values
        prefix = torch.empty(num_tokens, num_layers * 2, heads, head_dim, device=embedding.device)  # (P, L*2, H, D)
        for layer in range(num_layers):
            prefix[:, 2 * layer] = cache.layers[layer].keys[0].transpose(0, 1)  # (H, P, D) -> (P, H, D)
            prefix[:, 2 * layer + 1] = cache.layers[layer].values[0].transpose(0, 1)
        embedding.copy_(prefix.reshape(num_tokens, -1).to(embedding.dtype))


# Workaround, PEFT 0.21.2 with transformers 5.24: generation now passes the KV cache as `cache`, while PEFT's
# `prepare_inputs_for_generation` still injects the prefix as `past_key_values`; the model then uses `cache` and drops
# the prefix ("Both `past_key_values` and `cache` are set ... ignoring deprecated `past_key_values`"), so a prefix-tuned
# model decodes like its base. Training is not affected (PEFT's `forward` passes the prefix alone). Remove once PEFT
# injects the prefix under `cache` (`check_prefix_generation` below then reports PEFT's generate as different from
# the base).
@torch.no_grad()
def generate_with_prefix(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> Any:
    """`generate` for a PEFT prefix-tuning model with its prefix in place; returns prompt + new tokens like `generate`.

    The prefix `(B, H_kv, P, D)` per layer goes in as a prefilled cache in front of P placeholder tokens (never read:
    their positions are already cached), and the attention mask covers it, so real tokens sit at positions P, P+1, ...
    exactly as in PEFT's training forward, also in left-padded rows.
    """
    num_virtual = model.active_peft_config.num_virtual_tokens
    batch = input_ids.shape[0]
    cache = model.get_prompt(batch)  # DynamicCache holding the prefix
    placeholders = torch.zeros(batch, num_virtual, dtype=input_ids.dtype, device=input_ids.device)
    prefix_mask = torch.ones(batch, num_virtual, dtype=attention_mask.dtype, device=attention_mask.device)
    out = model.get_base_model().generate(
        input_ids=torch.cat([placeholders, input_ids], dim=1),
        attention_mask=torch.cat([prefix_mask, attention_mask], dim=1),
        cache=cache,
        **kwargs,
    )  # (B, P + T + new)
    if isinstance(out, torch.Tensor):
        return out[:, num_virtual:]
    out.sequences = out.sequences[:, num_virtual:]  # return_dict_in_generate=True
    return out


@torch.no_grad()
def check_prefix_generation(model: Any, prompt_ids: list[int]) -> dict[str, float]:
    """How far first-token scores are (max abs difference): PEFT's own `generate` vs the base with the adapter
    disabled, and `generate_with_prefix` vs PEFT's training forward (expected: 0)."""
    ids = torch.tensor([prompt_ids])
    mask = torch.ones_like(ids)
    settings = {"max_new_tokens": 1, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    peft_scores = model.generate(input_ids=ids, attention_mask=mask, **settings).scores[0]
    with model.disable_adapter():
        base_scores = model.generate(input_ids=ids, attention_mask=mask, **settings).scores[0]
    forward_logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    workaround = functools.partial(generate_with_prefix, model)
    workaround_scores = workaround(input_ids=ids, attention_mask=mask, **settings).scores[0]
    return {
        "peft_generate_vs_base": float((peft_scores - base_scores).abs().max()),
        "workaround_generate_vs_training_forward": float((workaround_scores - forward_logits).abs().max()),
        "training_forward_vs_base": float((forward_logits - base_scores).abs().max()),
    }
