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

    Prompt i is sampled under seed `seed + seed_offset + i` for every model, so the models differ only by themselves.
    """
    samples = samples or args.samples_per_prompt
    responses = []
    for index, ids in enumerate(prompt_ids):
        input_ids = torch.tensor([ids] * samples)
        torch.manual_seed(args.seed + seed_offset + index)
        out = generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=True,
            top_k=50,
            top_p=1.0,
            temperature=1.0,
            max_new_tokens=args.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        rows = []
        for sequence in out[:, len(ids) :].tolist():
            if tokenizer.eos_token_id in sequence:
                sequence = sequence[: sequence.index(tokenizer.eos_token_id) + 1]
            rows.append([t for t in sequence if t != tokenizer.pad_token_id or t == tokenizer.eos_token_id])
        responses.append(rows)
    return responses


@torch.no_grad()
def base_perplexity(base: PreTrainedModel, prompt_ids: list[list[int]], responses: list[list[list[int]]]) -> float:
    """Perplexity of the responses under the plain base model, conditioned on their prompts (all tokens pooled)."""
    total, count = 0.0, 0
    for ids, rows in zip(prompt_ids, responses, strict=True):
        rows = [r for r in rows if r]
        if not rows:
            continue
        width = len(ids) + max(map(len, rows))
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, -100)
        for i, response in enumerate(rows):
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
