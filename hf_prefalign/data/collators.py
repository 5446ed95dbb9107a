"""Collators: turn tokenized dataset rows into padded tensors."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.utils import pad


@dataclass
class DataCollatorForResponseGroups:
    """Flattens prompt groups into one batch of prompt + response sequences.

    Each feature is one prompt with all its responses (`prompt_input_ids`: `list[int]`, `responses_input_ids`:
    `list[list[int]]`, responses ending with EOS). Because a dataset row is a whole group, any sampler (shuffled,
    distributed, with gradient accumulation) yields whole groups: no stateful wrapper is needed.

    With `max_responses`, a group larger than that contributes a subset of its responses (bounding the cost of a
    step; contrastive negatives still come from the same prompt). The subset is a pseudo-random function of `seed`
    and the prompt, so it is the same in every epoch and after resuming.

    Returns `input_ids`, `attention_mask` and `labels` of shape `(N, T)` (right padding with TRL's `pad`; prompt
    tokens and padding labelled -100) and `group_index` `(N,)`, the position of each sequence's prompt in the batch.

    Example:

    ```python
    >>> collator = DataCollatorForResponseGroups(pad_token_id=0)
    >>> batch = collator([{"prompt_input_ids": [5, 6], "responses_input_ids": [[7, 2], [8, 9, 2]]}])
    >>> batch["input_ids"]
    tensor([[5, 6, 7, 2, 0],
            [5, 6, 8, 9, 2]])
    >>> batch["labels"]
    tensor([[-100, -100,    7,    2, -100],
            [-100, -100,    8,    9,    2]])
    >>> batch["group_index"]
    tensor([0, 0])
    ```
    """

    pad_token_id: int
    label_pad_token_id: int = -100
    max_responses: int | None = None
    seed: int = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences, labels, groups = [], [], []
        for group, feature in enumerate(features):
            prompt = list(feature["prompt_input_ids"])
            responses = feature["responses_input_ids"]
            if self.max_responses is not None and len(responses) > self.max_responses:
                # A subset drawn from a generator seeded by (seed, prompt): stateless, so shuffling, distributed
                # sampling and resuming from a checkpoint (where batches are prefetched) all see the same subset.
                generator = torch.Generator().manual_seed(
                    self.seed * 1_000_003 + zlib.crc32(bytes(str(prompt), "utf8"))
                )
                chosen = torch.randperm(len(responses), generator=generator)[: self.max_responses].sort().values
                responses = [responses[int(i)] for i in chosen]
            for response in responses:
                sequences.append(prompt + list(response))
                labels.append([self.label_pad_token_id] * len(prompt) + list(response))
                groups.append(group)
        sequences = [torch.tensor(seq, dtype=torch.long) for seq in sequences]
        return {
            "input_ids": pad(sequences, padding_value=self.pad_token_id),
            "attention_mask": pad([torch.ones_like(seq) for seq in sequences], padding_value=0),
            "labels": pad(
                [torch.tensor(lab, dtype=torch.long) for lab in labels], padding_value=self.label_pad_token_id
            ),
            "group_index": torch.tensor(groups, dtype=torch.long),
        }


__all__ = ["DataCollatorForResponseGroups"]
