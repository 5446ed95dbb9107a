"""Quick mode: a tiny random Llama and a word-level English tokenizer, built in code, and random prompts."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from hf_prefalign.testing import make_tiny_base, make_word_level_tokenizer


# The builders are hf_prefalign.testing's; the vocabulary is the benchmark's own (the unit tests' is w5...w95): the
# simulated users need real words, so that VADER and word counts give different scores to different responses.
QUICK_WORDS = (
    "good great love happy nice wonderful best fun excellent glad bad awful hate sad terrible poor worst angry ugly "
    "boring the a cat dog park rain day food city river book music tea walk house car tree sun"
).split()
QUICK_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "user", "assistant"]
# Skipped when decoding, so the word count of a response varies although an untrained model rarely samples EOS.
QUICK_FILLERS = [f"<f{i}>" for i in range(10)]


def make_quick_tokenizer() -> Tokenizer:
    vocab = QUICK_SPECIALS + QUICK_FILLERS + QUICK_WORDS
    return make_word_level_tokenizer(vocab, unk_token="<unk>", extra_special_tokens=QUICK_FILLERS)


def make_quick_base(vocab_size: int, seed: int = 0) -> PreTrainedModel:
    """A 3-layer Llama (SmolLM2's family) with GQA, hidden size 32."""
    return make_tiny_base("llama", seed, vocab_size=vocab_size, pad_token_id=0)


def make_quick_prompts(num: int, seed: int) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num):
        length = int(torch.randint(3, 7, (1,), generator=generator))
        words = [QUICK_WORDS[int(i)] for i in torch.randint(0, len(QUICK_WORDS), (length,), generator=generator)]
        rows.append({"prompt": [{"role": "user", "content": " ".join(words)}]})
    return Dataset.from_list(rows)
