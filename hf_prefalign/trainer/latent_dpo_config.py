"""LatentDPOConfig: the settings of per-user Latent DPO, as a TRL DPOConfig."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from trl import DPOConfig

from ..utils.constants import DEFAULT_TARGET_KL


# DPOConfig fields that cannot act in Latent DPO (no LM runs, nothing is tokenized, the reference is N(0, I)):
# setting one away from DPOConfig's default is refused rather than silently ignored.
INERT_DPO_FIELDS = (
    "model_init_kwargs",
    "trust_remote_code",
    "router_aux_loss_coef",
    "disable_dropout",
    "dataset_num_proc",
    "max_length",
    "truncation_mode",
    "padding_free",
    "pad_to_multiple_of",
    "precompute_ref_log_probs",
    "precompute_ref_batch_size",
    "loss_type",
    "loss_weights",
    "ld_alpha",
    "f_divergence_type",
    "f_alpha_divergence_coef",
    "label_smoothing",
    "use_weighting",
    "discopop_tau",
    "activation_offloading",
    "sync_ref_model",
    "ref_model_mixup_alpha",
    "ref_model_sync_steps",
    "pad_token",
)


PRIOR_INITS = ("zeros", "pairs")


def _dpo_default(name: str):
    spec = next(f for f in dataclasses.fields(DPOConfig) if f.name == name)
    return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default


@dataclass
class LatentDPOConfig(DPOConfig):
    r"""
    Configuration of [`LatentDPOTrainer`]. `beta` is DPOConfig's (defaults to 0.1). The LM-related fields of
    [`~trl.DPOConfig`] (`max_length`, padding, reference model, `loss_type`, `label_smoothing`, ...: the list is
    `INERT_DPO_FIELDS`) cannot act, since no LM runs: setting one away from its default raises a `ValueError`
    naming it.

    > Latent DPO

    Args:
        num_latent_samples (`int`, *optional*, defaults to 16):
            Latents drawn per pair from each of N(0, I), q(z|x,y_w) and q(z|x,y_l).
        gap_quantile (`float`, *optional*, defaults to 0.75):
            Keep the latent pairs whose reward gap is at least this quantile of the pair's gaps.
        prior_init (`str`, *optional*, defaults to `"pairs"`):
            Where a new user's prior starts. `"pairs"`: the prompt-independent prior at the precision-weighted mean
            difference of the pairs' chosen and rejected posteriors (what [`PreferenceEmbedding.from_examples`] builds
            from them), so training refines a user who already points the right way. `"zeros"`: N(0, I), the
            reference (the paper). Ignored when the trainer continues a given `preference_embedding`.
        prompt_dependent_prior (`bool`, *optional*, defaults to `False`):
            Train the rank-`prior_rank` prompt-dependent part of the prior (the paper). The default `False` trains
            only its constant mean and log-variance (the same z for every prompt), so a user cannot fit the training
            prompts' content; on the validation split this start + constant part moved 6 simulated users +0.62 +-
            0.14 base SDs against the paper recipe's +0.25 +- 0.14 (docs/preference_space.md).
        prior_rank (`int`, *optional*, defaults to 8):
            Rank of the prompt-dependent part of the user's prior.
        target_kl (`float`, *optional*, defaults to 0.11):
            How far every user departs from the base, in nats per response token: after training, the prior's mean
            is scaled so that its z costs this much under the backbone's latent metric (1/2 z^T F z, averaged over
            the user's training prompts; `trainer/departure.py`). Latent DPO then decides the direction of a user
            and this one number the distance, the same for every user. 0.11 gave the best mean gain at which 6
            simulated users all stayed within +15% perplexity of the base on a 128-prompt validation split
            (docs/preference_space.md). `None` keeps the scale training left. Needs a backbone whose latent metric
            was measured (`CLaPTrainer` does it); without one, a warning, no scaling.
        latent_cache_dir (`str`, *optional*):
            Where encoder outputs are cached between runs (default: `<hf_prefalign cache>/latent_cache`; `"none"`
            keeps them in memory only).
        encode_batch_size (`int`, *optional*, defaults to 32): sequences per encoder call while building the cache.

    Defaults that differ from [`~trl.DPOConfig`]: `learning_rate=5e-3`, `num_train_epochs=10`,
    `per_device_train_batch_size=64` (the paper's pairs per step), `activation_checkpointing=False` (and its
    deprecated alias `gradient_checkpointing` unset), `bf16=False`, `logging_steps=5`, `save_strategy="no"`,
    `remove_unused_columns=False`, `dataloader_pin_memory=False`. The prior has ~5k
    parameters, so many small steps cost seconds.
    """

    num_latent_samples: int = field(
        default=16, metadata={"help": "Latents per pair from each of the 3 distributions."}
    )
    gap_quantile: float = field(default=0.75, metadata={"help": "Quantile of reward gaps above which pairs are kept."})
    prior_init: str = field(
        default="pairs",
        metadata={"help": "Start of a new user's prior: 'pairs' (the pairs' mean difference) or 'zeros' (N(0, I))."},
    )
    prompt_dependent_prior: bool = field(
        default=False,
        metadata={"help": "Train the prompt-dependent part of the prior (False: its constant part only)."},
    )
    prior_rank: int = field(default=8, metadata={"help": "Rank of the prompt-dependent part of the user's prior."})
    target_kl: float | None = field(
        default=DEFAULT_TARGET_KL,
        metadata={"help": "Departure of every user from the base in nats per token (None: as trained)."},
    )
    latent_cache_dir: str | None = field(
        default=None, metadata={"help": "Cache of encoder outputs shared between users ('none': memory only)."}
    )
    encode_batch_size: int = field(
        default=32, metadata={"help": "Sequences per encoder call when building the cache."}
    )
    # Parent defaults re-declared
    learning_rate: float = field(default=5e-3, metadata={"help": "Initial AdamW learning rate."})
    num_train_epochs: float = field(default=10.0, metadata={"help": "Passes over the user's pairs."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Preference pairs per step."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Preference pairs per evaluation step."})
    # `activation_checkpointing` is the name transformers reads; leaving its deprecated alias unset avoids its warning.
    activation_checkpointing: bool | None = field(
        default=False, metadata={"help": "No LM runs: nothing to checkpoint."}
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing` (transformers)."}
    )
    dataloader_pin_memory: bool = field(
        default=False, metadata={"help": "Batches are a few small latent tensors: nothing worth pinning."}
    )
    bf16: bool | None = field(default=False, metadata={"help": "Latent densities are computed in fp32."})
    logging_steps: float = field(default=5, metadata={"help": "Log every X steps."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpoint strategy ('no', 'steps', 'epoch')."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the cached latent columns."})

    def __post_init__(self) -> None:
        inert = []
        for name in INERT_DPO_FIELDS:
            value, default = getattr(self, name), _dpo_default(name)
            if name == "loss_type" and isinstance(value, str):  # the CLI gives one string
                value = [value]
            if value != default:
                inert.append(f"`{name}={value!r}` (DPOConfig's default: {default!r})")
        if self.activation_checkpointing or self.gradient_checkpointing:
            inert.append("`activation_checkpointing` / `gradient_checkpointing=True` (default: False)")
        if inert:
            raise ValueError(
                f"LatentDPOConfig got {', '.join(inert)}, which would have no effect: Latent DPO runs no LM, "
                "tokenizes nothing and uses N(0, I) as its reference. Remove "
                + ("it." if len(inert) == 1 else "them.")
            )
        if self.num_latent_samples <= 0:
            raise ValueError(f"`num_latent_samples` must be positive, got {self.num_latent_samples}.")
        if not 0.0 <= self.gap_quantile < 1.0:
            raise ValueError(f"`gap_quantile` must be in [0, 1), got {self.gap_quantile}.")
        if self.prior_init not in PRIOR_INITS:
            raise ValueError(f"`prior_init` must be one of {PRIOR_INITS}, got {self.prior_init!r}.")
        if self.prior_rank <= 0:
            raise ValueError(f"`prior_rank` must be positive, got {self.prior_rank}.")
        if isinstance(self.target_kl, str) and self.target_kl.lower() == "none":
            self.target_kl = None
        if self.target_kl is not None and (
            isinstance(self.target_kl, bool) or not math.isfinite(self.target_kl) or self.target_kl <= 0
        ):
            raise ValueError(f"`target_kl` must be a positive number of nats per token or None, got {self.target_kl}.")
        if self.beta <= 0:
            raise ValueError(f"`beta` must be positive, got {self.beta}.")
        if isinstance(self.latent_cache_dir, str) and self.latent_cache_dir.lower() == "none":
            self.latent_cache_dir = "none"
        super().__post_init__()


__all__ = ["LatentDPOConfig"]
