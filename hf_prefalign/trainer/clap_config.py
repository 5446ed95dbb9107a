"""CLaPConfig: every hyperparameter of contrastive language-latent pretraining (stage 1)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class CLaPConfig(TrainingArguments):
    r"""
    Configuration of [`CLaPTrainer`]. Only the CLaP-specific fields are listed; the others are those of
    [`~transformers.TrainingArguments`].

    > Loss weights

    Args:
        nll_weight (`float`, *optional*, defaults to 1.0):
            Weight of the NLL of response tokens, with z drawn from the posterior by reparameterisation.
        nll_reduction (`str`, *optional*, defaults to `"sequence"`):
            `"sequence"`: the NLL summed over a response's tokens, averaged over responses (with the per-response KL,
            an ELBO); `"token"`: averaged over tokens (then the KL outweighs the likelihood ~T-fold and z collapses).
        kl_weight (`float`, *optional*, defaults to 1.0):
            Weight of the KL term (no annealing).
        contrastive_weight (`float`, *optional*, defaults to 1.0):
            Weight of the InfoNCE term over the responses and latents of one prompt (0 turns it off).

    > KL term

    Args:
        kl_estimator (`str`, *optional*, defaults to `"aggregate"`):
            `"aggregate"`: Monte-Carlo KL between the aggregated posterior of a prompt's responses and N(0, I), per
            dimension; `"analytic"`: the closed-form per-sample KL(q(z|x,y) || N(0, I)).
        kl_samples (`int`, *optional*, defaults to 16):
            Samples drawn from each posterior by the aggregate estimator.
        active_dim_threshold (`float`, *optional*, defaults to 0.01):
            A latent dimension counts as active when its mean per-sample KL exceeds this many nats.

    > Contrastive term

    Args:
        contrastive_num_negatives (`int`, *optional*, defaults to 1):
            Negatives per response in training (random other responses of the same prompt); each costs one extra LM
            pass per response. `None` uses all. Evaluation always ranks against every response of the prompt.

        contrastive_latents (`str`, *optional*, defaults to `"sample"`):
            Latents the InfoNCE scores use in training: `"sample"` (the reparameterised samples, as the NLL) or
            `"mean"` (the posterior means: a lower-variance signal for the encoder early in training).
        responses_per_step (`int`, *optional*, defaults to 8):
            Responses of each prompt used in a training step (a random subset); `None` uses all. Evaluation always
            uses all.

    > Start of the latent space

    Args:
        latent_init (`str`, *optional*, defaults to `"pca"`):
            `"pca"`: before the first step, start the hidden-state encoder from the whitened principal directions of
            the pool's within-prompt variation in the base's residual stream, and the residual adapter from the map
            back (see `hf_prefalign/trainer/clap_init.py`); `"none"`: gradient training from the zero-initialised
            encoder only. Skipped when resuming, for an already trained backbone, and for the `"blocks"` encoder.
        latent_init_scale (`float`, *optional*, defaults to 1.0):
            The adapter's start maps a response's own z back to this many times its deviation from its prompt's mean
            state. `None` calibrates it: the scale (1/4 to 4, a factor sqrt(2) apart) under which 8 prompts of the
            pool, held out of the start's fit, are most likely given their responses' own z.
        latent_init_max_prompts (`int`, *optional*, defaults to 256):
            Prompts of the training pool the start reads (`None`: all).

    > Latent metric

    Args:
        latent_metric_prompts (`int`, *optional*, defaults to 8):
            After training, the responses of this many prompts of the training pool measure the Fisher metric of z
            (`PrefAlignForCausalLM.latent_fisher`: 1/2 z^T F z is the per-token KL of z from the base), which
            `LatentDPOConfig.target_kl` uses to put every user at the same departure from the base. 0 skips it.

    > Model

    Args:
        freeze_base (`bool`, *optional*, defaults to `True`):
            Train only the latent encoder and adapter (recipe a). `False` also trains the base LM (recipe b).
        gradient_skip_path (`bool`, *optional*, defaults to `False`):
            Add the gradient-only shortcut z -> final hidden state (see [`PrefAlignConfig`]).

    > Data

    Args:
        max_length (`int`, *optional*, defaults to 256):
            Longest prompt + response in tokens; longer responses are truncated (with a counted warning).
        too_few_responses (`str`, *optional*, defaults to `"skip"`):
            What to do with a prompt that has fewer than 2 responses while the contrastive term is on: `"skip"` it
            (with a counted warning) or raise an `"error"`.

    Defaults that differ from [`~transformers.TrainingArguments`]: `num_train_epochs=1`, `learning_rate=1e-4`, `warmup_steps=0.1` (10% of
    the steps), `per_device_train_batch_size=1` (prompts per step; each brings all its responses),
    `logging_steps=10`, `remove_unused_columns=False`.
    """

    # Loss weights
    nll_weight: float = field(default=1.0, metadata={"help": "Weight of the NLL of response tokens."})
    nll_reduction: str = field(
        default="sequence",
        metadata={
            "help": "'sequence': NLL summed over a response's tokens (an ELBO with the KL); 'token': token mean.",
            "choices": ["sequence", "token"],
        },
    )
    kl_weight: float = field(default=1.0, metadata={"help": "Weight of the KL term."})
    kl_warmup_steps: float = field(
        default=0,
        metadata={
            "help": "KL annealing: the KL weight rises linearly from 0 to `kl_weight` over this many steps (a "
            "fraction of all steps when in (0, 1)); 0 = no annealing, as in the paper."
        },
    )
    contrastive_weight: float = field(
        default=1.0, metadata={"help": "Weight of the InfoNCE term over one prompt's responses (0 turns it off)."}
    )
    # KL term
    kl_estimator: str = field(
        default="aggregate",
        metadata={
            "help": "'aggregate': Monte-Carlo KL of the prompt's aggregated posterior to N(0, I); "
            "'analytic': closed-form per-sample KL.",
            "choices": ["aggregate", "analytic"],
        },
    )
    kl_samples: int = field(default=16, metadata={"help": "Samples per posterior for the aggregate KL estimator."})
    active_dim_threshold: float = field(
        default=0.01, metadata={"help": "Nats of mean per-sample KL above which a latent dimension counts as active."}
    )
    # Contrastive term
    contrastive_num_negatives: int | None = field(
        default=1,
        metadata={"help": "Negatives per response in training (None: all). Evaluation always uses all."},
    )
    contrastive_latents: str = field(
        default="sample",
        metadata={
            "help": "Latents of the InfoNCE scores in training: 'sample' or 'mean'.",
            "choices": ["sample", "mean"],
        },
    )
    responses_per_step: int | None = field(
        default=8,
        metadata={"help": "Responses of each prompt per training step (random subset; None: all)."},
    )
    # Start of the latent space
    latent_init: str = field(
        default="pca",
        metadata={
            "help": "'pca': start encoder and residual adapter from the pool's within-prompt principal directions; "
            "'none': zero-initialised encoder.",
            "choices": ["pca", "none"],
        },
    )
    latent_init_scale: float | None = field(
        default=1.0,
        metadata={
            "help": "Adapter start: z maps back to this many times the response's deviation; None: the scale that "
            "makes held-out pool responses most likely under their own z."
        },
    )
    latent_init_max_prompts: int | None = field(
        default=256, metadata={"help": "Prompts of the training pool the PCA start reads (None: all)."}
    )
    # Latent metric
    latent_metric_prompts: int = field(
        default=8,
        metadata={"help": "Prompts whose responses measure the Fisher metric of z after training (0: skip)."},
    )
    # Model
    freeze_base: bool = field(default=True, metadata={"help": "Train only the latent encoder and adapter."})
    gradient_skip_path: bool = field(
        default=False, metadata={"help": "Add the gradient-only shortcut z -> final hidden state."}
    )
    encoder_blocks_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the latent encoder's transformer blocks (copied from the pretrained base), "
            "e.g. 10x below `learning_rate` to keep their pretrained features; None: `learning_rate`."
        },
    )
    # Data
    max_length: int = field(default=256, metadata={"help": "Longest prompt + response in tokens (truncated beyond)."})
    too_few_responses: str = field(
        default="skip",
        metadata={
            "help": "Prompts with fewer than 2 responses when the contrastive term is on: 'skip' or 'error'.",
            "choices": ["skip", "error"],
        },
    )
    # Parent defaults re-declared
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the pool (after the PCA start)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Initial AdamW learning rate."})
    warmup_steps: float = field(
        default=0.1, metadata={"help": "Linear warm-up: steps, or a fraction of all steps when in [0, 1)."}
    )
    per_device_train_batch_size: int = field(
        default=1, metadata={"help": "Prompts per device and step; each brings all its responses."}
    )
    per_device_eval_batch_size: int = field(default=1, metadata={"help": "Prompts per device in evaluation."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X steps (or ratio of steps if < 1)."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the tokenized columns that the response-group collator reads."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.contrastive_num_negatives, str) and self.contrastive_num_negatives.lower() == "none":
            self.contrastive_num_negatives = None
        if self.kl_estimator not in ("aggregate", "analytic"):
            raise ValueError(f"`kl_estimator` must be 'aggregate' or 'analytic', got {self.kl_estimator!r}.")
        if self.contrastive_latents not in ("sample", "mean"):
            raise ValueError(f"`contrastive_latents` must be 'sample' or 'mean', got {self.contrastive_latents!r}.")
        if self.nll_reduction not in ("sequence", "token"):
            raise ValueError(f"`nll_reduction` must be 'sequence' or 'token', got {self.nll_reduction!r}.")
        if self.latent_init not in ("pca", "none"):
            raise ValueError(f"`latent_init` must be 'pca' or 'none', got {self.latent_init!r}.")
        if isinstance(self.latent_init_scale, str) and self.latent_init_scale.lower() == "none":
            self.latent_init_scale = None
        if self.latent_init_scale is not None and not (
            math.isfinite(self.latent_init_scale) and self.latent_init_scale > 0
        ):
            raise ValueError(f"`latent_init_scale` must be positive, got {self.latent_init_scale}.")
        if isinstance(self.latent_init_max_prompts, str) and self.latent_init_max_prompts.lower() == "none":
            self.latent_init_max_prompts = None
        if self.latent_init_max_prompts is not None and self.latent_init_max_prompts <= 0:
            raise ValueError(
                f"`latent_init_max_prompts` must be positive or None, got {self.latent_init_max_prompts}."
            )
        if self.latent_metric_prompts < 0:
            raise ValueError(f"`latent_metric_prompts` must be >= 0, got {self.latent_metric_prompts}.")
        if self.too_few_responses not in ("skip", "error"):
            raise ValueError(f"`too_few_responses` must be 'skip' or 'error', got {self.too_few_responses!r}.")
        for name in ("nll_weight", "kl_weight", "contrastive_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if self.encoder_blocks_learning_rate is not None and self.encoder_blocks_learning_rate < 0:
            raise ValueError(f"`encoder_blocks_learning_rate` must be >= 0, got {self.encoder_blocks_learning_rate}.")
        if self.kl_warmup_steps < 0:
            raise ValueError(f"`kl_warmup_steps` must be >= 0, got {self.kl_warmup_steps}.")
        if self.kl_samples <= 0:
            raise ValueError(f"`kl_samples` must be positive, got {self.kl_samples}.")
        if self.contrastive_num_negatives is not None and self.contrastive_num_negatives <= 0:
            raise ValueError(
                f"`contrastive_num_negatives` must be positive or None, got {self.contrastive_num_negatives}."
            )
        if isinstance(self.responses_per_step, str) and self.responses_per_step.lower() == "none":
            self.responses_per_step = None
        if self.responses_per_step is not None and self.responses_per_step < 2:
            raise ValueError(f"`responses_per_step` must be at least 2 or None, got {self.responses_per_step}.")
        if self.max_length < 2:
            raise ValueError(f"`max_length` must be at least 2, got {self.max_length}.")
        if self.label_smoothing_factor != 0.0:
            raise ValueError(
                f"`label_smoothing_factor={self.label_smoothing_factor}` would have no effect: CLaP computes its own "
                "NLL of the responses given z (not the Trainer's label-smoothed loss). Remove it."
            )
        if self.gradient_checkpointing:
            raise ValueError(
                "gradient_checkpointing=True cannot be used with CLaP: checkpointed layers drop the cache that "
                "carries the latent prefix."
            )
        super().__post_init__()


__all__ = ["CLaPConfig"]
