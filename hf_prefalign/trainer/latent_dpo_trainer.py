"""LatentDPOTrainer: aligns one user by training only their prior p_user(z|x); the LM never runs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from transformers import PreTrainedTokenizerBase, Trainer, TrainingArguments
from transformers.utils import logging
from trl import DPOTrainer

from ..data.latent_cache import PAIR_COLUMNS, LatentCache
from ..distributions import DiagonalGaussian
from ..hub.model_card import add_tags, preference_card, write_card
from ..integrations import default_cache_dir
from ..models.prefalign.modeling_prefalign import PrefAlignForCausalLM
from ..preference.embedding import PreferenceEmbedding, PreferenceEmbeddingConfig
from ..preference.personalisation import pairs_mean_difference, set_constant_prior
from ..utils.constants import README_NAME, WEIGHTS_NAME
from ..utils.serialization import load_tensors
from .checkpoints import resolve_resume
from .departure import scale_to_target_kl
from .latent_dpo_config import LatentDPOConfig
from .latent_dpo_loss import latent_dpo_loss
from .metrics import CollectedMetricsMixin


logger = logging.get_logger(__name__)


def _warn_if_no_signal(pairs: Dataset) -> float:
    """Warn when the chosen and rejected posteriors cannot be told apart; returns their mean separation.

    The separation is the mean distance between the two posterior means in units of their standard deviations. Near
    zero, every latent pair has the same latent reward, none is kept, and the user's prior never moves: the backbone's
    encoder is untrained (or these responses do not differ in what it encodes).
    """
    columns = pairs[:]
    gap = columns["chosen_mean"] - columns["rejected_mean"]  # (N, Z)
    spread = 0.5 * (columns["chosen_logvar"].exp() + columns["rejected_logvar"].exp())
    separation = float((gap.pow(2) / spread.clamp(min=1e-12)).sum(-1).sqrt().mean())
    if separation < 1e-3:
        logger.warning(
            f"Latent DPO finds no signal: the chosen and rejected responses of all {len(pairs)} pairs have the same "
            f"posterior (mean separation {separation:.2e} standard deviations), so no latent pair is kept and the "
            "user's prior will not move. The backbone's encoder looks untrained: train it with CLaPTrainer first "
            "(or check that the pairs' responses differ)."
        )
    return separation


def _collate_latent_pairs(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.stack([torch.as_tensor(f[name]) for f in features]) for name in PAIR_COLUMNS}


class LatentDPOTrainer(CollectedMetricsMixin, DPOTrainer):
    """Trains one user's [`PreferenceEmbedding`] with Latent DPO on a TRL preference dataset.

    At construction, the frozen backbone's encoder reads each pair's prompt and both responses once (through a
    [`LatentCache`] shared by every user of the same backbone); training then touches only the user's prior, a few
    thousand parameters: neither the base LM nor the latent adapter runs. `DPOTrainer.__init__` (which tokenizes text
    and loads a reference LM) is bypassed on purpose; the reference is N(0, I). Logging, progress bars,
    `save_strategy` and `resume_from_checkpoint` are the `Trainer`'s.

    Logged metrics: `loss`, `rewards/accuracy` and `rewards/margin` (implicit reward rho on the kept latent pairs),
    `pairs/kept`, `prior/mean_norm` and `prior/std` (mean norm of the prior's mean, mean standard deviation).

    The arguments come in [`~trl.DPOTrainer`]'s order, `(model, ref_model, args, data_collator, train_dataset, ...)`,
    and `LatentDPOTrainer(model, args, ...)` works too. `ref_model`, `data_collator`, `compute_metrics`,
    `quantization_config` and `peft_config` have nothing to act on and are refused when given.

    Args:
        model (`PrefAlignForCausalLM`): a trained (CLaP) backbone; it is not modified.
        ref_model (*optional*): must be `None`: the reference is the N(0, I) prior. (A `LatentDPOConfig` passed
            here, the second positional argument, is taken as `args`.)
        args (`LatentDPOConfig`, *optional*): settings.
        train_dataset, eval_dataset (`Dataset`): TRL preference datasets (`prompt`, `chosen`, `rejected`; standard or
            conversational).
        processing_class (`PreTrainedTokenizerBase`): the backbone's tokenizer.
        preference_embedding (`PreferenceEmbedding`, *optional*): continue training this embedding instead of N(0, I).
        latent_cache (`LatentCache`, *optional*): share an existing cache (e.g. one built for a response pool).
        callbacks, optimizers: as in [`~transformers.Trainer`].
    """

    _tag_names = ["hf-prefalign", "latent-dpo"]
    _name = "Latent DPO"

    def __init__(
        self,
        model: PrefAlignForCausalLM,
        ref_model: LatentDPOConfig | None = None,
        args: LatentDPOConfig | None = None,
        data_collator: Any | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        compute_metrics: Any | None = None,
        callbacks: list | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        quantization_config: Any | None = None,
        peft_config: Any | None = None,
        *,
        preference_embedding: PreferenceEmbedding | None = None,
        latent_cache: LatentCache | None = None,
    ):
        # Arguments in TRL's positional order `(model, ref_model, args, ...)`; `(model, args, ...)` works too.
        if isinstance(ref_model, TrainingArguments):
            if args is not None:
                raise TypeError("`args` was given twice: as the second positional argument and as `args=`.")
            ref_model, args = None, ref_model
        for name, value in (
            ("ref_model", ref_model),
            ("data_collator", data_collator),
            ("compute_metrics", compute_metrics),
            ("quantization_config", quantization_config),
            ("peft_config", peft_config),
        ):
            if value is not None:
                raise ValueError(
                    f"LatentDPOTrainer does not use `{name}` (got {type(value).__name__}): Latent DPO trains a "
                    "user's prior on cached latents, with N(0, I) as the reference and no LM call, so there is no "
                    f"reference LM, token collator, prediction metric, quantization or adapter to set. Remove `{name}`."
                )
        # Model: the backbone stays frozen and outside the Trainer; the trained module is the user's prior.
        if not isinstance(model, PrefAlignForCausalLM):
            raise TypeError(
                f"LatentDPOTrainer needs a trained PrefAlignForCausalLM backbone, got {type(model).__name__}."
            )
        if args is None:
            args = LatentDPOConfig(output_dir="latent-dpo")
        if not isinstance(args, LatentDPOConfig):
            raise TypeError(f"`args` must be a LatentDPOConfig, got {type(args).__name__}.")
        if processing_class is None:
            raise ValueError("LatentDPOTrainer needs the backbone's tokenizer: pass `processing_class=tokenizer`.")
        if processing_class.pad_token_id is None:
            processing_class.pad_token = processing_class.eos_token
        if train_dataset is None:
            raise ValueError("LatentDPOTrainer needs a `train_dataset` of preference pairs.")
        self.backbone = model
        self.backbone.eval()

        # Dataset: encoder outputs, computed once and cached
        start = time.perf_counter()
        if latent_cache is None:
            cache_dir = args.latent_cache_dir
            cache_dir = None if cache_dir == "none" else (cache_dir or default_cache_dir() / "latent_cache")
            latent_cache = LatentCache(model, processing_class, cache_dir, batch_size=args.encode_batch_size)
        elif latent_cache.fingerprint != model.fingerprint():
            raise ValueError("The latent cache was built for another backbone (fingerprint mismatch).")
        self.latent_cache = latent_cache
        encoded_before = latent_cache.encoder_sequences
        train_dataset = latent_cache.encode_pairs(train_dataset, "train")
        if eval_dataset is not None:
            eval_dataset = latent_cache.encode_pairs(eval_dataset, "eval")
        self.cache_seconds = time.perf_counter() - start
        self.cache_sequences_encoded = latent_cache.encoder_sequences - encoded_before
        self.posterior_separation = _warn_if_no_signal(train_dataset)

        # Preference embedding (the trained model)
        if preference_embedding is None:
            torch.manual_seed(args.seed)
            preference_embedding = PreferenceEmbedding(
                PreferenceEmbeddingConfig(
                    latent_dim=model.config.latent_dim,
                    feature_dim=model.config.text_config.hidden_size,
                    rank=args.prior_rank,
                    backbone_fingerprint=latent_cache.fingerprint,
                    base_model=model.config.base_model_name_or_path,
                    backbone=model.name_or_path or None,
                )
            )
            if args.prior_init == "pairs":
                columns = train_dataset[:]
                set_constant_prior(
                    preference_embedding,
                    *pairs_mean_difference(
                        DiagonalGaussian(columns["chosen_mean"], columns["chosen_logvar"]),
                        DiagonalGaussian(columns["rejected_mean"], columns["rejected_logvar"]),
                    ),
                )
        else:
            preference_embedding.check_compatible(
                latent_cache.fingerprint, model.config.latent_dim, model.config.text_config.hidden_size
            )

        # Without a prompt-dependent part, only the constant mean and log-variance (`bias`) reach the optimizer.
        for parameter in (preference_embedding.down, preference_embedding.up):
            parameter.requires_grad_(args.prompt_dependent_prior)

        self._init_metrics()
        # DPOTrainer.__init__ would tokenize text and load a reference LM: none of that applies to Latent DPO.
        Trainer.__init__(
            self,
            model=preference_embedding,
            args=args,
            data_collator=_collate_latent_pairs,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        # Not given to Trainer as `processing_class`: it would try to align its special tokens with an LM config.
        self.tokenizer_for_latents = processing_class
        self.model_accepts_loss_kwargs = False
        self.num_pairs = len(train_dataset)

    # ------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        mode = "train" if model.training else "eval"
        args: LatentDPOConfig = self.args
        prior = model(inputs["features"])  # (B, Z)
        chosen = DiagonalGaussian(inputs["chosen_mean"], inputs["chosen_logvar"])
        rejected = DiagonalGaussian(inputs["rejected_mean"], inputs["rejected_logvar"])
        loss, metrics = latent_dpo_loss(
            prior,
            chosen,
            rejected,
            beta=args.beta,
            num_samples=args.num_latent_samples,
            gap_quantile=args.gap_quantile,
        )
        metrics["prior/mean_norm"] = prior.mean.detach().norm(dim=-1).mean()
        metrics["prior/std"] = prior.std.detach().mean()
        self._record_metrics(mode, metrics)
        return (loss, {}) if return_outputs else loss

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        # DPOTrainer wraps this in activation offloading for its LM; a latent prior has nothing to offload.
        return Trainer.training_step(self, *args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluate(self, eval_dataset: Dataset | None = None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if eval_dataset is not None and "features" not in eval_dataset.column_names:
            eval_dataset = self.latent_cache.encode_pairs(eval_dataset, "eval")
        return Trainer.evaluate(self, eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    # ------------------------------------------------------------------
    # Training bookkeeping, saving and resuming
    # ------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        # `True` skips a newest checkpoint that a kill left incomplete; a missing path is an error, not a fresh start.
        resume_from_checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        start = time.perf_counter()
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        seconds = time.perf_counter() - start
        embedding: PreferenceEmbedding = self.model
        logs = [log for log in self.state.log_history if "rewards/accuracy" in log]
        embedding.config.training = {
            "method": "latent-dpo",
            "pairs": self.num_pairs,
            "steps": output.global_step,
            "epochs": self.args.num_train_epochs,
            "beta": self.args.beta,
            "learning_rate": self.args.learning_rate,
            "num_latent_samples": self.args.num_latent_samples,
            "gap_quantile": self.args.gap_quantile,
            "prior_init": self.args.prior_init,
            "prompt_dependent_prior": self.args.prompt_dependent_prior,
            "train_seconds": round(seconds, 3),
            "posterior_separation": round(self.posterior_separation, 4),
            "final_loss": output.training_loss,
        }
        if logs:  # the implicit reward's accuracy on kept latent pairs, at the first and the last log
            embedding.config.training["rewards_accuracy_first_log"] = round(logs[0]["rewards/accuracy"], 4)
            embedding.config.training["rewards_accuracy_last_log"] = round(logs[-1]["rewards/accuracy"], 4)
        self._scale_to_target_kl(embedding)
        return output

    def _scale_to_target_kl(self, embedding: PreferenceEmbedding) -> None:
        """`args.target_kl`: the trained mean scaled to that departure from the base (trainer/departure.py)."""
        target_kl = self.args.target_kl
        if target_kl is None:
            return
        fisher = self.backbone.latent_fisher
        if fisher is None:
            logger.warning(
                f"target_kl={target_kl} is not applied: the backbone's latent metric was never measured (it was "
                "trained before the metric existed, or with latent_metric_prompts=0), so the user keeps the scale "
                "training left. Measure it with `hf_prefalign.trainer.estimate_latent_metric(backbone, pool, "
                "tokenizer)` and save the backbone, or set target_kl=None."
            )
            return
        features = self.train_dataset[:]["features"]  # (N, F): the user's training prompts
        embedding.config.training.update(scale_to_target_kl(embedding, fisher, target_kl, features))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            self.model.save_pretrained(output_dir)

    def _save_checkpoint(self, model, trial):
        # TRL's card writer expects an LM; the checkpoint itself is the Trainer's.
        Trainer._save_checkpoint(self, model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        path = Path(resume_from_checkpoint) / WEIGHTS_NAME
        (model or self.model).load_state_dict(load_tensors(path))

    # ------------------------------------------------------------------
    # Model card and Hub
    # ------------------------------------------------------------------
    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write the preference embedding's card to `output_dir/README.md` (TRL's LM card does not apply).

        The card holds counts, settings and aggregate metrics only ([`preference_card`]); `dataset_name` is not
        recorded, since a user's dataset name can identify them. An existing README there is updated, not replaced.
        """
        if not self.is_world_process_zero():
            return
        output_dir = Path(self.args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        weights = output_dir / WEIGHTS_NAME
        write_card(
            lambda: add_tags(
                preference_card(
                    self.model,
                    repo_id=self.hub_model_id or self.args.hub_model_id,
                    size_bytes=weights.stat().st_size if weights.is_file() else None,
                ),
                tags,
            ),
            output_dir / README_NAME,
            existing=output_dir / README_NAME,
        )

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ) -> str | None:
        """Save the embedding to `output_dir` and upload it (config, weights, its own card) to `args.hub_model_id`
        (default: the name of `output_dir`); returns the commit URL.

        Unlike [`~transformers.Trainer.push_to_hub`], only the embedding is uploaded, never `output_dir`'s
        checkpoints or logs. The upload is synchronous (`blocking` is accepted for compatibility).
        """
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self.create_model_card(**kwargs)
        return self.model.push_to_hub(
            self.hub_model_id or self.args.hub_model_id or Path(self.args.output_dir).name,
            commit_message=commit_message or "End of training",
            private=self.args.hub_private_repo if private is None else private,
            token=self.args.hub_token if token is None else token,
            revision=self.args.hub_revision if revision is None else revision,
        )

    def save_preference(self, path: str | Path) -> PreferenceEmbedding:
        """Save the trained preference embedding to `path` and return it."""
        self.model.save_pretrained(path)
        return self.model


__all__ = ["LatentDPOTrainer"]
