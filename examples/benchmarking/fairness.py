"""Fairness: every method's trainer settings, and the checks that all see the same pairs for the same epochs."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from datasets import Dataset

from benchmarking.arguments import BenchmarkArguments
from hf_prefalign.data.latent_cache import normalize_preference_dataset
from hf_prefalign.data.prompts import is_conversational


# Per-method overrides may not touch these: they would change which pairs a method sees or for how long.
UNFAIR_OVERRIDES = {"max_steps", "max_length", "truncation_mode", "max_prompt_length", "max_completion_length"}


def method_config_kwargs(
    args: BenchmarkArguments, method: str, output_dir: str, learning_rate: float | None = None
) -> dict[str, Any]:
    """The trainer config fields of `method` (`LatentDPOConfig` for ours, `DPOConfig` for TRL), overrides applied.

    `learning_rate` sets LoRA-DPO's point of its grid (default: the grid's first).
    """
    learning_rates = {
        "latent_dpo": args.latent_learning_rate,
        "lora_dpo": learning_rate if learning_rate is not None else args.lora_learning_rate_list[0],
        "prefix_dpo": args.prefix_learning_rate,
    }
    kwargs: dict[str, Any] = {
        "output_dir": output_dir,
        "num_train_epochs": args.num_train_epochs,
        "per_device_train_batch_size": args.batch_size,
        "learning_rate": learning_rates[method],
        "beta": args.beta,
        "seed": args.seed,
        "use_cpu": True,
        "bf16": False,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "logging_steps": 5,
    }
    if method == "latent_dpo":
        kwargs["latent_cache_dir"] = "none"  # the benchmark shares one in-memory cache and times its building
    else:
        # No truncation (every method sees whole pairs), no checkpointing of activations (a CPU run has the memory).
        kwargs.update(max_length=None, activation_checkpointing=False)
    kwargs.update(args.overrides().get(method, {}))
    return kwargs


def check_fair_comparison(plans: dict[str, dict[str, Any]]) -> None:
    """Refuse settings under which the methods would not see the same pairs for the same number of epochs.

    Args:
        plans (`dict[str, dict]`): per method, its trainer settings (`num_train_epochs`, optionally `max_steps` and
            `overridden`, the keys overridden for it; none for methods with no training loop, CAA and from
            examples) and, once known, `pairs` (a fingerprint of its pairs).

    Raises:
        `ValueError`: naming the methods and values that differ, and what to change.
    """
    for method, plan in plans.items():
        touched = sorted(UNFAIR_OVERRIDES & set(plan.get("overridden", ())))
        if touched:
            raise ValueError(
                f"Unfair comparison: --method_overrides sets {touched} for {method}, which changes how many pairs "
                "or steps it trains on. Every method must train on the same pairs for the same number of epochs; "
                "remove those keys."
            )
        if (plan.get("max_steps") or -1) > 0:
            raise ValueError(
                f"Unfair comparison: {method} has max_steps={plan['max_steps']}, which would stop it before its "
                "epochs end. Use --num_train_epochs, which applies to every method."
            )
    epochs = {method: float(plan["num_train_epochs"]) for method, plan in plans.items() if "num_train_epochs" in plan}
    if len(set(epochs.values())) > 1:
        found = ", ".join(f"{m}={e:g}" for m, e in epochs.items())
        raise ValueError(
            f"Unfair comparison: the methods would train for different numbers of epochs ({found}). Every method "
            "must see the same pairs for the same number of epochs: set --num_train_epochs and remove "
            "`num_train_epochs` from --method_overrides."
        )
    pairs = {method: plan["pairs"] for method, plan in plans.items() if "pairs" in plan}
    if len(set(pairs.values())) > 1:
        found = ", ".join(f"{m}={p[:12]}" for m, p in pairs.items())
        raise ValueError(
            f"Unfair comparison: the methods would train on different preference pairs (fingerprints {found}). "
            "Every method must get the pairs built once per user from the shared pool."
        )


def pairs_fingerprint(dataset: Dataset) -> str:
    """SHA-256 of a preference dataset's (prompt, chosen, rejected) texts, whatever its format (standard or chat)."""
    prompts, chosen, rejected = normalize_preference_dataset(dataset)
    digest = hashlib.sha256()
    for row in zip(prompts, chosen, rejected, strict=True):
        digest.update(json.dumps(row, sort_keys=True).encode())
    return digest.hexdigest()


def to_trl_format(pairs: Dataset) -> Dataset:
    """The pairs as TRL reads them: with chat prompts, chosen / rejected become one assistant message each."""
    rows = []
    for row in pairs:
        chat = is_conversational(row["prompt"])
        wrap = (lambda text: [{"role": "assistant", "content": text}]) if chat else (lambda text: text)
        rows.append({"prompt": row["prompt"], "chosen": wrap(row["chosen"]), "rejected": wrap(row["rejected"])})
    return Dataset.from_list(rows)
