"""Metric collection shared by the trainers: collect scalars in the loss, flush them in `log` (TRL's pattern)."""

from __future__ import annotations

from collections import defaultdict

import torch


class CollectedMetricsMixin:
    """Adds `_record_metrics` for `compute_loss`, averages them at each `log`, and returns them from `evaluate()`.

    Keys are `/`-namespaced (`loss/nll`, `rewards/accuracy`); evaluation prefixes them with `eval_`.
    """

    def _init_metrics(self) -> None:
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _record_metrics(self, mode: str, metrics: dict[str, torch.Tensor]) -> None:
        # One gather per step for all metrics: each becomes its mean over the processes (every process records the
        # same keys in the same order, as they run the same loss).
        values = torch.stack(
            [torch.as_tensor(value, dtype=torch.float32, device=self.accelerator.device) for value in metrics.values()]
        )
        gathered = self.accelerator.gather(values.detach().unsqueeze(0)).mean(0).tolist()
        for key, value in zip(metrics, gathered, strict=True):
            self._metrics[mode][key].append(value)

    def _flush_metrics(self, mode: str) -> dict[str, float]:
        metrics = {key: sum(values) / len(values) for key, values in self._metrics[mode].items() if values}
        self._metrics[mode].clear()
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = self._flush_metrics(mode)
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        super().log({**logs, **metrics}, start_time)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        for key, value in self._flush_metrics("eval").items():
            output.metrics[f"{metric_key_prefix}_{key}"] = value
        return output


__all__ = ["CollectedMetricsMixin"]
