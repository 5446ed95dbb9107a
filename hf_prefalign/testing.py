"""Tiny models and tokenizers built in code, for tests and examples (as `transformers.testing_utils`).

Nothing is downloaded: the base models are randomly initialised (seeded, so the same call gives the same weights),
and the tokenizers are word-level over a given vocabulary with a plain chat template. The test suite
(`tests/conftest.py`) and the examples' `--tiny` / quick modes build their stand-ins here, so a model in a test and
in an example is the same model. Only transformers, tokenizers and torch are imported.

Example:

```python
>>> from hf_prefalign.testing import make_tiny_base, make_tiny_tokenizer
>>> base, tokenizer = make_tiny_base("qwen2"), make_tiny_tokenizer()
>>> tokenizer.apply_chat_template([{"role": "user", "content": "w5 w6"}], tokenize=False, add_generation_prompt=True)
'<bos> user w5 w6 <eos> <bos> assistant '

```
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedModel, PreTrainedTokenizerFast


TINY_VOCAB_SIZE = 96
"""Vocabulary size of [`make_tiny_base`] and [`make_tiny_tokenizer`]: `<pad>`, `<bos>`, `<eos>`, `user`,
`assistant`, then the words `w5` ... `w95`."""

TINY_FAMILIES = ("gpt2", "llama", "qwen2")
"""The families [`make_tiny_base`] builds: one without GQA (GPT-2), SmolLM2's (Llama), and Qwen2."""

CHAT_TEMPLATE = (
    "{% for message in messages %}<bos> {{ message['role'] }} {{ message['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<bos> assistant {% endif %}"
)
"""The chat template of the tiny tokenizers: `<bos> role content <eos>` per message, word-level friendly."""


def make_tiny_base(
    family: str = "llama",
    seed: int = 0,
    *,
    vocab_size: int = TINY_VOCAB_SIZE,
    num_hidden_layers: int = 3,
    pad_token_id: int | None = None,
) -> PreTrainedModel:
    """A randomly initialised causal LM of `family` with hidden size 32, in eval mode.

    GQA (4 query / 2 key-value heads) where the family has it; `<bos>` = 1 and `<eos>` = 2, as in the tiny
    tokenizers. The weights depend only on the arguments (the global torch seed is set to `seed` first).

    Args:
        family (`str`, *optional*, defaults to `"llama"`): one of [`TINY_FAMILIES`].
        seed (`int`, *optional*, defaults to 0): seed of the random initialisation.
        vocab_size (`int`, *optional*, defaults to [`TINY_VOCAB_SIZE`]): size of the embedding table.
        num_hidden_layers (`int`, *optional*, defaults to 3): decoder layers.
        pad_token_id (`int`, *optional*): set in the config (Llama and Qwen2 then zero that embedding row).
    """
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    if family not in TINY_FAMILIES:
        raise ValueError(f"Unknown tiny model family {family!r}; choose from {', '.join(TINY_FAMILIES)}.")
    padding = {} if pad_token_id is None else {"pad_token_id": pad_token_id}
    torch.manual_seed(seed)
    if family == "gpt2":
        config = GPT2Config(
            n_embd=32,
            n_layer=num_hidden_layers,
            n_head=4,
            vocab_size=vocab_size,
            n_positions=128,
            bos_token_id=1,
            eos_token_id=2,
            **padding,
        )
        return GPT2LMHeadModel(config).eval()
    sizes = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab_size,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **padding,
    }
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**sizes, tie_word_embeddings=True)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**sizes)).eval()


def make_word_level_tokenizer(
    vocab: dict[str, int] | Sequence[str],
    *,
    unknown: str = "<unk>",
    lowercase: bool = False,
    split_punctuation: bool = False,
    chat_template: str | None = CHAT_TEMPLATE,
    **special_tokens: str | list[str],
) -> PreTrainedTokenizerFast:
    """A fast tokenizer mapping each whitespace-separated word of `vocab` to one id (other words to `unknown`).

    Args:
        vocab (`dict[str, int]` or `list[str]`): token -> id, or the tokens in id order.
        unknown (`str`, *optional*, defaults to `"<unk>"`): the token an unknown word becomes (it must be in
            `vocab`; pass `unk_token` too to make it the tokenizer's `unk_token`).
        lowercase (`bool`, *optional*, defaults to `False`): lower-case the text first.
        split_punctuation (`bool`, *optional*, defaults to `False`): split punctuation from words (`"day?"` ->
            `"day"`, `"?"`), as `tokenizers`' `Whitespace` pre-tokenizer; otherwise split on whitespace only.
        chat_template (`str`, *optional*, defaults to [`CHAT_TEMPLATE`]): the tokenizer's chat template.
        **special_tokens: passed to `PreTrainedTokenizerFast` (`pad_token`, `bos_token`, `eos_token` default to
            `<pad>`, `<bos>`, `<eos>`; `unk_token`, `extra_special_tokens`, ...).
    """
    if not isinstance(vocab, dict):
        vocab = {token: index for index, token in enumerate(vocab)}
    backend = Tokenizer(WordLevel(vocab, unk_token=unknown))
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace() if split_punctuation else pre_tokenizers.WhitespaceSplit()
    special_tokens = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", **special_tokens}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens)
    tokenizer.chat_template = chat_template
    return tokenizer


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The word-level tokenizer of [`make_tiny_base`]'s vocabulary: `<pad>`, `<bos>`, `<eos>`, `user`, `assistant`,
    `w5` ... `w95` (an unknown word becomes `<pad>`), with [`CHAT_TEMPLATE`]."""
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "user": 3, "assistant": 4}
    vocab.update({f"w{i}": i for i in range(5, TINY_VOCAB_SIZE)})
    return make_word_level_tokenizer(vocab, unknown="<pad>")


__all__ = [
    "CHAT_TEMPLATE",
    "TINY_FAMILIES",
    "TINY_VOCAB_SIZE",
    "make_tiny_base",
    "make_tiny_tokenizer",
    "make_word_level_tokenizer",
]
