"""Bad input gets a clear error that names the problem."""

from __future__ import annotations

import pytest
import torch
from helpers import LATENT_DIM, VOCAB
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import (
    LlamaConfig,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
)

from hf_prefalign import PrefAlignConfig, PrefAlignForCausalLM
from hf_prefalign.testing import make_tiny_base


def _word_tokenizer(size: int, eos: str = "<eos>") -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, size)}}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<pad>")),
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token=eos,
    )


def test_base_without_lm_head():
    headless = LlamaModel(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)
    )
    with pytest.raises(ValueError, match="no causal-LM head"):
        PrefAlignForCausalLM.from_base(headless)


@pytest.mark.parametrize("option", ["latent_dim", "num_prefix_slots", "num_encoder_layers", "num_encoder_queries"])
@pytest.mark.parametrize("value", [0, -3])
def test_non_positive_sizes(option, value):
    with pytest.raises(ValueError, match=f"`{option}` must be a positive integer, got {value}"):
        PrefAlignConfig(text_config=make_tiny_base("llama").config.to_dict(), **{option: value})


def test_more_encoder_layers_than_the_base_has():
    with pytest.raises(ValueError, match="num_encoder_layers=5"):
        PrefAlignForCausalLM.from_base(make_tiny_base("llama"), num_encoder_layers=5, encoder_type="blocks")


def test_unknown_latent_option():
    with pytest.raises(TypeError, match="latent_size"):
        PrefAlignForCausalLM.from_base(make_tiny_base("llama"), latent_size=8)


@pytest.mark.parametrize(
    ("latents", "message"),
    [
        (torch.zeros(2, LATENT_DIM + 1), r"shape \(batch, 8\)"),
        (torch.zeros(3, LATENT_DIM), "batch size 3 but the inputs have batch size 2"),
        (torch.zeros(2, 2, LATENT_DIM), r"shape \(batch, 8\)"),
        ([0.0] * LATENT_DIM, "must be a torch.Tensor"),
    ],
)
def test_latents_of_the_wrong_shape(latents, message):
    model = PrefAlignForCausalLM.from_base(make_tiny_base("llama"), latent_dim=LATENT_DIM)
    input_ids = torch.randint(3, VOCAB, (2, 4))
    with pytest.raises((ValueError, TypeError), match=message):
        model(input_ids, latents=latents)
    with pytest.raises((ValueError, TypeError), match=message):
        model.generate(input_ids=input_ids, latents=latents, max_new_tokens=2)


def test_attention_mask_of_the_wrong_length():
    model = PrefAlignForCausalLM.from_base(make_tiny_base("llama"), latent_dim=LATENT_DIM)
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.randint(3, VOCAB, (2, 4)), attention_mask=torch.ones(2, 5, dtype=torch.long))


def test_tokenizer_that_does_not_match_the_base():
    base = make_tiny_base("llama")
    PrefAlignForCausalLM.from_base(base, tokenizer=_word_tokenizer(VOCAB))  # matching: accepted
    with pytest.raises(ValueError, match=f"has {VOCAB + 20} tokens but the base model's embedding table has {VOCAB}"):
        PrefAlignForCausalLM.from_base(base, tokenizer=_word_tokenizer(VOCAB + 20))
    with pytest.raises(ValueError, match="end-of-sequence"):
        PrefAlignForCausalLM.from_base(base, tokenizer=_word_tokenizer(VOCAB, eos="w7"))


def test_unsupported_architecture_lists_the_supported_ones():
    opt = OPTForCausalLM(
        OPTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=4,
            vocab_size=VOCAB,
            word_embed_proj_dim=32,
        )
    )
    with pytest.raises(ValueError, match="'opt'.*Supported model types: gpt2, llama"):
        PrefAlignForCausalLM.from_base(opt)


def test_sliding_window_base_is_rejected_and_full_attention_accepted():
    config = MistralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        sliding_window=16,
    )
    with pytest.raises(ValueError, match="sliding-window"):
        PrefAlignForCausalLM.from_base(MistralForCausalLM(config), adapter_type="prefix")
    # The residual adapter puts nothing in the cache that a window could evict.
    steered = PrefAlignForCausalLM.from_base(MistralForCausalLM(config), latent_dim=LATENT_DIM)
    assert steered(torch.randint(3, VOCAB, (1, 4)), latents=torch.randn(1, LATENT_DIM)).logits.shape == (1, 4, VOCAB)
    config.sliding_window = None
    model = PrefAlignForCausalLM.from_base(MistralForCausalLM(config), latent_dim=LATENT_DIM)
    assert model(torch.randint(3, VOCAB, (1, 4))).logits.shape == (1, 4, VOCAB)


def test_wrapping_a_backbone_twice():
    model = PrefAlignForCausalLM.from_base(make_tiny_base("llama"))
    with pytest.raises(TypeError, match="already a PrefAlignForCausalLM"):
        PrefAlignForCausalLM.from_base(model)


def test_gradient_checkpointing_is_refused():
    # Checkpointed layers would drop the cache that carries the latent prefix.
    model = PrefAlignForCausalLM.from_base(make_tiny_base("llama"))
    with pytest.raises(ValueError):
        model.activation_checkpointing_enable()
