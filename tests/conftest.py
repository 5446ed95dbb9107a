"""Tiny, randomly initialised base models built in code (no download), one per supported family."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hf_prefalign import PrefAlignForCausalLM


VOCAB = 96
LATENT_DIM = 8

# Tiny models run fastest on one thread, and a second OpenMP thread spinning on a busy core slows every small op by
# orders of magnitude when anything else runs on the machine.
torch.set_num_threads(1)


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


# The paper's design (token-embedding encoder blocks, key/value prefix), kept as an option beside the defaults.
PAPER_DESIGN = {"encoder_type": "blocks", "adapter_type": "prefix"}


@pytest.fixture
def backbone(base: PreTrainedModel) -> PrefAlignForCausalLM:
    return PrefAlignForCausalLM.from_base(base, latent_dim=LATENT_DIM).eval()


@pytest.fixture
def paper_backbone(base: PreTrainedModel) -> PrefAlignForCausalLM:
    return PrefAlignForCausalLM.from_base(base, latent_dim=LATENT_DIM, **PAPER_DESIGN).eval()


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


CHAT_TEMPLATE = (
    "{% for message in messages %}<bos> {{ message['role'] }} {{ message['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<bos> assistant {% endif %}"
)


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary: <pad>, <bos>, <eos>, user, assistant, w5 ... w95."""
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "user": 3, "assistant": 4, **{f"w{i}": i for i in range(5, VOCAB)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def random_words(generator: torch.Generator, low: int = 3, high: int = 8) -> str:
    length = int(torch.randint(low, high, (1,), generator=generator))
    return " ".join(f"w{int(i)}" for i in torch.randint(5, VOCAB, (length,), generator=generator))


def make_tiny_pool(num_prompts: int = 6, num_responses: int = 4, seed: int = 0, chat: bool = False) -> Dataset:
    """A response pool of random word sequences (chat-message prompts when `chat`)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_prompts):
        text = random_words(generator)
        prompt = [{"role": "user", "content": text}] if chat else text
        rows.append({"prompt": prompt, "responses": [random_words(generator) for _ in range(num_responses)]})
    return Dataset.from_list(rows)


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tiny_tokenizer()
