"""CLaPTrainer: contrastive language-latent pretraining of a PrefAlign backbone (stage 1, once per base model)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from huggingface_hub import ModelCard
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer
from transformers.utils import logging

from ..data.collators import DataCollatorForResponseGroups
from ..data.pools import PROMPT_COLUMN, RESPONSES_COLUMN, as_response_pool
from ..data.prompts import context_limit, tokenize_prompt
from ..hub.model_card import add_tags, backbone_card, write_card
from ..hub.transfer import push_folder
from ..integrations import load_default_base
from ..models.prefalign.hidden_state_encoder import HiddenStateEncoder
from ..models.prefalign.latent_metric import latent_fisher
from ..models.prefalign.likelihood import positions_to_score
from ..models.prefalign.modeling_prefalign import PrefAlignForCausalLM
from ..utils.constants import BASE_MODEL_SUBFOLDER, EMBEDDED_DEFAULT_BASE, README_NAME, WEIGHTS_NAME
from ..utils.serialization import load_tensors
from .checkpoints import resolve_resume
from .clap_config import CLaPConfig
from .clap_init import init_latent_space_from_pool
from .clap_losses import (
    aggregate_posterior_kl,
    analytic_kl,
    info_nce,
    negative_indices,
    sequence_log_likelihood,
)
from .metrics import CollectedMetricsMixin


logger = logging.get_logger(__name__)


class CLaPTrainer(CollectedMetricsMixin, Trainer):
    """Trains the latent encoder and adapter of a [`PrefAlignForCausalLM`] on one-to-many data.

    Loss = `nll_weight` * NLL + `kl_weight` * KL + `contrastive_weight` * InfoNCE (see [`CLaPConfig`]). The dataset
    is a response pool: one row per prompt with its `responses` (or a TRL preference dataset, whose chosen and
    rejected responses are pooled per prompt). Each step takes whole prompt groups.

    Logged metrics: `loss/nll`, `loss/kl`, `loss/contrastive`, `contrastive/accuracy` (own latent ranked first among
    the candidates), `latent/active_dims` (dimensions with mean KL above `active_dim_threshold`), and in evaluation
    also `nll/zero_latent` (the NLL with z = 0, to compare with the posterior's).

    Args:
        model (`PrefAlignForCausalLM`, `PreTrainedModel` or `str`):
            The backbone; a plain causal LM (or its name) is wrapped with [`PrefAlignForCausalLM.from_base`].
        args (`CLaPConfig`, *optional*): training settings; defaults write to `clap-<model name>`.
        train_dataset, eval_dataset (`Dataset`): response pools.
        processing_class (`PreTrainedTokenizerBase`): the base model's tokenizer (required unless `model` is a name).
    """

    _tag_names = ["hf-prefalign", "clap"]
    _name = "CLaP"

    def __init__(
        self,
        model: PrefAlignForCausalLM | PreTrainedModel | str,
        args: CLaPConfig | None = None,
        data_collator: Any | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        **kwargs: Any,
    ):
        # Model
        if args is None:
            name = model if isinstance(model, str) else getattr(model, "name_or_path", "") or "backbone"
            args = CLaPConfig(output_dir=f"clap-{Path(str(name)).name.split(':')[-1]}")
        if not isinstance(args, CLaPConfig):
            raise TypeError(f"`args` must be a CLaPConfig, got {type(args).__name__}.")
        if isinstance(model, str):
            if model == EMBEDDED_DEFAULT_BASE:
                base, tokenizer = load_default_base()
            else:
                from transformers import AutoTokenizer

                base, tokenizer = model, AutoTokenizer.from_pretrained(model)
            processing_class = processing_class or tokenizer
            model = PrefAlignForCausalLM.from_base(base)
        elif not isinstance(model, PrefAlignForCausalLM):
            model = PrefAlignForCausalLM.from_base(model)
        if args.freeze_base:
            model.freeze_base()
        else:
            model.unfreeze_base()
        if args.gradient_skip_path:
            model.enable_gradient_skip_path()
        if not any(p.requires_grad for p in model.latent_parameters()):
            raise ValueError(
                "None of the backbone's latent parameters is trainable. `from_pretrained` loads a backbone frozen, for "
                "inference: load it with `PrefAlignForCausalLM.from_pretrained(path, is_trainable=True)` to train it "
                "(`get_peft_model` also freezes everything but its adapters)."
            )

        # Processing class
        if processing_class is None:
            raise ValueError("CLaPTrainer needs the base model's tokenizer: pass `processing_class=tokenizer`.")
        if processing_class.pad_token_id is None:
            processing_class.pad_token = processing_class.eos_token
        if processing_class.eos_token_id is None:
            raise ValueError("The tokenizer has no EOS token; responses must end with one.")
        model.check_tokenizer(processing_class)

        # Data collator
        if data_collator is None:
            data_collator = DataCollatorForResponseGroups(
                pad_token_id=processing_class.pad_token_id, max_responses=args.responses_per_step, seed=args.seed
            )

        # Dataset: sequences longer than the model's context would index past its position table.
        limit = context_limit(model.config.text_config)
        if limit is not None and args.max_length > limit - model.config.num_encoder_queries:
            logger.warning(
                f"max_length={args.max_length} exceeds the base model's context ({limit} positions, "
                f"{model.config.num_encoder_queries} of them for the encoder's queries); using "
                f"max_length={limit - model.config.num_encoder_queries}."
            )
            args.max_length = max(2, limit - model.config.num_encoder_queries)
        if train_dataset is not None:
            train_dataset = self._prepare_dataset(train_dataset, processing_class, args, "train")
        if eval_dataset is not None:
            if isinstance(eval_dataset, dict):
                eval_dataset = {
                    key: self._prepare_dataset(ds, processing_class, args, key) for key, ds in eval_dataset.items()
                }
            else:
                eval_dataset = self._prepare_dataset(eval_dataset, processing_class, args, "eval")

        # Pinned memory needs an accelerator; without one torch warns on every dataloader and pins nothing.
        if args.dataloader_pin_memory and not torch.accelerator.is_available():
            args.dataloader_pin_memory = False

        self._init_metrics()
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        # compute_loss returns a per-batch mean, so Trainer must divide it by the gradient accumulation steps.
        self.model_accepts_loss_kwargs = False
        self._check_distributed_setup()
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    # ------------------------------------------------------------------
    # Data
    # ------------------------------------------------------------------
    @staticmethod
    def _prepare_dataset(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, args: CLaPConfig, name: str) -> Dataset:
        """Pool -> `prompt_input_ids` + `responses_input_ids` (each response ending with EOS), checked."""
        if len(dataset) == 0:
            raise ValueError(f"The {name} dataset is empty.")
        if "prompt_input_ids" in dataset.column_names and "responses_input_ids" in dataset.column_names:
            return dataset  # already tokenized
        pool = as_response_pool(dataset)
        eos = tokenizer.eos_token_id

        def tokenize(row: dict[str, Any]) -> dict[str, Any]:
            prompt_ids = tokenize_prompt(tokenizer, row[PROMPT_COLUMN])
            truncated = 0
            if len(prompt_ids) > args.max_length - 2:  # keep room for at least one response token and EOS
                prompt_ids = prompt_ids[-(args.max_length - 2) :]
                truncated += 1
            room = args.max_length - len(prompt_ids) - 1
            responses = []
            for text in row[RESPONSES_COLUMN]:
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                if len(ids) > room:
                    ids, truncated = ids[:room], truncated + 1
                responses.append(ids + [eos])
            return {"prompt_input_ids": prompt_ids, "responses_input_ids": responses, "num_truncated": truncated}

        tokenized = pool.map(tokenize, remove_columns=pool.column_names, desc=f"Tokenizing {name} pool")
        num_truncated = sum(tokenized["num_truncated"])
        if num_truncated:
            logger.warning(
                f"{num_truncated} prompt(s)/response(s) of the {name} dataset exceed max_length={args.max_length} "
                "tokens and were truncated."
            )
        tokenized = tokenized.remove_columns("num_truncated")
        if args.contrastive_weight > 0:
            sizes = [len(r) for r in tokenized["responses_input_ids"]]
            small = sum(size < 2 for size in sizes)
            if small and args.too_few_responses == "error":
                raise ValueError(
                    f"{small} prompt(s) of the {name} dataset have fewer than 2 responses, which the contrastive term "
                    "needs. Drop them, set too_few_responses='skip', or contrastive_weight=0."
                )
            if small:
                logger.warning(f"Skipping {small} prompt(s) of the {name} dataset with fewer than 2 responses.")
                tokenized = tokenized.filter(lambda row: len(row["responses_input_ids"]) >= 2)
            if len(tokenized) == 0:
                raise ValueError(f"No prompt of the {name} dataset has 2 or more responses.")
        return tokenized

    def _check_distributed_setup(self) -> None:
        """Each process must get whole prompt groups of its own: the KL and InfoNCE terms compare responses of one
        prompt within one process's batch, so a prompt group is never cut, and never shared, across processes."""
        if self.is_fsdp_enabled:
            # The posterior is computed by `backbone.posterior`, outside the wrapped root module's forward, where FSDP
            # has not gathered the sharded parameters (docs/distributed.md says what was tried).
            raise ValueError(
                "CLaPTrainer does not support FSDP yet: the latent encoder runs outside the wrapped model's forward, "
                "where FSDP's parameters are still sharded. Launch with DDP (`accelerate launch --multi_gpu` or "
                "`torchrun`); with the base frozen, only the small latent modules are trained and replicated."
            )
        config = self.args.accelerator_config
        if config.split_batches or config.dispatch_batches:
            raise ValueError(
                "CLaP needs whole prompt groups in every process: `accelerator_config.split_batches` and "
                "`dispatch_batches` would cut the collated responses of a prompt across processes. Leave them False; "
                "`per_device_train_batch_size` prompts go to each process."
            )
        global_batch = self.args.world_size * self.args.per_device_train_batch_size
        if self.args.world_size > 1 and self.train_dataset is not None and len(self.train_dataset) < global_batch:
            raise ValueError(
                f"The train dataset has {len(self.train_dataset)} prompt(s), fewer than one step takes: "
                f"{self.args.world_size} process(es) x per_device_train_batch_size="
                f"{self.args.per_device_train_batch_size}. Every process needs prompts of its own: add prompts, "
                "lower per_device_train_batch_size or launch fewer processes."
            )

    # ------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mode = "train" if model.training else "eval"
        backbone: PrefAlignForCausalLM = self.accelerator.unwrap_model(model)
        args: CLaPConfig = self.args
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        labels, group_index = inputs["labels"], inputs["group_index"]

        posterior = backbone.posterior(input_ids, attention_mask, response_mask=labels != -100)  # (N, Z) each
        # Training samples z by reparameterisation; evaluation uses the posterior mean (deterministic metrics).
        latents = posterior.rsample() if mode == "train" else posterior.mean  # (N, Z)
        # Only positions that predict response tokens need logits: skip the shared prompt (lm_head is ~20% of a pass).
        keep = self._positions_to_score(labels)
        labels = labels[:, -keep:]
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, latents=latents, logits_to_keep=keep
        ).logits  # (N, keep, V)
        own_ll, num_tokens = sequence_log_likelihood(logits, labels)  # (N,), (N,)
        nll_per_token = -own_ll.sum() / num_tokens.sum().clamp(min=1)
        # Per sequence (summed over tokens), the NLL and the KL are the two halves of one ELBO. A token-averaged NLL
        # would make every nat of KL cost as much as ~T nats of sequence likelihood: the posterior collapses to the prior.
        nll = -own_ll.mean() if args.nll_reduction == "sequence" else nll_per_token

        per_dim_kl = analytic_kl(posterior)  # (Z,)
        if args.kl_estimator == "aggregate":
            kl = aggregate_posterior_kl(posterior, group_index, args.kl_samples).sum()
        else:
            kl = per_dim_kl.sum()

        kl_weight = self._current_kl_weight() if mode == "train" else args.kl_weight
        loss = args.nll_weight * nll + kl_weight * kl
        metrics = {
            "loss/nll": nll.detach(),
            "nll/per_token": nll_per_token.detach(),
            "loss/kl": kl.detach(),
            "latent/active_dims": (per_dim_kl.detach() > args.active_dim_threshold).sum().float(),
        }
        if args.kl_warmup_steps > 0:
            metrics["loss/kl_weight"] = torch.tensor(kl_weight)
        if args.contrastive_weight > 0 or mode == "eval":
            num_negatives = args.contrastive_num_negatives if mode == "train" else None
            negatives = negative_indices(group_index, num_negatives)  # (N, C-1)
            rows = torch.arange(input_ids.shape[0], device=input_ids.device).repeat_interleave(negatives.shape[1])
            candidates = latents
            own_scores = own_ll
            if mode == "train" and args.contrastive_latents == "mean":
                candidates = posterior.mean
                own_logits = model(
                    input_ids=input_ids, attention_mask=attention_mask, latents=candidates, logits_to_keep=keep
                ).logits
                own_scores, _ = sequence_log_likelihood(own_logits, labels)
            neg_logits = model(
                input_ids=input_ids[rows],
                attention_mask=attention_mask[rows],
                latents=candidates[negatives.reshape(-1)],
                logits_to_keep=keep,
            ).logits
            neg_ll, _ = sequence_log_likelihood(neg_logits, labels[rows])  # (N * (C-1),)
            scores = torch.cat([own_scores.unsqueeze(1), neg_ll.view(negatives.shape)], dim=1)  # (N, C)
            contrastive, accuracy = info_nce(scores)
            if args.contrastive_weight > 0:
                loss = loss + args.contrastive_weight * contrastive
            metrics["loss/contrastive"] = contrastive.detach()
            metrics["contrastive/accuracy"] = accuracy
            metrics["contrastive/num_candidates"] = torch.tensor(float(scores.shape[1]))
        if mode == "eval":
            with torch.no_grad():
                zero_logits = model(
                    input_ids=input_ids, attention_mask=attention_mask, latents=None, logits_to_keep=keep
                ).logits
                zero_ll, _ = sequence_log_likelihood(zero_logits, labels)
            metrics["nll/zero_latent"] = -zero_ll.sum() / num_tokens.sum().clamp(min=1)  # per token
            metrics["nll/posterior"] = nll_per_token.detach()

        self._record_metrics(mode, metrics)
        return (loss, {"logits": logits}) if return_outputs else loss

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Trainer's optimizer; the encoder's pretrained blocks move to their own group with
        `encoder_blocks_learning_rate` when it is set (the LR scheduler then scales both groups alike)."""
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        lr = self.args.encoder_blocks_learning_rate
        if lr is None or getattr(optimizer, "_prefalign_blocks_group", False):
            return optimizer
        backbone: PrefAlignForCausalLM = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not hasattr(backbone.latent_encoder, "blocks"):
            raise ValueError("`encoder_blocks_learning_rate` applies to the 'blocks' encoder; this backbone has none.")
        block_ids = {id(p) for p in backbone.latent_encoder.blocks.parameters()}
        for group in list(optimizer.param_groups):
            moved = [p for p in group["params"] if id(p) in block_ids]
            if moved:
                group["params"] = [p for p in group["params"] if id(p) not in block_ids]
                settings = {key: value for key, value in group.items() if key != "params"}
                optimizer.add_param_group({**settings, "params": moved, "lr": lr})
        optimizer._prefalign_blocks_group = True
        return optimizer

    def _current_kl_weight(self) -> float:
        """`kl_weight`, scaled by the linear KL warm-up (`kl_warmup_steps`) at the current step."""
        warmup = self.args.kl_warmup_steps
        if warmup <= 0:
            return self.args.kl_weight
        if warmup < 1:  # a fraction of all training steps
            warmup = warmup * max(self.state.max_steps, 1)
        return self.args.kl_weight * min(1.0, self.state.global_step / warmup)

    def get_eval_dataloader(self, eval_dataset: Dataset | str | None = None):
        """Evaluation ranks every response of a prompt: no response subsampling."""
        collator = self.data_collator
        if isinstance(collator, DataCollatorForResponseGroups) and collator.max_responses is not None:
            self.data_collator = DataCollatorForResponseGroups(collator.pad_token_id, collator.label_pad_token_id)
            try:
                return super().get_eval_dataloader(eval_dataset)
            finally:
                self.data_collator = collator
        return super().get_eval_dataloader(eval_dataset)

    # ------------------------------------------------------------------
    # What training did (feeds the model card)
    # ------------------------------------------------------------------
    _SUMMARY_SETTINGS = (
        "learning_rate",
        "num_train_epochs",
        "max_steps",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "nll_weight",
        "kl_weight",
        "kl_warmup_steps",
        "contrastive_weight",
        "kl_estimator",
        "kl_samples",
        "contrastive_num_negatives",
        "contrastive_latents",
        "responses_per_step",
        "encoder_blocks_learning_rate",
        "latent_init",
        "latent_init_scale",
        "freeze_base",
        "gradient_skip_path",
        "max_length",
        "seed",
    )

    def _init_latent_space(self, resuming: bool) -> dict[str, Any] | None:
        """The PCA start of `latent_init="pca"`, once, before the first step of a fresh backbone."""
        backbone: PrefAlignForCausalLM = self.accelerator.unwrap_model(self.model)
        encoder = backbone.latent_encoder
        if (
            self.args.latent_init != "pca"
            or resuming
            or self.train_dataset is None
            or not isinstance(encoder, HiddenStateEncoder)
            or int(encoder.feature_mean_updates) > 0  # trained (or started) before: continue from there
        ):
            return None
        was_training = backbone.training
        backbone.eval()
        summary = init_latent_space_from_pool(
            backbone,
            self.train_dataset,
            pad_token_id=self.processing_class.pad_token_id,
            adapter_scale=self.args.latent_init_scale,
            max_prompts=self.args.latent_init_max_prompts,
            batch_size=max(self.args.per_device_eval_batch_size, 8),
        )
        backbone.train(was_training)
        return summary

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        # `True` skips a newest checkpoint that a kill left incomplete; a missing path is an error, not a fresh start.
        resume_from_checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        start = time.perf_counter()
        init_summary = self._init_latent_space(resuming=bool(resume_from_checkpoint))
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        seconds = time.perf_counter() - start
        metric_start = time.perf_counter()
        fisher = self.estimate_latent_metric()
        metric_seconds = time.perf_counter() - metric_start
        dataset = self.train_dataset
        logs = [
            log for log in self.state.log_history if "loss/nll" in log and not any(k.startswith("eval_") for k in log)
        ]
        final = logs[-1] if logs else {}
        backbone: PrefAlignForCausalLM = self.accelerator.unwrap_model(self.model)
        backbone.training_summary = {
            "method": "clap",
            "prompts": len(dataset) if dataset is not None else None,
            "responses": sum(len(r) for r in dataset["responses_input_ids"]) if dataset is not None else None,
            "steps": output.global_step,
            "train_seconds": round(seconds, 1),
            "settings": {key: getattr(self.args, key) for key in self._SUMMARY_SETTINGS},
            "latent_init": init_summary,
            "latent_metric": None
            if fisher is None
            else {
                "prompts": min(self.args.latent_metric_prompts, len(dataset)),
                "trace": round(float(fisher.trace()), 4),
                "seconds": round(metric_seconds, 1),
            },
            "final_metrics": {
                key: round(value, 4)
                for key, value in final.items()
                if key.split("/")[0] in ("loss", "contrastive", "latent") and isinstance(value, float)
            },
        }
        return output

    def estimate_latent_metric(self, num_prompts: int | None = None) -> torch.Tensor | None:
        """Measure the Fisher metric of z on the first `num_prompts` prompts of the training pool (default:
        `args.latent_metric_prompts`) and store it in the backbone, which saves it; returns it (`None` when there is
        nothing to measure on). `train` calls it after the last step; [`estimate_latent_metric`] does the same for a
        backbone trained without it."""
        num_prompts = self.args.latent_metric_prompts if num_prompts is None else num_prompts
        if self.train_dataset is None:
            return None
        backbone: PrefAlignForCausalLM = self.accelerator.unwrap_model(self.model)
        return _measure_latent_metric(backbone, self.train_dataset, self.data_collator, num_prompts, self.args.seed)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        metrics = super().evaluate(*args, **kwargs)
        backbone: PrefAlignForCausalLM = self.accelerator.unwrap_model(self.model)
        if backbone.training_summary is not None:
            backbone.training_summary["evaluation"] = {
                key: round(value, 4) for key, value in metrics.items() if "/" in key and isinstance(value, float)
            }
        return metrics

    _positions_to_score = staticmethod(positions_to_score)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, None, None]:
        """Evaluation computes the CLaP loss and its metrics; there are no predictions to return."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

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
        """Write the backbone's card ([`backbone_card`]: base model, architecture, CLaP record) to
        `output_dir/README.md`, instead of transformers' generic one. An existing README there is updated."""
        if not self.is_world_process_zero():
            return
        backbone: PrefAlignForCausalLM = self.accelerator.unwrap_model(self.model)
        output_dir = Path(self.args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_card(
            lambda: add_tags(
                backbone_card(
                    backbone,
                    repo_id=self.hub_model_id or self.args.hub_model_id,
                    with_tokenizer=self.processing_class is not None,
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
        """Save the backbone to `output_dir` and upload it (latent modules, base reference, tokenizer, its own card)
        to `args.hub_model_id` (default: the name of `output_dir`); returns the commit URL.

        Unlike [`~transformers.Trainer.push_to_hub`], only the backbone and its tokenizer are uploaded, never
        `output_dir`'s checkpoints, optimizer states or `training_args.bin`. The upload is synchronous (`blocking`
        is accepted for compatibility).
        """
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self.create_model_card(**kwargs)
        backbone: PrefAlignForCausalLM = self.accelerator.unwrap_model(self.model)
        repo_id = self.hub_model_id or self.args.hub_model_id or Path(self.args.output_dir).name
        tags = kwargs.get("tags")

        def write(folder: Path) -> None:
            backbone.save_pretrained(folder, repo_id=repo_id, with_tokenizer=self.processing_class is not None)
            if tags:
                card = add_tags(ModelCard.load(folder / README_NAME), tags)
                card.save(str(folder / README_NAME))
            if self.processing_class is not None:
                self.processing_class.save_pretrained(folder)

        return push_folder(
            write,
            repo_id,
            token=self.args.hub_token if token is None else token,
            private=self.args.hub_private_repo if private is None else private,
            revision=self.args.hub_revision if revision is None else revision,
            commit_message=commit_message or "End of training",
        )

    # ------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Trainer's `save_model` (the main process writes); in a checkpoint, then a barrier: the backbone's save
        replaces its folder whole, so the other processes may write their `rng_state_<rank>.pth` there only after.
        (A user's call, maybe from the main process alone, waits for no one.)"""
        super().save_model(output_dir, _internal_call)
        if _internal_call:
            self.accelerator.wait_for_everyone()

    def _load_best_model(self) -> None:
        """`load_best_model_at_end`: restore the best checkpoint the same way as a resume (base included)."""
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Restore the latent modules (and the base, when the checkpoint holds it) from a CLaP checkpoint."""
        backbone: PrefAlignForCausalLM = self.accelerator.unwrap_model(model or self.model)
        directory = Path(resume_from_checkpoint)
        if not (directory / WEIGHTS_NAME).is_file():
            raise ValueError(f"Can't find a valid checkpoint at {resume_from_checkpoint}: no {WEIGHTS_NAME}.")
        backbone.load_latent_weights(directory / WEIGHTS_NAME)
        base_dir = directory / BASE_MODEL_SUBFOLDER
        if base_dir.is_dir():
            state = {}
            for shard in sorted(base_dir.glob("*.safetensors")):
                state.update(load_tensors(shard))
            result = backbone.get_base_model().load_state_dict(state, strict=False)
            missing = [k for k in result.missing_keys if k not in backbone.get_base_model().all_tied_weights_keys]
            if missing or result.unexpected_keys:
                raise OSError(
                    f"The base model in {base_dir} does not match: missing {missing[:5]}, "
                    f"unexpected {result.unexpected_keys[:5]}."
                )
        logger.info(f"Restored the backbone from {os.fspath(directory)}.")


def _measure_latent_metric(
    backbone: PrefAlignForCausalLM, groups: Dataset, collator: Any, num_prompts: int, seed: int
) -> torch.Tensor | None:
    """The per-token Fisher metric of z over the responses of the first `num_prompts` tokenized prompt groups,
    stored in `backbone.latent_adapter.fisher`."""
    if num_prompts <= 0 or len(groups) == 0:
        return None
    was_training = backbone.training
    backbone.eval()
    generator = torch.Generator(device=backbone.device).manual_seed(seed)
    total, positions = None, 0
    try:
        for index in range(min(num_prompts, len(groups))):
            batch = collator([groups[index]])  # one prompt's responses (at most `responses_per_step`)
            labels = batch["labels"].to(backbone.device)
            fisher_sum, count = latent_fisher(
                backbone,
                batch["input_ids"].to(backbone.device),
                batch["attention_mask"].to(backbone.device),
                labels != -100,
                generator=generator,
            )
            total = fisher_sum if total is None else total + fisher_sum
            positions += count
    finally:
        backbone.train(was_training)
    if total is None or positions == 0:
        return None
    fisher = total / positions
    backbone.latent_adapter.fisher.copy_(fisher)
    return fisher


def estimate_latent_metric(
    model: PrefAlignForCausalLM,
    pool: Dataset,
    processing_class: PreTrainedTokenizerBase,
    *,
    num_prompts: int = 8,
    responses_per_prompt: int = 8,
    seed: int = 0,
) -> torch.Tensor | None:
    """Measure the Fisher metric of z of a trained backbone (frozen or not) on a response pool and store it in the
    backbone (`model.latent_fisher`; `save_pretrained` then saves it): what `CLaPTrainer.train` does after its last
    step, for a backbone trained before the metric existed. No training step runs.

    Args:
        model (`PrefAlignForCausalLM`): the backbone.
        pool (`datasets.Dataset`): a response pool (`prompt`, `responses`), e.g. the one CLaP trained on.
        processing_class (`PreTrainedTokenizerBase`): the backbone's tokenizer.
        num_prompts (`int`, *optional*, defaults to 8): prompts of `pool` whose responses measure it.
        responses_per_prompt (`int`, *optional*, defaults to 8): responses of each prompt (a seeded subset).
        seed (`int`, *optional*, defaults to 0): for the subset and the token draws.

    Returns:
        The `(Z, Z)` metric, or `None` when `num_prompts` is 0.
    """
    if num_prompts < 0:
        raise ValueError(f"`num_prompts` must be >= 0, got {num_prompts}.")
    if processing_class.pad_token_id is None:
        processing_class.pad_token = processing_class.eos_token
    args = CLaPConfig(output_dir="latent-metric", report_to=[], contrastive_weight=0.0)
    groups = CLaPTrainer._prepare_dataset(pool, processing_class, args, "metric")
    collator = DataCollatorForResponseGroups(
        pad_token_id=processing_class.pad_token_id, max_responses=responses_per_prompt, seed=seed
    )
    return _measure_latent_metric(model, groups, collator, num_prompts, seed)


__all__ = ["CLaPTrainer", "estimate_latent_metric"]
