"""Prompts: rendering (plain text or chat messages) and the bundled chat prompt set."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase


Prompt = str | list[dict[str, Any]]


def is_conversational(prompt: Any) -> bool:
    """True for a TRL conversational prompt: a list of `{"role": ..., "content": ...}` messages."""
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> str:
    """The text the model reads for `prompt`: chat messages go through the tokenizer's chat template with the
    generation prompt appended; plain text is used as is. Pools and trainers share this one function, so a
    response is always scored under the prompt it was sampled for."""
    if is_conversational(prompt):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "The prompt is a list of chat messages, but the tokenizer has no chat template. Use plain-text "
                "prompts or a tokenizer with a chat template."
            )
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if isinstance(prompt, str):
        return prompt
    raise TypeError(
        f"A prompt must be a string or a list of chat messages, got {type(prompt).__name__}: {prompt!r:.80}"
    )


def tokenize_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """Token ids of the rendered prompt (a chat template already holds its special tokens)."""
    text = render_prompt(tokenizer, prompt)
    return tokenizer(text, add_special_tokens=not is_conversational(prompt))["input_ids"]


def tokenize_response(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a response as the model is trained on it: no special tokens, then EOS."""
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no EOS token; responses must end with one.")
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def response_text(response: Any) -> str:
    """A response as plain text: TRL conversational completions are lists holding one assistant message."""
    if isinstance(response, str):
        return response
    if is_conversational(response):
        return "".join(m["content"] for m in response if m["role"] == "assistant") or response[-1]["content"]
    raise TypeError(f"A response must be a string or a list of chat messages, got {type(response).__name__}.")


def context_limit(config: Any) -> int | None:
    """The most positions a model config allows (`max_position_embeddings`, GPT-2's `n_positions`, ...), if known."""
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_bundled_prompts() -> Dataset:
    """The bundled chat prompt set: 360 short open-ended user prompts in TRL's conversational format, with a
    `category` column. The last 10% are meant as a held-out split."""
    text = resources.files("hf_prefalign.resources").joinpath("prompts.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return Dataset.from_list(rows)


__all__ = [
    "is_conversational",
    "load_bundled_prompts",
    "render_prompt",
    "response_text",
    "tokenize_prompt",
    "tokenize_response",
]
