"""Constants and plain helpers shared by the tests (imported as `from helpers import ...`; fixtures are in conftest.py).

The tiny models and tokenizers themselves are built by `hf_prefalign.testing`.
"""

from __future__ import annotations

import os

import torch
from datasets import Dataset

from hf_prefalign.testing import TINY_VOCAB_SIZE


VOCAB = TINY_VOCAB_SIZE
LATENT_DIM = 8

# The paper's design (token-embedding encoder blocks, key/value prefix), kept as an option beside the defaults.
PAPER_DESIGN = {"encoder_type": "blocks", "adapter_type": "prefix"}


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


def run_in_forked_child(work) -> int:
    """Fork; the child runs `work()` and exits with 0 if it returned (1 if it raised), skipping the parent's cleanup
    (as a process killed mid-write would). Returns the child's pid, for `os.waitpid` or `os.kill`."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            work()
            code = 0
        finally:
            os._exit(code)
    return pid
