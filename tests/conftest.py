"""Tiny, randomly initialised base models built in code (no download), one per supported family."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hf_prefalign import PrefAlignForCausalLM


VOCAB = 96
LATENT_DIM = 8


def make_tiny_base(family: str, seed: int = 0) -> PreTrainedModel:
    """A 3-layer causal LM of `family` with a 96-token vocabulary; GQA (4 query / 2 KV heads) where it exists."""
    torch.manual_seed(seed)
    if family == "gpt2":
        config = GPT2Config(
            n_embd=32, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=128, bos_token_id=1, eos_token_id=2
        )
        model = GPT2LMHeadModel(config)
    elif family == "llama":
        config = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(config)
    elif family == "qwen2":
        config = Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = Qwen2ForCausalLM(config)
    else:
        raise ValueError(family)
    return model.eval()


FAMILIES = ["gpt2", "llama", "qwen2"]


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def base(family: str) -> PreTrainedModel:
    return make_tiny_base(family)


@pytest.fixture
def backbone(base: PreTrainedModel) -> PrefAlignForCausalLM:
    return PrefAlignForCausalLM.from_base(base, latent_dim=LATENT_DIM).eval()


def left_padded_batch(lengths: list[int], pad_id: int = 0, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token rows of the given lengths, left-padded to the longest: `(input_ids, attention_mask)`."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, width - length :] = torch.randint(3, VOCAB, (length,), generator=generator)
        attention_mask[row, width - length :] = 1
    return input_ids, attention_mask
