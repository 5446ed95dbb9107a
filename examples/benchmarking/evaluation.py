"""Generation and evaluation: sampled responses with fixed seeds, base perplexity, reward and distinct-2."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from benchmarking.arguments import BenchmarkArguments
from benchmarking.measuring import distinct_n, stats


# Seeds of the sampled evaluations: prompt i of a split is sampled under seed + offset + i for every model.
TEST_SEED_OFFSET, VALIDATION_SEED_OFFSET = 1000, 5000


def prompt_chunks(num_prompts: int, rows_per_prompt: int, rows_per_call: int) -> list[range]:
    """Consecutive prompts grouped so that each group's rows (`rows_per_prompt` each) fit in `rows_per_call`."""
    per_call = max(1, rows_per_call // rows_per_prompt)
    return [range(first, min(first + per_call, num_prompts)) for first in range(0, num_prompts, per_call)]


@torch.no_grad()
def sample_responses(
    generate: Callable[..., torch.Tensor],
    prompt_ids: list[list[int]],
    tokenizer: Tokenizer,
    args: BenchmarkArguments,
    samples: int | None = None,
    seed_offset: int = TEST_SEED_OFFSET,
) -> list[list[list[int]]]:
    """`samples` (default `samples_per_prompt`) sampled responses per prompt (token ids up to and including EOS).

    The prompts are drawn in groups of `generation_batch_size` rows (left-padded), the group that starts at prompt
    i under seed `seed + seed_offset + i`: every model is sampled in the same batches under the same seeds, so the
    models differ only by themselves.
    """
    samples = samples or args.samples_per_prompt
    responses = []
    for chunk in prompt_chunks(len(prompt_ids), samples, args.generation_batch_size):
        width = max(len(prompt_ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk) * samples, width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for position, index in enumerate(chunk):
            ids = prompt_ids[index]
            rows = slice(position * samples, (position + 1) * samples)
            input_ids[rows, width - len(ids) :] = torch.tensor(ids)
            attention_mask[rows, width - len(ids) :] = 1
        torch.manual_seed(args.seed + seed_offset + chunk.start)
        out = generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=True,
            top_k=50,
            top_p=1.0,
            temperature=1.0,
            max_new_tokens=args.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        rows = []
        for sequence in out[:, width:].tolist():
            if tokenizer.eos_token_id in sequence:
                sequence = sequence[: sequence.index(tokenizer.eos_token_id) + 1]
            rows.append([t for t in sequence if t != tokenizer.pad_token_id or t == tokenizer.eos_token_id])
        responses.extend(rows[position * samples : (position + 1) * samples] for position in range(len(chunk)))
    return responses


@torch.no_grad()
def base_perplexity(
    base: PreTrainedModel, prompt_ids: list[list[int]], responses: list[list[list[int]]], rows_per_call: int = 48
) -> float:
    """Perplexity of the responses under the plain base model, conditioned on their prompts (all tokens pooled).

    Sequences of several prompts go through one forward pass, right-padded, `rows_per_call` at most.
    """
    sequences = [
        (ids, response) for ids, rows in zip(prompt_ids, responses, strict=True) for response in rows if response
    ]
    total, count = 0.0, 0
    for first in range(0, len(sequences), rows_per_call):
        batch = sequences[first : first + rows_per_call]
        width = max(len(ids) + len(response) for ids, response in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, -100)
        for i, (ids, response) in enumerate(batch):
            end = len(ids) + len(response)
            input_ids[i, :end] = torch.tensor(ids + response)
            attention_mask[i, :end] = 1
            labels[i, len(ids) : end] = torch.tensor(response)
        logits = base(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int((target != -100).sum())
    return math.exp(total / max(count, 1))


def evaluate_generations(
    responses: list[list[list[int]]],
    tokenizer: Tokenizer,
    scorers: dict[str, Any],
    perplexity: float,
) -> dict[str, Any]:
    texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for rows in responses for r in rows]
    return {
        "reward": {name: stats(scorer(texts).tolist()) for name, scorer in scorers.items()},
        "perplexity": perplexity,
        "distinct_2": distinct_n(texts),
        "mean_words": sum(len(t.split()) for t in texts) / max(len(texts), 1),
        "examples": texts[:2],
    }
