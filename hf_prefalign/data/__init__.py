"""The data path: prompts -> response pools -> tokenized groups -> padded batches."""

from .collators import DataCollatorForResponseGroups
from .pools import (
    ResponsePoolConfig,
    as_response_pool,
    build_response_pool,
    load_response_pool,
    save_response_pool,
)
from .prompts import is_conversational, load_bundled_prompts, render_prompt, response_text, tokenize_prompt


__all__ = [
    "DataCollatorForResponseGroups",
    "ResponsePoolConfig",
    "as_response_pool",
    "build_response_pool",
    "is_conversational",
    "load_bundled_prompts",
    "load_response_pool",
    "render_prompt",
    "response_text",
    "save_response_pool",
    "tokenize_prompt",
]
