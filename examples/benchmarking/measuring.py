"""Measuring: peak memory, timing of `trainer.train()`, summary statistics, artefact sizes."""

from __future__ import annotations

import gc
import math
import resource
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


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
