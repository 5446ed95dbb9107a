"""Benchmark v2: per-user alignment with Latent DPO against LoRA-DPO, prefix-tuning DPO and CAA, in one run.

Same base model, same preference pairs, same epochs, same machine, same run. In order:

1. one-time costs, shared by every user: the response pool (sampled from the base, or `--pool`), the CLaP backbone
   (trained, or `--backbone`) and, for Latent DPO only, the latent cache (the frozen encoder over the pool);
2. simulated users (real scorers from `hf_prefalign.scorers`), each with preference pairs built from the pool
   (`preference_pairs_from_pool`: best vs 2nd worst, 2nd best vs worst), identical for every method;
3. per user and pair budget (`--budgets`, the first N pairs), each method: Latent DPO (ours, `LatentDPOTrainer`);
   LoRA-DPO (TRL `DPOTrainer` + PEFT `LoraConfig`, r=8, alpha=8, attention projections, beta 0.1), its learning rate
   chosen per user and budget on the validation prompts from `--lora_learning_rates`; prefix-tuning DPO (TRL
   `DPOTrainer` + PEFT `PrefixTuningConfig`, 4 virtual tokens); CAA (a steering vector: mean chosen minus rejected
   residual stream, added by a forward pre-hook; layer and multiplier chosen on the validation prompts); and
   `PreferenceEmbedding.from_examples` (chosen responses liked, rejected ones disliked, no training). TRL handles the
   reference as it does for PEFT: the adapter is disabled, no copy of the model. Validation prompts are disjoint from
   the reported (test) prompts; selection keeps the best validation reward within +15% of the base's perplexity;
4. per user, method and budget: the per-user "training" time (`trainer.train()` only, median of `--latent_repeats`
   runs for Latent DPO, of `--baseline_repeats` for the others; CAA: its activation pass; from examples: the encoder
   pass), peak resident memory during it, reward on the test prompts (mean, std, n) from generations of the aligned
   model, perplexity of those generations under the base model, distinct-2, and the size of the per-user artefact on
   disk; the neutral models' reward and perplexity; and a best-of-4 oracle ceiling (4 base samples per slot reranked
   by the user's own scorer: it needs the reward at inference, so it is reported apart and is in no target);
5. serving: tokens/s of one greedy batch mixing 64 users (one preference id per row) against PEFT's mixed-adapter
   LoRA inference (`adapter_names=` per row, 64 adapters in one `PeftModel`), the base alone and users one after
   another;
6. `docs/benchmarks/results.json` (machine, versions, settings, every figure, the sample-efficiency curves, the
   targets met or missed), `docs/benchmarks.md` (a table per budget, selections, ratios, targets) and the plots
   `docs/benchmarks/reward_vs_time.png` (log time axis) and `docs/benchmarks/sample_efficiency.png`.

Usage (the full run loads SmolLM2-135M-Instruct with `hf_prefalign.load_default_base()`; it prints an estimate of
its duration before it starts):

    python examples/benchmark.py                                   # build pool + backbone, then everything
    python examples/benchmark.py --pool outputs/benchmark/pool --backbone outputs/benchmark/backbone   # reuse them
    python examples/benchmark.py --estimate_only                   # print the estimate and stop
    python examples/benchmark.py --quick --output_dir /tmp/bench   # tiny random model, every code path, ~1 min

`--quick` runs on a tiny randomly initialised Llama and a word-level English tokenizer built in code; its numbers
mean nothing, and it never writes under docs/. Run with `OMP_NUM_THREADS` set to the cores you want to use.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset
from steering_baselines import caa_generate, caa_vectors_for
from transformers import AutoTokenizer, HfArgumentParser, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

import hf_prefalign
from hf_prefalign import (
    CLaPConfig,
    CLaPTrainer,
    LatentCache,
    LatentDPOConfig,
    LatentDPOTrainer,
    PrefAlignForCausalLM,
    ResponsePoolConfig,
    build_response_pool,
    load_base_model,
    load_bundled_prompts,
    load_response_pool,
    save_response_pool,
)
from hf_prefalign.data.latent_cache import normalize_preference_dataset
from hf_prefalign.data.pairs import preference_pairs_from_pool
from hf_prefalign.data.prompts import is_conversational, tokenize_prompt
from hf_prefalign.scorers import get_scorer
from hf_prefalign.testing import make_tiny_base, make_word_level_tokenizer
from hf_prefalign.utils.constants import EMBEDDED_DEFAULT_BASE


REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS_DIR = REPO_ROOT / "docs"

# Methods, in the order they are run and reported; each runs per user at every pair budget.
METHODS = {
    "latent_dpo": "Latent DPO (ours)",
    "lora_dpo": "LoRA-DPO (lr chosen on validation)",
    "prefix_dpo": "prefix-tuning DPO",
    "caa": "CAA steering vector",
    "from_examples": "from examples (ours, no training)",
}
TRL_METHODS = ("lora_dpo", "prefix_dpo")
# Methods trained by a trainer for `num_train_epochs` (the others read the pairs once, with no gradient step).
EPOCH_METHODS = ("latent_dpo", *TRL_METHODS)
# Ceilings that need the user's reward at inference: reported apart, never part of a target.
ORACLES = {"best_of_4": "best-of-4 oracle (reranked by the user's own reward at inference)"}
# Figures recorded for every (user, method); the test checks that each is present.
FIGURE_KEYS = (
    "train_seconds",
    "train_seconds_all",
    "steps",
    "peak_rss_mb",
    "rss_increase_mb",
    "reward",
    "perplexity",
    "distinct_2",
    "artefact_bytes",
    "weights_bytes",
    "trainable_parameters",
)
SERVING_KEYS = ("ours_mixed_batch", "ours_sequential", "lora_mixed_batch", "lora_sequential", "base_batch")
FULL_USERS = ("positive", "negative", "concise", "detailed", "questioning", "structured")
# Per-method overrides may not touch these: they would change which pairs a method sees or for how long.
UNFAIR_OVERRIDES = {"max_steps", "max_length", "truncation_mode", "max_prompt_length", "max_completion_length"}


# ----------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------
@dataclass
class BenchmarkArguments:
    r"""
    Settings of the benchmark. Sizes left unset take the full run's default or, with `--quick`, a tiny one.

    > Run

    Args:
        quick (`bool`, *optional*, defaults to `False`):
            Tiny randomly initialised model, every code path in seconds; never writes under docs/.
        output_dir (`str`, *optional*):
            Where results.json, benchmarks.md and the plot go. Default: docs/benchmarks/ (and docs/benchmarks.md) for
            the full run, a new temporary folder for `--quick`.
        work_dir (`str`, *optional*):
            Pool, backbone, adapters and trainer folders. Default: outputs/benchmark (quick: `<output_dir>/work`).
        estimate_only (`bool`, *optional*, defaults to `False`): print the estimated duration and stop.
        seed (`int`, *optional*, defaults to 0): random seed of every trainer and of the sampled generations.

    > One-time artefacts

    Args:
        pool (`str`, *optional*): a saved response pool to reuse (its last `num_heldout` prompts are held out).
        backbone (`str`, *optional*): a saved CLaP backbone to reuse (its base must be the frozen base model).
        num_train_prompts (`int`, *optional*): prompts whose responses make the pairs (default 128, i.e. at most 256
            pairs, the largest budget; quick 6).
        num_heldout (`int`, *optional*): held-out (test) prompts, the reported ones (default 16, quick 3).
        num_validation (`int`, *optional*): validation prompts, disjoint from the training and test prompts, on which
            LoRA-DPO's learning rate and CAA's layer and multiplier are chosen (default 16, quick 2).
        num_responses (`int`, *optional*): responses per prompt in a sampled pool (default 8, quick 4).
        pool_max_new_tokens (`int`, *optional*): response length in a sampled pool (default 40, quick 10).
        clap_epochs (`float`, *optional*, defaults to 1.0): CLaP epochs when the backbone is trained here.
        clap_learning_rate (`float`, *optional*, defaults to 1e-4): CLaP learning rate (`CLaPConfig`'s default).

    > Users and training (shared by every method)

    Args:
        users (`list[str]`, *optional*): scorers, one per user (default the six of docs/preference_space.md:
            positive, negative, concise, detailed, questioning, structured; quick: positive, negative, concise).
        budgets (`str`, *optional*): comma-separated pair budgets; every method runs per user on the first N pairs
            at each (default "16,64,256", quick "4,8"). A budget above a user's pairs uses them all.
        num_train_epochs (`float`, *optional*, defaults to 1.0): epochs over the user's pairs, for every method.
        batch_size (`int`, *optional*): pairs per optimizer step, for every method (default 8, quick 4).
        beta (`float`, *optional*, defaults to 0.1): DPO temperature, for every method.

    > Methods

    Args:
        latent_learning_rate (`float`, *optional*, defaults to 5e-3): Latent DPO learning rate.
        latent_repeats (`int`, *optional*): timed runs of Latent DPO per user; the median is reported (default 5,
            quick 2).
        baseline_repeats (`int`, *optional*, defaults to 1): timed runs of each TRL method per user.
        lora_r (`int`, *optional*, defaults to 8): LoRA rank.
        lora_alpha (`int`, *optional*, defaults to 8): LoRA alpha.
        lora_target_modules (`list[str]`, *optional*, defaults to `["q_proj", "k_proj", "v_proj", "o_proj"]`):
            attention projections that get LoRA adapters.
        lora_learning_rates (`str`, *optional*): comma-separated LoRA-DPO learning rates; one is chosen per user and
            budget on the validation prompts (default "1e-5,5e-5,2e-4,5e-4", the paper's 1e-5 included; quick
            "1e-5,5e-4").
        prefix_num_virtual_tokens (`int`, *optional*, defaults to 4): prefix length of prefix-tuning DPO.
        prefix_learning_rate (`float`, *optional*, defaults to 1e-3): prefix-tuning DPO learning rate.
        prefix_init (`str`, *optional*, defaults to `"eos"`): `"eos"` starts the prefix as the base's own keys and
            values for EOS tokens (the real-token initialisation of prefix tuning, close to the base); `"random"`
            keeps PEFT's N(0, 1) initialisation.
        caa_layers (`str`, *optional*): comma-separated decoder layers CAA may steer at (default: a quarter and
            half of the depth, e.g. 8,15 for 30 layers).
        caa_multipliers (`str`, *optional*, defaults to `"2,4,8"`): comma-separated CAA multipliers.
        caa_max_length (`int`, *optional*, defaults to 1024): prompt + response tokens CAA reads per sequence.
        method_overrides (`str`, *optional*): JSON object of per-method trainer config overrides, e.g.
            `'{"prefix_dpo": {"learning_rate": 1e-4}}'`. Overrides that change epochs, steps or truncation
            are refused.

    > Evaluation and serving

    Args:
        samples_per_prompt (`int`, *optional*): sampled responses per held-out prompt (default 8, quick 2).
        validation_samples (`int`, *optional*): sampled responses per validation prompt (default 2, quick 2).
        perplexity_budget (`float`, *optional*, defaults to 1.15): validation selection keeps settings whose
            perplexity is at most this times the base's (else the lowest-perplexity one).
        best_of (`int`, *optional*, defaults to 4): base samples per slot the oracle reranks.
        max_new_tokens (`int`, *optional*): length of evaluation responses (default 40, quick 6).
        serving_users (`int`, *optional*): users (rows) in the serving batch (default 64, quick 8).
        serving_max_new_tokens (`int`, *optional*): tokens generated per row when serving (default 32, quick 4).
        serving_repeats (`int`, *optional*): timed serving runs after one warm-up; median (default 3, quick 1).
    """

    # Run
    quick: bool = field(default=False, metadata={"help": "Tiny random model, every code path in seconds."})
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where results go (default: docs/benchmarks for the full run, a temp folder for --quick)."},
    )
    work_dir: str | None = field(
        default=None, metadata={"help": "Pool, backbone, adapters (default outputs/benchmark; quick: output/work)."}
    )
    estimate_only: bool = field(default=False, metadata={"help": "Print the estimated duration and stop."})
    seed: int = field(default=0, metadata={"help": "Random seed of every trainer and of sampled generations."})
    # One-time artefacts
    pool: str | None = field(default=None, metadata={"help": "A saved response pool to reuse."})
    backbone: str | None = field(default=None, metadata={"help": "A saved CLaP backbone to reuse."})
    num_train_prompts: int | None = field(
        default=None, metadata={"help": "Prompts whose responses make the pairs (default 128, quick 6)."}
    )
    num_heldout: int | None = field(default=None, metadata={"help": "Held-out test prompts (default 16, quick 3)."})
    num_validation: int | None = field(
        default=None, metadata={"help": "Validation prompts for the selections (default 16, quick 2)."}
    )
    num_responses: int | None = field(
        default=None, metadata={"help": "Responses per prompt in a sampled pool (default 8, quick 4)."}
    )
    pool_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Response length in a sampled pool (default 40, quick 10)."}
    )
    clap_epochs: float = field(default=1.0, metadata={"help": "CLaP epochs when the backbone is trained here."})
    clap_learning_rate: float = field(default=1e-4, metadata={"help": "CLaP learning rate."})
    # Users and shared training settings
    users: list[str] | None = field(
        default=None, metadata={"help": "Scorers, one per user (default six; quick: positive negative concise)."}
    )
    budgets: str | None = field(
        default=None, metadata={"help": "Comma-separated pair budgets per user (default 16,64,256; quick 4,8)."}
    )
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the pairs, for every method."})
    batch_size: int | None = field(
        default=None, metadata={"help": "Pairs per step, for every method (default 8, quick 4)."}
    )
    beta: float = field(default=0.1, metadata={"help": "DPO temperature, for every method."})
    # Methods
    latent_learning_rate: float = field(default=5e-3, metadata={"help": "Latent DPO learning rate."})
    latent_repeats: int | None = field(
        default=None, metadata={"help": "Timed Latent DPO runs per user, median reported (default 5, quick 2)."}
    )
    baseline_repeats: int = field(default=1, metadata={"help": "Timed runs of each TRL method per user."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=8, metadata={"help": "LoRA alpha."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "Attention projections that get LoRA adapters."},
    )
    lora_learning_rates: str | None = field(
        default=None,
        metadata={"help": "Comma-separated LoRA-DPO lr grid, chosen on validation (default 1e-5,5e-5,2e-4,5e-4)."},
    )
    prefix_num_virtual_tokens: int = field(default=4, metadata={"help": "Prefix length of prefix-tuning DPO."})
    prefix_learning_rate: float = field(default=1e-3, metadata={"help": "Prefix-tuning DPO learning rate."})
    prefix_init: Literal["eos", "random"] = field(
        default="eos",
        metadata={"help": "'eos': the base's own keys/values of EOS tokens; 'random': PEFT's N(0, 1) init."},
    )
    caa_layers: str | None = field(
        default=None, metadata={"help": "Comma-separated CAA layers (default: a quarter and half of the depth)."}
    )
    caa_multipliers: str = field(default="2,4,8", metadata={"help": "Comma-separated CAA multipliers."})
    caa_max_length: int = field(default=1024, metadata={"help": "Tokens CAA reads per sequence."})
    method_overrides: str | None = field(
        default=None,
        metadata={"help": "JSON object of per-method trainer config overrides (epochs/steps/truncation refused)."},
    )
    # Evaluation and serving
    samples_per_prompt: int | None = field(
        default=None, metadata={"help": "Sampled responses per held-out prompt (default 8, quick 2)."}
    )
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "Length of evaluation responses (default 40, quick 6)."}
    )
    validation_samples: int | None = field(
        default=None, metadata={"help": "Sampled responses per validation prompt (default 2, quick 2)."}
    )
    perplexity_budget: float = field(
        default=1.15, metadata={"help": "Selections keep settings within this times the base's perplexity."}
    )
    best_of: int = field(default=4, metadata={"help": "Base samples per slot the oracle reranks."})
    serving_users: int | None = field(
        default=None, metadata={"help": "Users (rows) in the serving batch (default 64, quick 8)."}
    )
    serving_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Tokens per row when serving (default 32, quick 4)."}
    )
    serving_repeats: int | None = field(
        default=None, metadata={"help": "Timed serving runs after a warm-up, median (default 3, quick 1)."}
    )

    def __post_init__(self) -> None:
        sizes = {  # name: (full, quick)
            "num_train_prompts": (128, 6),
            "num_heldout": (16, 3),
            "num_validation": (16, 2),
            "validation_samples": (2, 2),
            "num_responses": (8, 4),
            "pool_max_new_tokens": (40, 10),
            "batch_size": (8, 4),
            "latent_repeats": (5, 2),
            "samples_per_prompt": (8, 2),
            "max_new_tokens": (40, 6),
            "serving_max_new_tokens": (32, 4),
            "serving_users": (64, 8),
            "serving_repeats": (3, 1),
        }
        for name, (full, quick) in sizes.items():
            if getattr(self, name) is None:
                setattr(self, name, quick if self.quick else full)
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}.")
        for name in ("baseline_repeats", "lora_r", "prefix_num_virtual_tokens", "best_of"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}.")
        if self.num_responses < 4:
            raise ValueError(f"Preference pairs need at least 4 responses per prompt, got {self.num_responses}.")
        if self.num_train_epochs <= 0:
            raise ValueError(f"`num_train_epochs` must be positive, got {self.num_train_epochs}.")
        if self.users is None:
            self.users = ["positive", "negative", "concise"] if self.quick else list(FULL_USERS)
        if isinstance(self.users, str):
            self.users = [self.users]
        if self.budgets is None:
            self.budgets = "4,8" if self.quick else "16,64,256"
        if self.lora_learning_rates is None:
            self.lora_learning_rates = "1e-5,5e-4" if self.quick else "1e-5,5e-5,2e-4,5e-4"
        self.budget_list = _number_list("budgets", self.budgets, int)
        self.lora_learning_rate_list = _number_list("lora_learning_rates", self.lora_learning_rates, float)
        self.caa_multiplier_list = _number_list("caa_multipliers", self.caa_multipliers, float)
        self.caa_layer_list = _number_list("caa_layers", self.caa_layers, int) if self.caa_layers else None
        if self.budget_list != sorted(set(self.budget_list)):
            raise ValueError(f"`budgets` must be distinct and increasing, got {self.budgets!r}.")
        if self.perplexity_budget < 1:
            raise ValueError(f"`perplexity_budget` must be at least 1, got {self.perplexity_budget}.")
        if not self.users or len(set(self.users)) != len(self.users):
            raise ValueError(f"`users` must name distinct scorers, got {self.users}.")
        if self.pool is not None and self.pool.lower() == "none":
            self.pool = None
        if self.backbone is not None and self.backbone.lower() == "none":
            self.backbone = None
        if self.quick and self.output_dir is not None and _is_inside(Path(self.output_dir), DOCS_DIR):
            raise ValueError(
                f"--quick writes numbers that mean nothing; it refuses to write under docs/ (got --output_dir "
                f"{self.output_dir}). Pick a temporary folder, or leave --output_dir out."
            )

    def overrides(self) -> dict[str, dict[str, Any]]:
        """`method_overrides` parsed and checked: a dict per method name."""
        if not self.method_overrides:
            return {}
        try:
            raw = json.loads(self.method_overrides)
        except json.JSONDecodeError as err:
            raise ValueError(f"`method_overrides` is not valid JSON ({err}): {self.method_overrides!r}") from err
        if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
            raise ValueError(
                'The `method_overrides` must be a JSON object of objects, e.g. \'{"lora_dpo": {"learning_rate": '
                f"1e-4}}}}', got {self.method_overrides!r}."
            )
        unknown = sorted(set(raw) - set(EPOCH_METHODS))
        if unknown:
            raise ValueError(
                f"Unknown or untrained method(s) {unknown} in `method_overrides`; expected some of "
                f"{list(EPOCH_METHODS)} (CAA and from examples have no trainer config)."
            )
        if "learning_rate" in raw.get("lora_dpo", {}):
            raise ValueError(
                "LoRA-DPO's learning rate is chosen on the validation prompts from --lora_learning_rates; set that grid "
                "(one value to fix it) instead of `learning_rate` in `method_overrides`."
            )
        return raw


def _number_list(name: str, text: str, kind: type) -> list:
    """A comma-separated flag as a list of positive numbers; a `ValueError` naming the flag otherwise."""
    try:
        values = [kind(part) for part in str(text).split(",") if part.strip()]
    except ValueError as err:
        raise ValueError(f"`{name}` must be comma-separated numbers, e.g. '16,64,256'; got {text!r}.") from err
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"`{name}` must list positive numbers, got {text!r}.")
    return values


def _is_inside(path: Path, folder: Path) -> bool:
    return path.resolve() == folder.resolve() or folder.resolve() in path.resolve().parents


def make_parser() -> HfArgumentParser:
    return HfArgumentParser(BenchmarkArguments, description=__doc__.splitlines()[0])


# ----------------------------------------------------------------------
# Fairness: same pairs, same epochs
# ----------------------------------------------------------------------
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


# ----------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------
def _rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # ru_maxrss (KiB on Linux) is the process peak, the best available without psutil
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak resident set size of this process while a block runs, sampled every `interval` seconds by a thread."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def figures(self) -> dict[str, float]:
        return {"peak_rss_mb": self.peak / 2**20, "rss_increase_mb": (self.peak - self.start) / 2**20}


def stats(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation, count and standard error of the mean."""
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n, "se": std / math.sqrt(n) if n else float("nan")}


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Unique n-grams / all n-grams over a set of texts (whitespace tokens)."""
    grams = [tuple(words[i : i + n]) for text in texts for words in [text.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def folder_bytes(path: Path) -> tuple[int, int]:
    """Bytes of every file in a saved artefact folder, and of its safetensors weights alone."""
    files = [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files), sum(f.stat().st_size for f in files if f.suffix == ".safetensors")


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def timed_train(trainer: Any) -> tuple[Any, float, dict[str, float]]:
    """`trainer.train()`, its wall time and the process's peak memory during it.

    The garbage collector's current objects are frozen first (`gc.freeze()`), the same for every method: the
    `Trainer` runs a full `gc.collect()` when training starts, whose cost grows with everything this benchmark process
    holds (models, pools, other users' trainers) and is not part of aligning one user.
    """
    gc.collect()
    gc.freeze()
    try:
        with PeakMemory() as peak:
            start = time.perf_counter()
            result = trainer.train()
            seconds = time.perf_counter() - start
    finally:
        gc.unfreeze()
    return result, seconds, peak.figures


def median_seconds(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    """Run `fn` once to warm up, then `repeats` timed times; the median and every time."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


# ----------------------------------------------------------------------
# Quick mode: a tiny random Llama and a word-level English tokenizer, built in code
# ----------------------------------------------------------------------
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


# ----------------------------------------------------------------------
# Setting up: base, tokenizer, prompts, pool, backbone
# ----------------------------------------------------------------------
@dataclass
class Setup:
    base_reference: str
    tokenizer: Tokenizer
    train_pool: Dataset | None = None
    heldout_prompts: list[Any] = field(default_factory=list)
    backbone: PrefAlignForCausalLM | None = None
    one_time: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    def load_base(self) -> PreTrainedModel:
        """A fresh copy of the base model (PEFT methods wrap it in place, so each run starts from its own copy)."""
        return load_base_model(self.base_reference).eval()


def _prompt_key(prompt: Any) -> str:
    return json.dumps(prompt, sort_keys=True)


def resolve_base(args: BenchmarkArguments, work: Path) -> tuple[str, Tokenizer]:
    """The base model reference every method starts from, and its tokenizer."""
    if args.backbone is not None:
        config = json.loads((Path(args.backbone) / "config.json").read_text(encoding="utf-8"))
        if config.get("base_included"):
            raise ValueError(
                f"The backbone at {args.backbone} carries a fine-tuned copy of its base (CLaP with an unfrozen LM), so "
                "LoRA-DPO and prefix-tuning DPO would start from a different model than Latent DPO. Use a backbone "
                "trained with the base frozen (the default CLaP recipe), or leave --backbone out."
            )
        reference = config.get("base_model_name_or_path")
        if not reference:
            raise ValueError(f"The backbone at {args.backbone} does not name its base model.")
        if (Path(args.backbone) / "tokenizer_config.json").is_file():
            return reference, AutoTokenizer.from_pretrained(args.backbone)
    elif args.quick:
        reference = str(work / "tiny-base")
        tokenizer = make_quick_tokenizer()
        make_quick_base(len(tokenizer), seed=args.seed).save_pretrained(reference)
        tokenizer.save_pretrained(reference)
        return reference, tokenizer
    else:
        reference = EMBEDDED_DEFAULT_BASE
    if reference == EMBEDDED_DEFAULT_BASE:
        from hf_prefalign import load_default_base

        _, tokenizer = load_default_base()
        return reference, tokenizer
    return reference, AutoTokenizer.from_pretrained(reference)


def split_prompts(args: BenchmarkArguments) -> tuple[Dataset | None, list[Any], list[Any], list[Any], str]:
    """(reused pool or None, training prompts, validation prompts, held-out test prompts, where they come from).

    The last `num_heldout` prompts of the source (a reused pool, else the bundled prompt set) are the test prompts,
    the `num_validation` before them the validation prompts (selections only); the first `num_train_prompts` of the
    rest make the pairs. The three sets are checked to be disjoint.
    """
    if args.pool is not None:
        pool = load_response_pool(args.pool)
        prompts, source = list(pool["prompt"]), f"pool {args.pool}"
    else:
        pool = None
        if args.quick:
            prompts, source = list(make_quick_prompts(40, args.seed)["prompt"]), "random tiny-vocabulary prompts"
        else:
            prompts, source = list(load_bundled_prompts()["prompt"]), "bundled prompt set"
    held = args.num_heldout + args.num_validation
    if len(prompts) <= held:
        raise ValueError(
            f"The {source} has {len(prompts)} prompts; {args.num_heldout} test and {args.num_validation} validation "
            "prompts are held out, which leaves none to train on."
        )
    heldout = prompts[-args.num_heldout :]
    validation = prompts[-held : -args.num_heldout]
    train = prompts[: min(args.num_train_prompts, len(prompts) - held)]
    keys = {name: {_prompt_key(p) for p in part} for name, part in (("test", heldout), ("validation", validation))}
    keys["training"] = {_prompt_key(p) for p in train}
    for first, second in (("test", "training"), ("test", "validation"), ("validation", "training")):
        overlap = keys[first] & keys[second]
        if overlap:
            raise ValueError(
                f"{len(overlap)} {first} prompt(s) also appear among the {second} prompts of the {source}."
            )
    if pool is not None:
        pool = pool.select(range(len(train)))
    return pool, train, validation, heldout, source


def check_same_base(backbone: PrefAlignForCausalLM, base: PreTrainedModel) -> None:
    """The baselines start from `base`; the backbone's frozen base must hold exactly the same weights."""
    ours, theirs = backbone.get_base_model().state_dict(), base.state_dict()
    if ours.keys() != theirs.keys() or not all(torch.equal(ours[k], theirs[k]) for k in ours):
        raise ValueError(
            "The backbone's base model differs from the base the LoRA / prefix baselines start from; the comparison "
            "needs the same base model. Use a backbone trained on this base with the base frozen."
        )


# ----------------------------------------------------------------------
# Estimating the duration
# ----------------------------------------------------------------------
@torch.no_grad()
def calibrate(base: PreTrainedModel, tokenizer: Tokenizer, prompt: Any, args: BenchmarkArguments) -> dict[str, Any]:
    """Time a few forward passes and short generations of the base on this machine (a few seconds)."""
    prompt_ids = tokenize_prompt(tokenizer, prompt)
    length = len(prompt_ids) + args.pool_max_new_tokens  # a prompt + response of the pairs, at most
    row = (prompt_ids * (length // len(prompt_ids) + 1))[:length]
    batch = torch.tensor([row] * (2 * args.batch_size))

    def forward() -> None:
        base(input_ids=batch)

    forward_seconds = median_seconds(forward, 2)[0]

    def generation(rows: int, new_tokens: int) -> float:
        ids = torch.tensor([prompt_ids] * rows)
        kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
        return median_seconds(lambda: base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs), 1)[
            0
        ]

    decode = {}
    for rows in sorted(
        {1, 8, args.samples_per_prompt, args.validation_samples, args.best_of * args.samples_per_prompt}
        | {args.serving_users}
    ):
        one, five = generation(rows, 1), generation(rows, 5)
        decode[rows] = {"prefill": one, "step": max(five - one, 0.0) / 4}
    return {
        "forward_seconds": forward_seconds,
        "forward_rows": 2 * args.batch_size,
        "sequence_length": length,
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
    # A DPO step: policy forward + backward (about 3 forwards) and the reference forward, on 2 x batch sequences.
    dpo_step = 4 * calib["forward_seconds"]
    trl_runs = len(args.lora_learning_rate_list) + 1  # the LoRA grid, and prefix-tuning DPO

    def evaluate(prompts: int, samples: int) -> float:
        return prompts * (gen(samples, args.max_new_tokens) + samples * per_row)

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


# ----------------------------------------------------------------------
# Generation and evaluation
# ----------------------------------------------------------------------
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


# ----------------------------------------------------------------------
# Training: Latent DPO (ours) and the TRL baselines
# ----------------------------------------------------------------------
def training_figures(
    times: list[float], result: Any, memory: dict[str, float], directory: Path, model: torch.nn.Module, lr: float
) -> dict[str, Any]:
    """The figures every method records for one user: time, steps, memory, artefact size, parameters, loss."""
    total, weights = folder_bytes(directory)
    return {
        "train_seconds": statistics.median(times),
        "train_seconds_all": times,
        "steps": result.global_step,
        **memory,
        "artefact_bytes": total,
        "weights_bytes": weights,
        "trainable_parameters": trainable_parameters(model),
        "final_loss": result.training_loss,
        "learning_rate": lr,
        "train_runtime_reported_by_trainer": result.metrics.get("train_runtime"),
    }


def train_latent_dpo(
    setup: Setup, cache: LatentCache, user: str, pairs: Dataset, args: BenchmarkArguments, work: Path, tag: str = ""
) -> tuple[dict[str, Any], Path]:
    """`latent_repeats` identical runs (same seed); the median training-loop time, the embedding saved once.

    `tag` names the run's folders (the pair budget), under `work/runs/<user>/` and `work/users/<user>/`.
    """
    kwargs = method_config_kwargs(args, "latent_dpo", str(work / "runs" / user / tag / "latent_dpo"))
    times, memory, trainer, result = [], {}, None, None
    for _ in range(args.latent_repeats):
        trainer = LatentDPOTrainer(
            setup.backbone,
            LatentDPOConfig(**kwargs),
            train_dataset=pairs,
            processing_class=setup.tokenizer,
            latent_cache=cache,
        )
        result, seconds, figures = timed_train(trainer)
        times.append(seconds)
        memory = memory or figures  # the first run's: later runs reuse memory the first one allocated
    directory = work / "users" / user / tag / "latent_dpo"
    trainer.save_preference(directory)
    figures = training_figures(times, result, memory, directory, trainer.model, kwargs["learning_rate"])
    figures.update(
        {
            "cache_seconds_this_user": trainer.cache_seconds,
            "encoder_sequences_this_user": trainer.cache_sequences_encoded,
        }
    )
    return figures, directory


def init_prefix_from_tokens(model: Any, token_id: int) -> None:
    """Start a PEFT prefix as the base model's own keys and values for `num_virtual_tokens` copies of `token_id`.

    Prefix tuning's real-token initialisation (Li & Liang, 2021): the prefixed model starts as the base reading those
    tokens first, instead of attending to N(0, 1) keys and values, which puts it far from the base (and from the DPO
    reference) before the first step. The prefix keys are computed at positions 0..P-1, where the cache puts them.
    """
    config = model.peft_config[model.active_adapter]
    if config.prefix_projection or config.num_transformer_submodules != 1:
        raise ValueError("init_prefix_from_tokens supports plain prefixes of decoder-only models only.")
    embedding = model.prompt_encoder[model.active_adapter].embedding.weight  # (P, L * 2 * H_kv * D)
    num_tokens, num_layers = config.num_virtual_tokens, config.num_layers
    heads = config.num_attention_heads
    head_dim = config.token_dim // heads
    ids = torch.full((1, num_tokens), token_id, dtype=torch.long, device=embedding.device)
    with torch.no_grad():
        cache = model.get_base_model()(input_ids=ids, use_cache=True).past_key_values
        prefix = torch.empty(num_tokens, num_layers * 2, heads, head_dim, device=embedding.device)  # (P, L*2, H, D)
        for layer in range(num_layers):
            prefix[:, 2 * layer] = cache.layers[layer].keys[0].transpose(0, 1)  # (H, P, D) -> (P, H, D)
            prefix[:, 2 * layer + 1] = cache.layers[layer].values[0].transpose(0, 1)
        embedding.copy_(prefix.reshape(num_tokens, -1).to(embedding.dtype))


# Workaround, PEFT 0.21.2 with transformers 5.24: generation now passes the KV cache as `cache`, while PEFT's
# `prepare_inputs_for_generation` still injects the prefix as `past_key_values`; the model then uses `cache` and drops
# the prefix ("Both `past_key_values` and `cache` are set ... ignoring deprecated `past_key_values`"), so a prefix-tuned
# model decodes like its base. Training is not affected (PEFT's `forward` passes the prefix alone). Remove once PEFT
# injects the prefix under `cache` (`check_prefix_generation` below then reports PEFT's generate as different from
# the base).
@torch.no_grad()
def generate_with_prefix(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> Any:
    """`generate` for a PEFT prefix-tuning model with its prefix in place; returns prompt + new tokens like `generate`.

    The prefix `(B, H_kv, P, D)` per layer goes in as a prefilled cache in front of P placeholder tokens (never read:
    their positions are already cached), and the attention mask covers it, so real tokens sit at positions P, P+1, ...
    exactly as in PEFT's training forward, also in left-padded rows.
    """
    num_virtual = model.active_peft_config.num_virtual_tokens
    batch = input_ids.shape[0]
    cache = model.get_prompt(batch)  # DynamicCache holding the prefix
    placeholders = torch.zeros(batch, num_virtual, dtype=input_ids.dtype, device=input_ids.device)
    prefix_mask = torch.ones(batch, num_virtual, dtype=attention_mask.dtype, device=attention_mask.device)
    out = model.get_base_model().generate(
        input_ids=torch.cat([placeholders, input_ids], dim=1),
        attention_mask=torch.cat([prefix_mask, attention_mask], dim=1),
        cache=cache,
        **kwargs,
    )  # (B, P + T + new)
    if isinstance(out, torch.Tensor):
        return out[:, num_virtual:]
    out.sequences = out.sequences[:, num_virtual:]  # return_dict_in_generate=True
    return out


@torch.no_grad()
def check_prefix_generation(model: Any, prompt_ids: list[int]) -> dict[str, float]:
    """How far first-token scores are (max abs difference): PEFT's own `generate` vs the base with the adapter
    disabled, and `generate_with_prefix` vs PEFT's training forward (expected: 0)."""
    ids = torch.tensor([prompt_ids])
    mask = torch.ones_like(ids)
    settings = {"max_new_tokens": 1, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    peft_scores = model.generate(input_ids=ids, attention_mask=mask, **settings).scores[0]
    with model.disable_adapter():
        base_scores = model.generate(input_ids=ids, attention_mask=mask, **settings).scores[0]
    forward_logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    workaround = functools.partial(generate_with_prefix, model)
    workaround_scores = workaround(input_ids=ids, attention_mask=mask, **settings).scores[0]
    return {
        "peft_generate_vs_base": float((peft_scores - base_scores).abs().max()),
        "workaround_generate_vs_training_forward": float((workaround_scores - forward_logits).abs().max()),
        "training_forward_vs_base": float((forward_logits - base_scores).abs().max()),
    }


def train_trl_dpo(
    setup: Setup,
    method: str,
    user: str,
    pairs: Dataset,
    args: BenchmarkArguments,
    work: Path,
    tag: str = "",
    learning_rate: float | None = None,
) -> tuple[dict[str, Any], Path, Any]:
    """TRL `DPOTrainer` with a PEFT adapter on a fresh copy of the base; returns figures, the adapter, the model.

    `tag` names the run's folders (budget, learning rate); `learning_rate` is LoRA-DPO's point of its grid.
    """
    from peft import LoraConfig, PrefixTuningConfig
    from trl import DPOConfig, DPOTrainer

    kwargs = method_config_kwargs(args, method, str(work / "runs" / user / tag / method), learning_rate)
    times, memory, trainer, result = [], {}, None, None
    for _ in range(args.baseline_repeats):
        if trainer is not None:
            del trainer
            gc.collect()
        if method == "prefix_dpo":
            peft_config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.prefix_num_virtual_tokens)
        else:
            peft_config = LoraConfig(
                task_type="CAUSAL_LM",
                r=args.lora_r,
                lora_alpha=args.lora_alpha,
                lora_dropout=0.0,
                target_modules=list(args.lora_target_modules),
            )
        trainer = DPOTrainer(
            model=setup.load_base(),
            args=DPOConfig(**kwargs),
            train_dataset=pairs,
            processing_class=setup.tokenizer,
            peft_config=peft_config,
        )
        if method == "prefix_dpo" and args.prefix_init == "eos":
            init_prefix_from_tokens(trainer.model, setup.tokenizer.eos_token_id)
        result, seconds, figures = timed_train(trainer)
        times.append(seconds)
        memory = memory or figures
    model = trainer.model.eval()
    directory = work / "users" / user / tag / method
    model.save_pretrained(directory)
    logs = [log for log in trainer.state.log_history if "rewards/accuracies" in log]
    figures = training_figures(times, result, memory, directory, model, kwargs["learning_rate"])
    figures.update(
        {
            "rewards_accuracy_last_log": logs[-1]["rewards/accuracies"] if logs else None,
        }
    )
    return figures, directory, model


# ----------------------------------------------------------------------
# Validation selection, CAA, personalisation from examples, the best-of-n oracle
# ----------------------------------------------------------------------
def select_on_validation(
    candidates: list[Any],
    evaluate: Callable[[Any, list[list[int]]], dict[str, float]],
    validation_ids: list[list[int]],
    base_perplexity: float,
    perplexity_budget: float,
) -> tuple[Any, list[dict[str, Any]]]:
    """Pick a setting on the validation prompts: the best reward whose perplexity is within the budget.

    Args:
        candidates (`list`): the settings of the grid (a learning rate, a `(layer, multiplier)` pair, ...).
        evaluate (`Callable`): `evaluate(candidate, validation_ids)` returns `{"reward": float, "perplexity": float}`;
            it is only ever given the validation prompts, never the test prompts.
        validation_ids (`list[list[int]]`): the tokenized validation prompts.
        base_perplexity (`float`): the base model's perplexity on its own validation samples.
        perplexity_budget (`float`): settings whose perplexity exceeds this times `base_perplexity` are skipped; when
            all do, the lowest-perplexity setting is kept.

    Returns:
        `tuple`: the chosen candidate, and the curve (one `{"setting", "reward", "perplexity"}` per candidate).
    """
    curve = []
    for candidate in candidates:
        point = evaluate(candidate, validation_ids)
        curve.append({"setting": candidate, "reward": point["reward"], "perplexity": point["perplexity"]})
    allowed = [i for i, p in enumerate(curve) if p["perplexity"] <= perplexity_budget * base_perplexity]
    if allowed:
        best = max(allowed, key=lambda i: curve[i]["reward"])
    else:
        best = min(range(len(curve)), key=lambda i: curve[i]["perplexity"])
    return candidates[best], curve


def best_of_n_indices(rewards: list[float], n: int) -> list[int]:
    """For consecutive groups of `n` rewards, the index (into `rewards`) of each group's highest one."""
    if len(rewards) % n:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {n}.")
    return [start + max(range(n), key=lambda i: rewards[start + i]) for start in range(0, len(rewards), n)]


def best_of_n_responses(
    candidates: list[list[list[int]]], tokenizer: Tokenizer, scorer: Callable[[list[str]], torch.Tensor], n: int
) -> list[list[list[int]]]:
    """Per prompt, `n` consecutive base samples per slot reranked by `scorer`: the best of each group is kept."""
    out = []
    for rows in candidates:
        texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]
        out.append([rows[i] for i in best_of_n_indices(scorer(texts).tolist(), n)])
    return out


def default_caa_layers(num_layers: int) -> list[int]:
    """A quarter and half of the depth (8 and 15 of 30 layers, as in docs/preference_space.md)."""
    return sorted({min(max(round(num_layers * f), 0), num_layers - 1) for f in (0.25, 0.5)})


def caa_vectors_timed(
    setup: Setup, pairs: Dataset, layers: list[int], args: BenchmarkArguments
) -> tuple[dict[int, torch.Tensor], float, dict[str, float]]:
    """CAA's per-user "training": one activation pass over the pairs (every grid layer read at once), timed."""
    base = setup.backbone.get_base_model()
    gc.collect()
    with PeakMemory() as peak:
        start = time.perf_counter()
        vectors = caa_vectors_for(base, setup.backbone.layout, setup.tokenizer, pairs, layers, args.caa_max_length)
        seconds = time.perf_counter() - start
    return vectors, seconds, peak.figures


def save_caa_vector(vector: torch.Tensor, layer: int, multiplier: float, directory: Path) -> Path:
    """The chosen CAA vector (already multiplied) as one safetensors file, layer and multiplier in its metadata."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "caa_vector.safetensors"
    metadata = {"layer": str(layer), "multiplier": str(multiplier), "method": "caa"}
    save_file({"vector": (multiplier * vector).contiguous().float()}, str(path), metadata=metadata)
    return path


def from_examples_timed(
    setup: Setup, cache: LatentCache, pairs: Dataset, directory: Path
) -> tuple[dict[str, Any], Any]:
    """`PreferenceEmbedding.from_examples` from the pairs (chosen liked, rejected disliked), timed and saved."""
    from hf_prefalign import PreferenceEmbedding

    liked = [{"prompt": row["prompt"], "response": row["chosen"]} for row in pairs]
    disliked = [{"prompt": row["prompt"], "response": row["rejected"]} for row in pairs]
    gc.collect()
    with PeakMemory() as peak:
        start = time.perf_counter()
        embedding = PreferenceEmbedding.from_examples(
            setup.backbone, setup.tokenizer, liked, disliked, latent_cache=cache
        )
        seconds = time.perf_counter() - start
    embedding.save_pretrained(directory)
    total, weights = folder_bytes(directory)
    figures = {
        "train_seconds": seconds,
        "train_seconds_all": [seconds],
        "steps": 0,
        **peak.figures,
        "artefact_bytes": total,
        "weights_bytes": weights,
        "trainable_parameters": sum(p.numel() for p in embedding.parameters()),
        "final_loss": None,
        "learning_rate": None,
    }
    return figures, embedding


# ----------------------------------------------------------------------
# Serving: one batch mixing users, against PEFT mixed-adapter LoRA and users one after another
# ----------------------------------------------------------------------
@torch.no_grad()
def serving_benchmark(
    setup: Setup,
    heldout_ids: list[list[int]],
    embedding_dirs: list[Path],
    lora_dirs: list[Path],
    args: BenchmarkArguments,
) -> dict[str, Any]:
    from peft import PeftModel

    tokenizer, backbone, rows = setup.tokenizer, setup.backbone, args.serving_users
    prompts = [heldout_ids[i % len(heldout_ids)] for i in range(rows)]
    width = max(map(len, prompts))
    input_ids = torch.full((rows, width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(prompts):  # left padding: every row's next token sits in the same column
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        attention_mask[i, width - len(ids) :] = 1
    # Users beyond the trained ones reuse their weights under new names: throughput does not depend on the values.
    names = [f"serve-{i}" for i in range(rows)]
    for i, name in enumerate(names):
        backbone.load_preference(embedding_dirs[i % len(embedding_dirs)], preference_id=name, overwrite=True)
    lora = PeftModel.from_pretrained(setup.load_base(), lora_dirs[0], adapter_name=names[0])
    for i, name in enumerate(names[1:], start=1):
        lora.load_adapter(lora_dirs[i % len(lora_dirs)], adapter_name=name)
    lora.eval()
    new_tokens = args.serving_max_new_tokens
    settings = {
        "do_sample": False,
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
    }

    def row(i: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor([prompts[i]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def ours_mixed() -> None:
        backbone.generate(input_ids=input_ids, attention_mask=attention_mask, preference_id=names, **settings)

    def ours_sequential() -> None:
        for i, name in enumerate(names):
            backbone.generate(**row(i), preference_id=name, **settings)

    def lora_mixed() -> None:
        lora.generate(input_ids=input_ids, attention_mask=attention_mask, adapter_names=names, **settings)

    def lora_sequential() -> None:
        for i, name in enumerate(names):
            lora.set_adapter(name)
            lora.generate(**row(i), **settings)

    def base_batch() -> None:
        with backbone.disable_latent():
            backbone.generate(input_ids=input_ids, attention_mask=attention_mask, **settings)

    runs = {
        "ours_mixed_batch": ours_mixed,
        "ours_sequential": ours_sequential,
        "lora_mixed_batch": lora_mixed,
        "lora_sequential": lora_sequential,
        "base_batch": base_batch,
    }
    results: dict[str, Any] = {"rows": rows, "new_tokens_per_row": new_tokens, "repeats": args.serving_repeats}
    for name, fn in runs.items():
        seconds, all_times = median_seconds(fn, args.serving_repeats)
        results[name] = {
            "seconds": seconds,
            "seconds_all": all_times,
            "tokens_per_second": rows * new_tokens / seconds,
        }
    return results


# ----------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------
def output_paths(args: BenchmarkArguments) -> dict[str, Path]:
    if args.output_dir is None and not args.quick:
        folder = DOCS_DIR / "benchmarks"
        return {
            "json": folder / "results.json",
            "markdown": DOCS_DIR / "benchmarks.md",
            "reward_vs_time": folder / "reward_vs_time.png",
            "sample_efficiency": folder / "sample_efficiency.png",
        }
    folder = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="prefalign-bench-"))
    return {
        "json": folder / "results.json",
        "markdown": folder / "benchmarks.md",
        "reward_vs_time": folder / "reward_vs_time.png",
        "sample_efficiency": folder / "sample_efficiency.png",
    }


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "hf_prefalign": hf_prefalign.__version__}
    for package in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "vaderSentiment", "matplotlib"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def machine() -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "device": "cpu",
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except (ImportError, OSError):
        pass
    return info


def run_benchmark(args: BenchmarkArguments) -> dict[str, Any]:
    """Run the benchmark described by `args`; returns the results (also written to disk)."""
    run_start = time.perf_counter()
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL trainers report usage unless told not to
    # Refuse unfair settings before anything expensive runs.
    plans = {}
    for method in EPOCH_METHODS:
        kwargs = method_config_kwargs(args, method, "unused")
        plans[method] = {**kwargs, "overridden": list(args.overrides().get(method, {}))}
    check_fair_comparison(plans)
    scorers = {name: get_scorer(name) for name in args.users}  # fail early on an unknown scorer
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("[benchmark] matplotlib is not installed: no plots; their data goes into results.json ('plot_data')")
    paths = output_paths(args)
    work = (
        Path(args.work_dir)
        if args.work_dir
        else (paths["json"].parent / "work" if args.quick else REPO_ROOT / "outputs" / "benchmark")
    )
    if not args.estimate_only:
        work.mkdir(parents=True, exist_ok=True)
    mode = "quick" if args.quick else "full"
    print(f"[benchmark] {mode} run; work folder {work}; results to {paths['json'].parent}")

    # Base, prompts, calibration and the estimate
    base_reference, tokenizer = resolve_base(args, work)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    setup = Setup(base_reference=base_reference, tokenizer=tokenizer)
    reused_pool, train_prompts, validation_prompts, heldout_prompts, source = split_prompts(args)
    setup.heldout_prompts = heldout_prompts
    setup.data = {
        "prompt_source": source,
        "train_prompts": len(train_prompts),
        "heldout_prompts": len(heldout_prompts),
        "validation_prompts": len(validation_prompts),
        "samples_per_validation_prompt": args.validation_samples,
        "samples_per_heldout_prompt": args.samples_per_prompt,
    }
    reference_base = setup.load_base()
    calib = calibrate(reference_base, tokenizer, heldout_prompts[0], args)
    estimate = estimate_seconds(args, calib, reference_base.config.num_hidden_layers)
    stages = ", ".join(f"{k} {_minutes(v)}" for k, v in estimate.items() if k != "total")
    print(f"[benchmark] estimated duration: about {_minutes(estimate['total'])} ({stages}); rough, +-50%")
    if args.estimate_only:
        return {"estimate_seconds": estimate, "calibration": calib}

    # 1. One-time: the response pool
    if reused_pool is not None:
        train_pool = reused_pool
        setup.one_time["pool"] = {"reused": args.pool, "seconds": None}
    else:
        print(f"[1/6] pool: sampling {args.num_responses} responses for each of {len(train_prompts)} prompts")
        start = time.perf_counter()
        train_pool = build_response_pool(
            reference_base,
            tokenizer,
            Dataset.from_dict({"prompt": train_prompts}),
            ResponsePoolConfig(
                num_responses=args.num_responses,
                max_new_tokens=args.pool_max_new_tokens,
                batch_size=8,
                seed=args.seed,
            ),
        )
        setup.one_time["pool"] = {"reused": None, "seconds": time.perf_counter() - start}
        save_response_pool(train_pool, work / "pool")
    setup.train_pool = train_pool
    setup.one_time["pool"].update(prompts=len(train_pool), responses=sum(len(r) for r in train_pool["responses"]))

    # 2. One-time: the CLaP backbone
    if args.backbone is not None:
        print(f"[2/6] CLaP: reusing {args.backbone}")
        backbone = PrefAlignForCausalLM.from_pretrained(args.backbone)
        summary = backbone.config.training_summary or {}
        setup.one_time["clap"] = {
            "reused": args.backbone,
            "seconds": None,
            "recorded_train_seconds": summary.get("train_seconds"),
        }
    else:
        print(f"[2/6] CLaP: training the backbone on {len(train_pool)} prompts")
        backbone = PrefAlignForCausalLM.from_base(
            setup.load_base(), tokenizer=tokenizer, **({"latent_dim": 8} if args.quick else {})
        )
        clap_args = CLaPConfig(  # the library's defaults (docs/preference_space.md), PCA start included
            output_dir=str(work / "clap-trainer"),
            learning_rate=args.clap_learning_rate,
            num_train_epochs=args.clap_epochs,
            responses_per_step=4 if args.quick else 8,
            save_strategy="no",
            logging_steps=5,
            seed=args.seed,
            use_cpu=True,
            report_to="none",
            disable_tqdm=True,
        )
        trainer = CLaPTrainer(model=backbone, args=clap_args, train_dataset=train_pool, processing_class=tokenizer)
        start = time.perf_counter()
        trainer.train()
        setup.one_time["clap"] = {"reused": None, "seconds": time.perf_counter() - start}
        del trainer
        backbone.save_pretrained(work / "backbone")
        tokenizer.save_pretrained(work / "backbone")
    backbone.eval()
    setup.one_time["clap"].update(fingerprint=backbone.fingerprint(), latent_dim=backbone.config.latent_dim)
    check_same_base(backbone, reference_base)
    setup.backbone = backbone
    base = backbone.get_base_model()  # frozen and identical to the baselines' starting point: scores perplexity
    del reference_base
    gc.collect()

    # 3. One-time for Latent DPO: the frozen encoder over the pool
    print("[3/6] latent cache: encoding the pool once for every user")
    cache = LatentCache(backbone, tokenizer, cache_dir=None)
    start = time.perf_counter()
    cache.encode_pool(train_pool)
    setup.one_time["latent_cache"] = {"seconds": time.perf_counter() - start, "sequences": cache.encoder_sequences}

    # 4. Users: per pair budget, the same pairs for every method, then each method
    heldout_ids = [tokenize_prompt(tokenizer, p) for p in heldout_prompts]
    validation_ids = [tokenize_prompt(tokenizer, p) for p in validation_prompts]
    evaluation: dict[str, Any] = {}
    print("[4/6] neutral models on the test prompts (and the base on the validation prompts)")
    with backbone.disable_latent():
        responses = sample_responses(backbone.generate, heldout_ids, tokenizer, args)
        validation_base = sample_responses(
            backbone.generate, validation_ids, tokenizer, args, args.validation_samples, VALIDATION_SEED_OFFSET
        )
        # The oracle's candidates: best_of base samples per test slot, reranked per user below.
        oracle_candidates = sample_responses(
            backbone.generate, heldout_ids, tokenizer, args, args.best_of * args.samples_per_prompt
        )
    evaluation["base"] = evaluate_generations(
        responses, tokenizer, scorers, base_perplexity(base, heldout_ids, responses)
    )
    evaluation["base_validation"] = evaluate_generations(
        validation_base, tokenizer, scorers, base_perplexity(base, validation_ids, validation_base)
    )
    responses = sample_responses(backbone.generate, heldout_ids, tokenizer, args)  # z = 0, the prior's mean
    evaluation["latent_z0"] = evaluate_generations(
        responses, tokenizer, scorers, base_perplexity(base, heldout_ids, responses)
    )
    validation_ppl = evaluation["base_validation"]["perplexity"]
    num_layers = base.config.num_hidden_layers
    caa_layers = args.caa_layer_list or default_caa_layers(num_layers)
    if max(caa_layers) >= num_layers:
        raise ValueError(f"`caa_layers` {caa_layers} must be below the base's {num_layers} decoder layers.")
    caa_grid = [(layer, m) for layer in caa_layers for m in args.caa_multiplier_list]

    def test_figures(generate: Callable[..., Any], user: str, scorer: Any) -> dict[str, Any]:
        rows = sample_responses(generate, heldout_ids, tokenizer, args)
        figures = evaluate_generations(rows, tokenizer, {user: scorer}, base_perplexity(base, heldout_ids, rows))
        figures["reward"] = figures["reward"][user]
        return figures

    def validation_point(generate: Callable[..., Any], ids: list[list[int]], scorer: Any) -> dict[str, float]:
        rows = sample_responses(generate, ids, tokenizer, args, args.validation_samples, VALIDATION_SEED_OFFSET)
        texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for group in rows for r in group]
        return {"reward": float(scorer(texts).float().mean()), "perplexity": base_perplexity(base, ids, rows)}

    def caa_generate_with(vector: torch.Tensor, layer: int) -> Callable[..., Any]:
        steer = caa_generate(base, backbone.layout, layer)
        return lambda **kwargs: steer(vector.expand(kwargs["input_ids"].shape[0], -1), **kwargs)

    def lora_on_validation(
        runs: dict[float, Any], user: str, pairs: Dataset, tag: str, scorer: Any, lr: float, ids: list[list[int]]
    ) -> dict[str, float]:
        """Train LoRA-DPO at one learning rate of the grid (kept in `runs`) and score it on the validation prompts."""
        figures, directory, model = train_trl_dpo(setup, "lora_dpo", user, pairs, args, work, f"{tag}/lr-{lr:g}", lr)
        runs[lr] = (figures, directory)
        point = validation_point(model.generate, ids, scorer)
        del model
        gc.collect()
        return point

    def caa_on_validation(
        vectors: dict[int, torch.Tensor], scorer: Any, setting: tuple[int, float], ids: list[list[int]]
    ) -> dict[str, float]:
        layer, multiplier = setting
        return validation_point(caa_generate_with(multiplier * vectors[layer], layer), ids, scorer)

    users: dict[str, Any] = {}
    largest = str(args.budget_list[-1])
    embedding_dirs, lora_dirs = [], []
    for user, scorer in scorers.items():
        all_pairs = preference_pairs_from_pool(train_pool, scorer)
        record: dict[str, Any] = {"pairs_available": len(all_pairs), "budgets": {}}
        for budget in args.budget_list:
            pairs = all_pairs.select(range(min(budget, len(all_pairs))))
            trl_pairs = to_trl_format(pairs)
            fingerprint = pairs_fingerprint(pairs)
            check_fair_comparison(
                {
                    "latent_dpo": {**plans["latent_dpo"], "pairs": fingerprint},
                    **{m: {**plans[m], "pairs": pairs_fingerprint(trl_pairs)} for m in TRL_METHODS},
                    "caa": {"pairs": fingerprint},
                    "from_examples": {"pairs": fingerprint},
                }
            )
            entry: dict[str, Any] = {"budget": budget, "pairs": len(pairs), "pairs_fingerprint": fingerprint}
            entry["methods"] = methods = {}
            tag = f"budget-{budget}"
            print(f"[4/6] user '{user}', budget {budget}: {len(pairs)} pairs")

            # Latent DPO (ours)
            figures, directory = train_latent_dpo(setup, cache, user, pairs, args, work, tag)
            if str(budget) == largest:
                embedding_dirs.append(directory)
            backbone.load_preference(directory, preference_id=user, overwrite=True)
            figures.update(test_figures(functools.partial(backbone.generate, preference_id=user), user, scorer))
            methods["latent_dpo"] = figures

            # LoRA-DPO: one run per learning rate of the grid, the rate chosen on the validation prompts
            lora_runs: dict[float, tuple[dict[str, Any], Path]] = {}
            chosen_lr, curve = select_on_validation(
                args.lora_learning_rate_list,
                functools.partial(lora_on_validation, lora_runs, user, trl_pairs, tag, scorer),
                validation_ids,
                validation_ppl,
                args.perplexity_budget,
            )
            figures, directory = lora_runs[chosen_lr]
            from peft import PeftModel

            model = PeftModel.from_pretrained(setup.load_base(), directory).eval()
            figures.update(test_figures(model.generate, user, scorer))
            figures["selection"] = {"learning_rate": chosen_lr, "validation_curve": curve}
            figures["train_seconds_grid_total"] = sum(f["train_seconds"] for f, _ in lora_runs.values())
            methods["lora_dpo"] = figures
            if str(budget) == largest:
                lora_dirs.append(directory)
            del model
            gc.collect()

            # Prefix-tuning DPO
            figures, directory, model = train_trl_dpo(setup, "prefix_dpo", user, trl_pairs, args, work, tag)
            if "prefix_generation_check" not in setup.one_time:
                setup.one_time["prefix_generation_check"] = check_prefix_generation(model, heldout_ids[0])
            figures.update(test_figures(functools.partial(generate_with_prefix, model), user, scorer))
            methods["prefix_dpo"] = figures
            del model
            gc.collect()

            # CAA: the activation pass is its training; layer and multiplier chosen on the validation prompts
            vectors, seconds, memory = caa_vectors_timed(setup, pairs, caa_layers, args)
            (layer, multiplier), curve = select_on_validation(
                caa_grid,
                functools.partial(caa_on_validation, vectors, scorer),
                validation_ids,
                validation_ppl,
                args.perplexity_budget,
            )
            path = save_caa_vector(vectors[layer], layer, multiplier, work / "users" / user / tag / "caa")
            figures = {
                "train_seconds": seconds,
                "train_seconds_all": [seconds],
                "steps": 0,
                **memory,
                "artefact_bytes": path.stat().st_size,
                "weights_bytes": path.stat().st_size,
                "trainable_parameters": vectors[layer].numel(),
                "final_loss": None,
                "learning_rate": None,
                "selection": {"layer": layer, "multiplier": multiplier, "validation_curve": curve},
            }
            figures.update(test_figures(caa_generate_with(multiplier * vectors[layer], layer), user, scorer))
            methods["caa"] = figures

            # From examples (ours, no training): the encoder over the chosen (liked) and rejected (disliked) responses
            directory = work / "users" / user / tag / "from_examples"
            figures, embedding = from_examples_timed(setup, cache, pairs, directory)
            backbone.load_preference(embedding, preference_id=f"{user}-from-examples", overwrite=True)
            figures.update(
                test_figures(functools.partial(backbone.generate, preference_id=f"{user}-from-examples"), user, scorer)
            )
            methods["from_examples"] = figures
            for method, figures in methods.items():
                figures["gain"] = figures["reward"]["mean"] - evaluation["base"]["reward"][user]["mean"]
                print(f"    {method}: {figures['train_seconds']:.3f} s, reward {figures['reward']['mean']:.3f}")
            record["budgets"][str(budget)] = entry

        # The oracle ceiling: best of `best_of` base samples per slot, by the user's own reward (needs it at inference)
        oracle = best_of_n_responses(oracle_candidates, tokenizer, scorer, args.best_of)
        figures = evaluate_generations(oracle, tokenizer, {user: scorer}, base_perplexity(base, heldout_ids, oracle))
        figures["reward"] = figures["reward"][user]
        figures.update(oracle=True, needs_reward_at_inference=True, samples_reranked=args.best_of)
        record["oracles"] = {"best_of_4": figures}
        users[user] = record

    # 5. Serving
    print(f"[5/6] serving: {args.serving_users} users in one batch, {args.serving_max_new_tokens} tokens per row")
    serving = serving_benchmark(setup, heldout_ids, embedding_dirs, lora_dirs, args)

    # 6. Reports
    results = {
        "mode": mode,
        "base_model": base_reference,
        "machine": machine(),
        "versions": versions(),
        "settings": asdict(args),
        "methods": {
            method: {
                "label": label,
                "learning_rate": None if method == "lora_dpo" else plans.get(method, {}).get("learning_rate"),
            }
            for method, label in METHODS.items()
        },
        "oracles": {name: {"label": label, "oracle": True} for name, label in ORACLES.items()},
        "budgets": args.budget_list,
        "caa_grid": {"layers": caa_layers, "multipliers": args.caa_multiplier_list},
        "lora_learning_rate_grid": args.lora_learning_rate_list,
        "data": setup.data,
        "one_time": setup.one_time,
        "neutral": evaluation,
        "users": users,
        "ratios": ratios(users),
        "sample_efficiency": sample_efficiency(users),
        "serving": serving,
        "estimate_seconds": estimate,
        "calibration": calib,
    }
    results["targets"] = targets(results)
    results["total_seconds"] = time.perf_counter() - run_start
    results["peak_rss_mb_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("[6/6] writing reports")
    write_reports(results, paths, args)
    print(
        f"[benchmark] done in {_minutes(results['total_seconds'])} (estimated {_minutes(estimate['total'])}); "
        f"results in {paths['json']}"
    )
    if args.pool is None or args.backbone is None:
        pool_path, backbone_path = args.pool or work / "pool", args.backbone or work / "backbone"
        print(f"[benchmark] rerun without rebuilding: --pool {pool_path} --backbone {backbone_path}")
    return results


# ----------------------------------------------------------------------
# Ratios, targets, reports
# ----------------------------------------------------------------------
def ratios(users: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Per user and budget: Latent DPO's training time and artefact size over the baselines'."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for user, record in users.items():
        out[user] = {}
        for budget, entry in record["budgets"].items():
            methods = entry["methods"]
            ours = methods["latent_dpo"]
            out[user][budget] = {
                "time_ours_over_lora": ours["train_seconds"] / methods["lora_dpo"]["train_seconds"],
                "time_ours_over_prefix": ours["train_seconds"] / methods["prefix_dpo"]["train_seconds"],
                "time_ours_over_caa": ours["train_seconds"] / methods["caa"]["train_seconds"],
                "size_ours_over_lora": ours["artefact_bytes"] / methods["lora_dpo"]["artefact_bytes"],
                "weights_ours_over_lora": ours["weights_bytes"] / methods["lora_dpo"]["weights_bytes"],
            }
    return out


def sample_efficiency(users: dict[str, Any]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Per user and method, one point per budget: pairs used, reward (mean, se), gain over the base, time."""
    curves: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for user, record in users.items():
        curves[user] = {method: [] for method in METHODS}
        for budget, entry in record["budgets"].items():
            for method, figures in entry["methods"].items():
                curves[user][method].append(
                    {
                        "budget": int(budget),
                        "pairs": entry["pairs"],
                        "reward_mean": figures["reward"]["mean"],
                        "reward_se": figures["reward"]["se"],
                        "gain": figures.get("gain"),
                        "train_seconds": figures["train_seconds"],
                    }
                )
    return curves


def _reward_vs(ours: dict[str, float], other: dict[str, float]) -> tuple[float, float]:
    """Difference of means and its standard error."""
    return ours["mean"] - other["mean"], math.sqrt(ours["se"] ** 2 + other["se"] ** 2)


def _users_needed(count: int, of: int, users: int) -> int:
    """'k of 6 users' for any number of users: the same share, rounded up."""
    return math.ceil(count * users / of)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets (benchmark v2), each with the measured value and whether it was met.

    Reads `results["users"]` (per user: `budgets` -> budget -> `methods`), `results["neutral"]["base"]` and
    `results["serving"]`. The oracle is in no target. Latent DPO's gain over the base is compared with LoRA-DPO's
    and CAA's at the largest budget (the base cancels: gains differ as rewards do).
    """
    users, neutral, serving = results["users"], results["neutral"]["base"], results["serving"]
    num_users = len(users)
    largest = str(max(int(b) for record in users.values() for b in record["budgets"]))
    rows = []

    time_ratios = {
        (user, budget): entry["methods"]["latent_dpo"]["train_seconds"] / entry["methods"]["lora_dpo"]["train_seconds"]
        for user, record in users.items()
        for budget, entry in record["budgets"].items()
    }
    worst_key = max(time_ratios, key=time_ratios.get)
    rows.append(
        {
            "id": "time",
            "target": "per-user training time, Latent DPO / LoRA-DPO <= 0.01, every user and budget",
            "measured": f"worst {time_ratios[worst_key]:.4f} ({worst_key[0]}, {worst_key[1]} pairs)",
            "met": max(time_ratios.values()) <= 0.01,
        }
    )
    for other, label, count, with_se in (("lora_dpo", "LoRA-DPO's - 1 SE", 5, True), ("caa", "CAA's", 4, False)):
        parts, hits = [], 0
        for user, record in users.items():
            methods = record["budgets"][largest]["methods"]
            diff, se = _reward_vs(methods["latent_dpo"]["reward"], methods[other]["reward"])
            ok = diff >= (-se if with_se else 0.0)
            hits += ok
            parts.append(f"{user} {diff:+.3f} +- {se:.3f}{'' if ok else ' (no)'}")
        needed = _users_needed(count, 6, num_users)
        rows.append(
            {
                "id": f"gain_vs_{other}",
                "target": f"Latent DPO gain >= {label}, >= {count} of 6 users, at the largest budget ({largest} pairs)",
                "measured": f"{hits} of {num_users} (needed {needed}): " + "; ".join(parts),
                "met": hits >= needed,
                "users_met": hits,
                "users_needed": needed,
            }
        )
    ppl = {
        (user, budget): entry["methods"]["latent_dpo"]["perplexity"] / neutral["perplexity"]
        for user, record in users.items()
        for budget, entry in record["budgets"].items()
    }
    worst_key = max(ppl, key=ppl.get)
    rows.append(
        {
            "id": "perplexity",
            "target": "Latent DPO perplexity (under the base) within +15% of the base's, every user and budget",
            "measured": f"worst {100 * (ppl[worst_key] - 1):+.1f}% ({worst_key[0]}, {worst_key[1]} pairs)",
            "met": max(ppl.values()) <= 1.15,
        }
    )
    sizes = {
        (user, budget): entry["methods"]["latent_dpo"]["artefact_bytes"]
        / entry["methods"]["lora_dpo"]["artefact_bytes"]
        for user, record in users.items()
        for budget, entry in record["budgets"].items()
    }
    worst = max(sizes.values())
    rows.append(
        {
            "id": "artefact",
            "target": "per-user artefact <= 1/100 of the LoRA adapter (whole saved folders)",
            "measured": f"largest 1/{1 / worst:.0f}",
            "met": worst <= 1 / 100,
        }
    )
    ours, base = serving["ours_mixed_batch"]["tokens_per_second"], serving["base_batch"]["tokens_per_second"]
    lora = serving["lora_mixed_batch"]["tokens_per_second"]
    rows_served = serving.get("rows")
    rows.append(
        {
            "id": "throughput_vs_base",
            "target": f"mixed-user batch throughput ({rows_served} users) >= 0.9x the base alone",
            "measured": f"{ours:.1f} vs {base:.1f} tokens/s ({ours / base:.2f}x)",
            "met": ours >= 0.9 * base,
        }
    )
    rows.append(
        {
            "id": "throughput_vs_lora",
            "target": f"mixed-user batch throughput ({rows_served} users) >= PEFT mixed-adapter LoRA",
            "measured": f"{ours:.1f} vs {lora:.1f} tokens/s ({ours / lora:.2f}x)",
            "met": ours >= lora,
        }
    )
    return rows


def _kb(size: float) -> str:
    return f"{size / 1024:.1f} KB" if size < 2**20 else f"{size / 2**20:.2f} MB"


def _seconds(value: float | None) -> str:
    if value is None:
        return "reused"
    return f"{value:.1f} s" if value >= 10 else f"{value:.2f} s"


def render_markdown(results: dict[str, Any], plot_names: dict[str, str | None]) -> str:
    """The run's figures as a Markdown page (generated; do not edit by hand)."""
    settings, data, one_time = results["settings"], results["data"], results["one_time"]
    m, v = results["machine"], results["versions"]
    lines = ["<!-- generated by examples/benchmark.py; do not edit by hand -->", ""]
    lines.append("# Benchmark v2: Latent DPO vs LoRA-DPO, prefix-tuning DPO and CAA, per user and pair budget")
    lines.append("")
    if results["mode"] == "quick":
        lines += [
            "**Quick mode: a tiny randomly initialised model. The numbers exercise the code and mean nothing.**",
            "",
        ]
    lines += [
        f"Base model `{results['base_model']}`, on {m['processor']} ({m['cpu_count']} cores, torch threads "
        f"{m['torch_threads']}, {m.get('memory_gb', '?')} GB RAM), {m['platform']}; torch {v['torch']}, "
        f"transformers {v['transformers']}, trl {v['trl']}, peft {v['peft']}. One run, one process, same machine.",
        "",
        f"Every method gets the same pairs (per user: from the pool's {data['train_prompts']} training prompts, "
        f"{settings['num_responses']} responses each, pairs best vs 2nd worst and 2nd best vs worst; at each budget "
        f"of {', '.join(map(str, results['budgets']))} pairs, the first N), the trained ones for "
        f"{settings['num_train_epochs']:g} epoch(s), {settings['batch_size']} pairs per step, beta {settings['beta']}. "
        f"Latent DPO lr {settings['latent_learning_rate']:g}; LoRA-DPO (r={settings['lora_r']}, "
        f"alpha={settings['lora_alpha']}, {', '.join(settings['lora_target_modules'])}) with its learning rate chosen "
        f"per user and budget on the validation prompts from {{{settings['lora_learning_rates']}}}; prefix-tuning DPO "
        f"{settings['prefix_learning_rate']:g} ({settings['prefix_num_virtual_tokens']} virtual tokens, init "
        f"'{settings['prefix_init']}'); CAA (mean chosen minus rejected residual stream, added by a forward pre-hook) "
        f"with layer in {results['caa_grid']['layers']} and multiplier in {results['caa_grid']['multipliers']} chosen "
        "on the validation prompts; from examples = `PreferenceEmbedding.from_examples` (chosen responses liked, "
        "rejected disliked, no training). TRL computes the reference of the PEFT methods with the adapter disabled. "
        f"Selections use {data['validation_prompts']} validation prompts x {data['samples_per_validation_prompt']} "
        "samples, disjoint from the test prompts: the best validation reward whose perplexity is within "
        f"{settings['perplexity_budget']:g}x the base's.",
        "",
        f"Evaluation: {data['heldout_prompts']} held-out test prompts ({data['prompt_source']}) x "
        f"{settings['samples_per_prompt']} sampled responses (top-k 50, {settings['max_new_tokens']} new tokens, the "
        "same seeds for every model); reward = the user's scorer (mean +- standard error, n); perplexity = the base "
        "model's on those responses; gain = reward - the base's; distinct-2 over all of them. Per-user time = "
        f"`trainer.train()` only (median of {settings['latent_repeats']} runs for Latent DPO, "
        f"{settings['baseline_repeats']} for the others; for LoRA-DPO, the chosen learning rate's run), CAA's "
        "activation pass, the encoder pass of from examples; memory = peak resident set size of the process during it "
        "(and its increase over the start).",
        "",
        "## One-time costs (shared by all users)",
        "",
        "| stage | time | size |",
        "| --- | ---: | --- |",
        f"| response pool (sampling) | {_seconds(one_time['pool']['seconds'])} | {one_time['pool']['prompts']} prompts, "
        f"{one_time['pool']['responses']} responses |",
        f"| CLaP backbone (training) | {_seconds(one_time['clap']['seconds'])} | "
        + (
            f"reused {one_time['clap']['reused']} (recorded {one_time['clap'].get('recorded_train_seconds')} s)"
            if one_time["clap"]["reused"]
            else "trained in this run"
        )
        + " |",
        f"| latent cache (Latent DPO only) | {_seconds(one_time['latent_cache']['seconds'])} | "
        f"{one_time['latent_cache']['sequences']} sequences encoded |",
        "",
    ]
    neutral = results["neutral"]
    lines += [
        "## Neutral models and the oracle ceiling (test prompts)",
        "",
        "The best-of-4 oracle is a ceiling, not a method: it reranks 4 base samples per slot by the user's own reward, "
        "which it needs at inference. It is in no target.",
        "",
        "| user | base: reward (n) | backbone z = 0 | **oracle** best-of-4 | oracle perplexity |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for user, record in results["users"].items():
        b, z0 = neutral["base"]["reward"][user], neutral["latent_z0"]["reward"][user]
        o = record["oracles"]["best_of_4"]
        lines.append(
            f"| {user} | {b['mean']:.3f} +- {b['se']:.3f} ({b['n']}) | {z0['mean']:.3f} +- {z0['se']:.3f} | "
            f"{o['reward']['mean']:.3f} +- {o['reward']['se']:.3f} (oracle) | {o['perplexity']:.2f} |"
        )
    lines += [
        "",
        f"Base perplexity {neutral['base']['perplexity']:.2f}, distinct-2 {neutral['base']['distinct_2']:.3f} (test); "
        f"{neutral['base_validation']['perplexity']:.2f} on the validation prompts (the selections' reference).",
        "",
    ]
    for budget in map(str, results["budgets"]):
        lines += [
            f"## Budget: {budget} pairs per user",
            "",
            "| user | method | pairs | per-user time | steps | peak RSS (increase) | reward mean +- se (n) | gain | "
            "perplexity | distinct-2 | artefact (weights) | chosen on validation |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for user, record in results["users"].items():
            entry = record["budgets"][budget]
            for method, label in METHODS.items():
                f = entry["methods"][method]
                r, chosen = f["reward"], f.get("selection", {})
                choice = ", ".join(f"{k} {v:g}" for k, v in chosen.items() if k != "validation_curve") or "-"
                lines.append(
                    f"| {user} | {label} | {entry['pairs']} | {f['train_seconds']:.3f} s | {f['steps']} | "
                    f"{f['peak_rss_mb']:.0f} MB (+{f['rss_increase_mb']:.0f}) | {r['mean']:.3f} +- {r['se']:.3f} "
                    f"({r['n']}) | {f['gain']:+.3f} | {f['perplexity']:.2f} | {f['distinct_2']:.3f} | "
                    f"{_kb(f['artefact_bytes'])} ({_kb(f['weights_bytes'])}) | {choice} |"
                )
        lines.append("")
    lines += [
        "## Ratios, Latent DPO / baseline",
        "",
        "| user | budget | time / LoRA-DPO | time / prefix DPO | time / CAA | artefact / LoRA | weights / LoRA |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for user, per_budget in results["ratios"].items():
        for budget, r in per_budget.items():
            lines.append(
                f"| {user} | {budget} | {r['time_ours_over_lora']:.4f} | {r['time_ours_over_prefix']:.4f} | "
                f"{r['time_ours_over_caa']:.3g} | 1/{1 / r['size_ours_over_lora']:.0f} | "
                f"1/{1 / r['weights_ours_over_lora']:.0f} |"
            )
    s = results["serving"]
    lines += [
        "",
        f"## Serving ({s['rows']} users, {s['new_tokens_per_row']} greedy tokens per row, median of {s['repeats']})",
        "",
        "| how | tokens/s | seconds |",
        "| --- | ---: | ---: |",
    ]
    serving_labels = {
        "ours_mixed_batch": "ours: one batch, one preference id per row",
        "lora_mixed_batch": "PEFT LoRA: one batch, `adapter_names` per row",
        "ours_sequential": "ours: users one after another",
        "lora_sequential": "PEFT LoRA: users one after another (`set_adapter`)",
        "base_batch": "base model alone, same batch (no users)",
    }
    for key, label in serving_labels.items():
        lines.append(f"| {label} | {s[key]['tokens_per_second']:.1f} | {s[key]['seconds']:.2f} |")
    lines += [
        "",
        f"The {s['rows']} serving users are the {len(results['users'])} trained users (largest budget), repeated under "
        "new names (for LoRA, the adapters of the chosen learning rates): throughput does not depend on the weights' "
        "values. Prefix-tuning adapters cannot be mixed in one PEFT batch.",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "| --- | --- | --- |",
    ]
    for row in results["targets"]:
        lines.append(f"| {row['target']} | {row['measured']} | {'yes' if row['met'] else '**no**'} |")
    met = sum(row["met"] for row in results["targets"])
    lines += ["", "## Reading", "", f"{met} of {len(results['targets'])} targets met."]
    for row in results["targets"]:
        lines.append(f"- {'Met' if row['met'] else '**Missed**'}: {row['target']} ({row['measured']}).")
    lines += [
        "",
        f"Whole run: {_minutes(results['total_seconds'])} (estimated beforehand: "
        f"{_minutes(results['estimate_seconds']['total'])}).",
        "",
    ]
    for name, alt in (
        ("reward_vs_time", "reward vs per-user training time"),
        ("sample_efficiency", "reward vs pairs"),
    ):
        if plot_names.get(name):
            lines += [f"![{alt}]({plot_names[name]})", ""]
    check = one_time.get("prefix_generation_check")
    lines += [
        "## How it was measured",
        "",
        "- Per-user time is the wall time of `trainer.train()` alone: no dataset preparation, no evaluation, no saving. "
        "Before each timed call the garbage collector's current objects are frozen (`gc.freeze()`, for every method): "
        "`Trainer.train` starts with a full `gc.collect()` whose cost grows with everything the benchmark process "
        "holds. The Trainer's own `train_runtime` is in results.json as well.",
        "- The TRL methods each start from a fresh copy of the base; TRL wraps it with the PEFT config and computes the "
        "reference log-probabilities with the adapter disabled. No truncation (`max_length=None`), no activation "
        "checkpointing, fp32, CPU.",
        "- Prefix-tuning DPO trains with TRL's `DPOTrainer` and PEFT's `PrefixTuningConfig` as they are: on this "
        "stack the training forward passes the prefix and TRL keeps the positions of the real tokens (no attention-mask "
        "mismatch). With `prefix_init='eos'` the prefix starts as the base's own keys and values for EOS tokens, so "
        "the prefixed model starts close to the base and to the DPO reference; PEFT's default N(0, 1) prefix starts far "
        "from both (`--prefix_init random`). The paper's P-tuning-DPO ran a prefix SFT stage first; this benchmark "
        "does not.",
        "- PEFT's own `generate` drops the prefix on this stack (transformers passes the cache as `cache`, PEFT injects "
        "the prefix as `past_key_values`, which is then ignored), so prefix models are decoded by "
        "`generate_with_prefix` in examples/benchmark.py: the prefix as a prefilled cache, the mask extended over it."
        + (
            f" Measured on the first user's prefix model, max abs difference of first-token scores: PEFT's generate "
            f"vs the base {check['peft_generate_vs_base']:.2g}, the training forward vs the base "
            f"{check['training_forward_vs_base']:.2g}, `generate_with_prefix` vs the training forward "
            f"{check['workaround_generate_vs_training_forward']:.2g}."
            if check
            else ""
        ),
        "- Evaluation decodes each held-out prompt alone (its samples in one batch), so no model's evaluation involves "
        "padding; prompt i is sampled under the same seed for every model.",
        "",
    ]
    return "\n".join(lines)


PLOTS = ("reward_vs_time", "sample_efficiency")
MARKERS = {"latent_dpo": "o", "lora_dpo": "s", "prefix_dpo": "^", "caa": "v", "from_examples": "P"}


def plot_data(results: dict[str, Any]) -> dict[str, Any]:
    """What the plots draw, per user: every method's (per-user time, reward) and (pairs, reward) per budget, the base
    and the oracle ceiling (kept in results.json, so the plots can be redrawn without matplotlib)."""
    data = {}
    for user, curves in results["sample_efficiency"].items():
        data[user] = {
            "methods": curves,
            "base_reward": results["neutral"]["base"]["reward"][user]["mean"],
            "oracle_best_of_4_reward": results["users"][user]["oracles"]["best_of_4"]["reward"]["mean"],
        }
    return data


def write_plots(results: dict[str, Any], paths: dict[str, Path]) -> dict[str, bool]:
    """Reward vs per-user time (log axis) and reward vs pairs, one panel per user; all False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        return dict.fromkeys(PLOTS, False)
    data = plot_data(results)
    for name, x_key, x_label in (
        ("reward_vs_time", "train_seconds", "per-user training time (s, log)"),
        ("sample_efficiency", "pairs", "preference pairs per user (log)"),
    ):
        fig, axes = plt.subplots(1, len(data), figsize=(4.2 * len(data), 3.6), squeeze=False)
        for ax, (user, panel) in zip(axes[0], data.items(), strict=True):
            for method, label in METHODS.items():
                points = panel["methods"][method]
                ax.errorbar(
                    [p[x_key] for p in points],
                    [p["reward_mean"] for p in points],
                    yerr=[p["reward_se"] for p in points],
                    fmt=f"{MARKERS[method]}-",
                    label=label,
                )
            ax.axhline(panel["base_reward"], color="grey", linestyle="--", label="neutral base")
            ax.axhline(panel["oracle_best_of_4_reward"], color="black", linestyle=":", label="best-of-4 (oracle)")
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_title(f"user: {user}")
            ax.set_xlabel(x_label)
            ax.set_ylabel("reward on test prompts")
        axes[0][0].legend(fontsize=6)
        fig.tight_layout()
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(paths[name], dpi=120)
        plt.close(fig)
    return dict.fromkeys(PLOTS, True)


def write_reports(results: dict[str, Any], paths: dict[str, Path], args: BenchmarkArguments) -> None:
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    results["plot_data"] = plot_data(results)
    plotted = write_plots(results, paths)
    if not all(plotted.values()):
        print("[benchmark] matplotlib is not installed: no plots; their data is in results.json under 'plot_data'")
    results["files"] = {key: str(path) for key, path in paths.items() if plotted.get(key, True)}
    paths["json"].write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    plot_names = {
        name: os.path.relpath(paths[name], paths["markdown"].parent) if plotted[name] else None for name in PLOTS
    }
    paths["markdown"].parent.mkdir(parents=True, exist_ok=True)
    paths["markdown"].write_text(render_markdown(results, plot_names), encoding="utf-8")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    (args,) = make_parser().parse_args_into_dataclasses(args=argv)
    return run_benchmark(args)


if __name__ == "__main__":
    main(sys.argv[1:])
