"""The compared methods, the oracle, and the figure keys every run records (what the benchmark compares)."""

from __future__ import annotations


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
