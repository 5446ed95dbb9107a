"""Training: Latent DPO (ours) and the TRL baselines (LoRA-DPO, prefix-tuning DPO), timed per user."""

from __future__ import annotations

import gc
import statistics
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from benchmarking.arguments import BenchmarkArguments
from benchmarking.fairness import method_config_kwargs
from benchmarking.measuring import folder_bytes, timed_train, trainable_parameters
from benchmarking.prefix_tuning import init_prefix_from_tokens
from benchmarking.setting_up import Setup
from hf_prefalign import LatentCache, LatentDPOConfig, LatentDPOTrainer


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
