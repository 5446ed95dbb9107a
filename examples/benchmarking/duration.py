"""Estimating the duration: a short calibration of the base on this machine and the estimate per stage."""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from benchmarking.arguments import BenchmarkArguments
from benchmarking.measuring import median_seconds
from benchmarking.methods import METHODS
from hf_prefalign.data.prompts import tokenize_prompt


def rows_per_call(args: BenchmarkArguments, samples: int) -> int:
    """Rows of one sampling call with `samples` responses per prompt (whole prompts, at least one)."""
    return max(1, args.generation_batch_size // samples) * samples


@torch.no_grad()
def calibrate(
    base: PreTrainedModel,
    tokenizer: Tokenizer,
    prompt: Any,
    args: BenchmarkArguments,
    response_tokens: float | None = None,
) -> dict[str, Any]:
    """Time a forward, a forward + backward and short generations of the base on this machine (some seconds).

    `response_tokens` is the mean length of the pool's responses (a reused pool); else `pool_max_new_tokens`, which
    sampled responses mostly reach. A DPO step's cost grows with it, so the estimate uses the pairs' real length.
    """
    prompt_ids = tokenize_prompt(tokenizer, prompt)
    length = len(prompt_ids) + round(response_tokens or args.pool_max_new_tokens)  # a pair's sequence
    row = (prompt_ids * (length // len(prompt_ids) + 1))[:length]
    batch = torch.tensor([row] * (2 * args.batch_size))

    def forward() -> None:
        base(input_ids=batch)

    def forward_backward() -> None:  # the activations' gradients through every layer: what a PEFT step back-propagates
        with torch.enable_grad():
            embeds = base.get_input_embeddings()(batch).detach().requires_grad_()
            base(inputs_embeds=embeds).logits.float().logsumexp(-1).mean().backward()

    forward_seconds = median_seconds(forward, 2)[0]
    forward_backward_seconds = median_seconds(forward_backward, 1)[0]

    def generation(rows: int, new_tokens: int) -> float:
        ids = torch.tensor([prompt_ids] * rows)
        kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
        return median_seconds(lambda: base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs), 1)[
            0
        ]

    decode = {}
    sample_counts = {args.samples_per_prompt, args.validation_samples, args.best_of * args.samples_per_prompt}
    for rows in sorted({1, 8, args.serving_users} | {rows_per_call(args, n) for n in sample_counts}):
        one, five = generation(rows, 1), generation(rows, 5)
        decode[rows] = {"prefill": one, "step": max(five - one, 0.0) / 4}
    return {
        "forward_seconds": forward_seconds,
        "forward_backward_seconds": forward_backward_seconds,
        "forward_rows": 2 * args.batch_size,
        "sequence_length": length,
        "base_dtype": str(next(base.parameters()).dtype).removeprefix("torch."),
        "decode": decode,
    }


def estimate_seconds(args: BenchmarkArguments, calib: dict[str, Any], num_layers: int) -> dict[str, float]:
    """Rough duration of each stage from the calibration (the per-step costs of the real work scale the same way)."""
    decode = calib["decode"]

    def gen(rows: int, tokens: int) -> float:
        return decode[rows]["prefill"] + tokens * decode[rows]["step"]

    per_row = calib["forward_seconds"] / calib["forward_rows"]  # one sequence, forward only
    train_prompts, users = args.num_train_prompts, len(args.users)
    responses = train_prompts * args.num_responses
    max_pairs = 2 * train_prompts  # an upper bound: tied pairs are left out
    budget_pairs = [min(b, max_pairs) for b in args.budget_list]
    steps = [math.ceil(p / args.batch_size) * args.num_train_epochs for p in budget_pairs]
    # A DPO step on 2 x batch sequences: the policy's forward + backward, and the reference's forward.
    dpo_step = calib["forward_backward_seconds"] + calib["forward_seconds"]
    trl_runs = len(args.lora_learning_rate_list) + 1  # the LoRA grid, and prefix-tuning DPO

    def evaluate(prompts: int, samples: int) -> float:  # sampling in calls of whole prompts, then perplexity
        rows = rows_per_call(args, samples)
        calls = math.ceil(prompts * samples / rows)
        return calls * gen(rows, args.max_new_tokens) + prompts * samples * per_row

    test_evals = len(METHODS)
    validation_evals = len(args.lora_learning_rate_list) + len(args.caa_multiplier_list) * len(
        args.caa_layer_list or [0, 0]
    )
    estimate = {
        # 8 prompts x K responses per generate call, taken as K times an 8-row call (linear in the rows)
        "pool": 0.0
        if args.pool
        else math.ceil(train_prompts / 8) * args.num_responses * gen(8, args.pool_max_new_tokens),
        # NLL pass with backward (~3 forwards) plus one forward per contrastive negative (3), per response
        "clap": 0.0 if args.backbone else args.clap_epochs * responses * 6 * per_row,
        "latent_cache": (responses + train_prompts) * per_row * 2 / max(num_layers, 1),
        "latent_dpo": users * len(steps) * (args.latent_repeats + 1) * 1.0 + users * sum(steps) * 0.01,
        "trl_dpo": users * sum(trl_runs * args.baseline_repeats * (3.0 + n * dpo_step) for n in steps),
        # CAA's activation pass (2 sequences per pair) and from examples' encoder pass (2 per pair, cached pool)
        "caa_and_examples": users * sum(2 * p * per_row * 2 for p in budget_pairs),
        "evaluation": users * len(steps) * test_evals * evaluate(args.num_heldout, args.samples_per_prompt)
        + users * len(steps) * validation_evals * evaluate(args.num_validation, args.validation_samples)
        + 2 * evaluate(args.num_heldout, args.samples_per_prompt)
        + evaluate(args.num_heldout, args.best_of * args.samples_per_prompt),
        "serving": (args.serving_repeats + 1)
        * (
            3 * gen(args.serving_users, args.serving_max_new_tokens)
            + 2 * args.serving_users * gen(1, args.serving_max_new_tokens)
        ),
    }
    estimate["total"] = sum(estimate.values())
    return estimate


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"
