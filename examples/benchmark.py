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
    python examples/benchmark.py --resume                          # continue a killed run where it stopped
    python examples/benchmark.py --quick --output_dir /tmp/bench   # tiny random model, every code path, ~1 min

Every run writes its finished stages (neutral samples, each user and budget) under `<work_dir>/stages/<key>/`, the
key hashing the settings, the backbone and the pool; `--resume` reads them back, with the pool and backbone of the
run it continues, so the full run can be spread over several sessions.

`--quick` runs on a tiny randomly initialised Llama and a word-level English tokenizer built in code; its numbers
mean nothing, and it never writes under docs/. Run with `OMP_NUM_THREADS` set to the cores you want to use.
"""

from __future__ import annotations

import sys

from benchmarking.arguments import BenchmarkArguments, make_parser
from benchmarking.evaluation import base_perplexity, sample_responses
from benchmarking.fairness import check_fair_comparison
from benchmarking.methods import FIGURE_KEYS, METHODS, SERVING_KEYS
from benchmarking.prefix_tuning import generate_with_prefix
from benchmarking.quick_models import make_quick_base, make_quick_tokenizer
from benchmarking.run import main, run_benchmark
from benchmarking.selection import best_of_n_indices, best_of_n_responses, select_on_validation
from benchmarking.setting_up import split_prompts
from benchmarking.targets import targets
from steering_baselines import caa_vectors_for


# The names the tests and the generated docs use, re-exported from the package's modules.
__all__ = [
    "FIGURE_KEYS",
    "METHODS",
    "SERVING_KEYS",
    "BenchmarkArguments",
    "base_perplexity",
    "best_of_n_indices",
    "best_of_n_responses",
    "caa_vectors_for",
    "check_fair_comparison",
    "generate_with_prefix",
    "main",
    "make_parser",
    "make_quick_base",
    "make_quick_tokenizer",
    "run_benchmark",
    "sample_responses",
    "select_on_validation",
    "split_prompts",
    "targets",
]


if __name__ == "__main__":
    main(sys.argv[1:])
