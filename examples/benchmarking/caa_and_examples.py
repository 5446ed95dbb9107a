"""The methods with no gradient step: CAA (steering vectors) and personalisation from examples, timed."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from steering_baselines import caa_vectors_for

from benchmarking.arguments import BenchmarkArguments
from benchmarking.measuring import PeakMemory, folder_bytes
from benchmarking.setting_up import Setup
from hf_prefalign import LatentCache


def default_caa_layers(num_layers: int) -> list[int]:
    """A quarter and half of the depth (8 and 15 of 30 layers, as in docs/preference_space.md)."""
    return sorted({min(max(round(num_layers * f), 0), num_layers - 1) for f in (0.25, 0.5)})


def caa_vectors_timed(
    setup: Setup, pairs: Dataset, layers: list[int], args: BenchmarkArguments
) -> tuple[dict[int, torch.Tensor], float, dict[str, float]]:
    """CAA's per-user "training": one activation pass over the pairs (every grid layer read at once), timed."""
    base = setup.backbone.get_base_model()
    gc.collect()
    with PeakMemory() as peak:
        start = time.perf_counter()
        vectors = caa_vectors_for(base, setup.backbone.layout, setup.tokenizer, pairs, layers, args.caa_max_length)
        seconds = time.perf_counter() - start
    return vectors, seconds, peak.figures


def save_caa_vector(vector: torch.Tensor, layer: int, multiplier: float, directory: Path) -> Path:
    """The chosen CAA vector (already multiplied) as one safetensors file, layer and multiplier in its metadata."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "caa_vector.safetensors"
    metadata = {"layer": str(layer), "multiplier": str(multiplier), "method": "caa"}
    save_file({"vector": (multiplier * vector).contiguous().float()}, str(path), metadata=metadata)
    return path


def from_examples_timed(
    setup: Setup, cache: LatentCache, pairs: Dataset, directory: Path
) -> tuple[dict[str, Any], Any]:
    """`PreferenceEmbedding.from_examples` from the pairs (chosen liked, rejected disliked), timed and saved."""
    from hf_prefalign import PreferenceEmbedding

    liked = [{"prompt": row["prompt"], "response": row["chosen"]} for row in pairs]
    disliked = [{"prompt": row["prompt"], "response": row["rejected"]} for row in pairs]
    gc.collect()
    with PeakMemory() as peak:
        start = time.perf_counter()
        embedding = PreferenceEmbedding.from_examples(
            setup.backbone, setup.tokenizer, liked, disliked, latent_cache=cache
        )
        seconds = time.perf_counter() - start
    embedding.save_pretrained(directory)
    total, weights = folder_bytes(directory)
    figures = {
        "train_seconds": seconds,
        "train_seconds_all": [seconds],
        "steps": 0,
        **peak.figures,
        "artefact_bytes": total,
        "weights_bytes": weights,
        "trainable_parameters": sum(p.numel() for p in embedding.parameters()),
        "final_loss": None,
        "learning_rate": None,
    }
    return figures, embedding
