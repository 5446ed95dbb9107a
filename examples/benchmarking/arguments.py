"""The benchmark's settings (`BenchmarkArguments`), their parsing and checks, and the repository paths."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from transformers import HfArgumentParser

from benchmarking.methods import EPOCH_METHODS


REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DOCS_DIR = REPO_ROOT / "docs"
FULL_USERS = ("positive", "negative", "concise", "detailed", "questioning", "structured")
# The first line of examples/benchmark.py's docstring: the description `--help` prints.
DESCRIPTION = (
    "Benchmark v2: per-user alignment with Latent DPO against LoRA-DPO, prefix-tuning DPO and CAA, in one run."
)


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
        resume (`bool`, *optional*, defaults to `False`): continue a killed run in the same `work_dir` with the same
            settings. Every run writes its finished stages under `<work_dir>/stages/<key>/` (the key hashes the
            settings, the backbone and the pool); with `resume` they are read back instead of recomputed.
        seed (`int`, *optional*, defaults to 0): random seed of every trainer and of the sampled generations.
        precision (`str`, *optional*, defaults to `"auto"`): dtype of the frozen base's weights, the same for every
            method: `"auto"` is bf16 where this machine computes it natively (about 1.6x faster DPO steps on a CPU
            with AVX512-BF16), else fp32; `"float32"` forces fp32. Trainable weights (LoRA, prefix, latent modules)
            and every log-density stay fp32.

    > One-time artefacts

    Args:
        pool (`str`, *optional*): a saved response pool to reuse (its last `num_heldout` prompts are held out).
        backbone (`str`, *optional*): a saved CLaP backbone to reuse (its base must be the frozen base model).
        num_train_prompts (`int`, *optional*): prompts whose responses make the pairs (default 128, i.e. at most 256
            pairs, the largest budget; quick 6).
        num_heldout (`int`, *optional*): held-out (test) prompts, the reported ones (default 48, quick 3).
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
        samples_per_prompt (`int`, *optional*): sampled responses per held-out prompt (default 4, quick 2).
        generation_batch_size (`int`, *optional*): rows per sampling call: the responses of several prompts are
            drawn together, left-padded (default 48, quick 4). One batch of 48 rows costs about what 12 rows cost
            on a 2-core CPU; every model is sampled in the same batches under the same seeds.
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
    resume: bool = field(
        default=False,
        metadata={
            "help": "Continue a killed run in the same work_dir with the same settings: reuse its pool, backbone, "
            "neutral samples and every finished (user, budget)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Random seed of every trainer and of sampled generations."})
    precision: Literal["auto", "float32"] = field(
        default="auto",
        metadata={"help": "The frozen base's dtype for every method: bf16 where native ('auto'), or 'float32'."},
    )
    # One-time artefacts
    pool: str | None = field(default=None, metadata={"help": "A saved response pool to reuse."})
    backbone: str | None = field(default=None, metadata={"help": "A saved CLaP backbone to reuse."})
    num_train_prompts: int | None = field(
        default=None, metadata={"help": "Prompts whose responses make the pairs (default 128, quick 6)."}
    )
    num_heldout: int | None = field(default=None, metadata={"help": "Held-out test prompts (default 48, quick 3)."})
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
        default=None, metadata={"help": "Sampled responses per held-out prompt (default 4, quick 2)."}
    )
    generation_batch_size: int | None = field(
        default=None, metadata={"help": "Rows per sampling call, several prompts together (default 48, quick 4)."}
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
            "num_heldout": (48, 3),
            "num_validation": (16, 2),
            "validation_samples": (2, 2),
            "num_responses": (8, 4),
            "pool_max_new_tokens": (40, 10),
            "batch_size": (8, 4),
            "latent_repeats": (5, 2),
            "samples_per_prompt": (4, 2),
            "generation_batch_size": (48, 4),
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
    return HfArgumentParser(BenchmarkArguments, description=DESCRIPTION)
