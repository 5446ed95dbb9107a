"""Users without training: a preference embedding from a few liked examples, and mixtures of users.

Both produce ordinary [`PreferenceEmbedding`]s (saved, banked and served like trained ones). The code lives here so
that `preference.py` stays the artefact (parameters, save/load, checks) and this module the recipes that build one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import TYPE_CHECKING, Any

import torch
from transformers.utils import logging

from ..data.prompts import is_conversational, response_text
from ..distributions import DiagonalGaussian
from ..utils.constants import DEFAULT_TARGET_KL
from .embedding import PreferenceEmbedding, PreferenceEmbeddingConfig


if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..data.latent_cache import LatentCache
    from ..models.prefalign.modeling_prefalign import PrefAlignForCausalLM


logger = logging.get_logger(__name__)

# TRL's unpaired preference format (KTO) names the columns `completion` and `label`; ours `response` and `liked`.
_RESPONSE_KEYS = ("response", "completion")
_LIKED_KEYS = ("liked", "label")


# ----------------------------------------------------------------------
# Mixing weights
# ----------------------------------------------------------------------
def normalize_mix_weights(labelled: Sequence[tuple[str, Any]]) -> list[float]:
    """The weights of `(label, weight)` pairs divided by their sum; a `ValueError` / `TypeError` names the bad one.

    Mixing is a convex combination: weights must be finite, non-negative numbers, at least one of them positive.
    """
    if not labelled:
        raise ValueError("Nothing to mix: give at least one user and its weight.")
    weights = []
    for label, weight in labelled:
        if isinstance(weight, bool) or not isinstance(weight, Real):
            raise TypeError(f"The mixing weight of {label} must be a number, got {type(weight).__name__}: {weight!r}.")
        weight = float(weight)
        if not math.isfinite(weight):
            raise ValueError(f"The mixing weight of {label} is {weight}: weights must be finite.")
        if weight < 0:
            raise ValueError(
                f"The mixing weight of {label} is {weight}: weights must be non-negative (a mix is convex)."
            )
        weights.append(weight)
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"The mixing weights sum to {total}: at least one weight must be positive.")
    return [weight / total for weight in weights]


def mix_embeddings(
    embeddings: Mapping[PreferenceEmbedding, float] | Sequence[PreferenceEmbedding],
    weights: Sequence[float] | None = None,
) -> PreferenceEmbedding:
    """See [`PreferenceEmbedding.mix`]."""
    if isinstance(embeddings, Mapping):
        if weights is not None:
            raise ValueError("Give the weights either as the mapping's values or as `weights=`, not both.")
        members, weights = list(embeddings), list(embeddings.values())
    elif isinstance(embeddings, Sequence):
        members = list(embeddings)
        weights = [1.0] * len(members) if weights is None else list(weights)
        if len(weights) != len(members):
            raise ValueError(f"Got {len(weights)} weights for {len(members)} embeddings.")
    else:
        raise TypeError(
            "`embeddings` must be a mapping {embedding: weight} or a list of embeddings, got "
            f"{type(embeddings).__name__}."
        )
    for index, member in enumerate(members):
        if not isinstance(member, PreferenceEmbedding):
            raise TypeError(f"Embedding {index} of the mix is a {type(member).__name__}, not a PreferenceEmbedding.")
    weights = normalize_mix_weights([(f"embedding {i}", w) for i, w in enumerate(weights)])
    first = members[0].config
    for index, member in enumerate(members[1:], start=1):
        config = member.config
        if config.backbone_fingerprint != first.backbone_fingerprint:
            raise ValueError(
                f"Embedding {index} of the mix was trained against another backbone (fingerprint "
                f"{config.backbone_fingerprint[:12]}, embedding 0's is {first.backbone_fingerprint[:12]}): only users "
                "of the same backbone can be mixed."
            )
        sizes = (config.latent_dim, config.feature_dim, config.logvar_min, config.logvar_max)
        expected = (first.latent_dim, first.feature_dim, first.logvar_min, first.logvar_max)
        if sizes != expected:
            raise ValueError(
                f"Embedding {index} of the mix has (latent_dim, feature_dim, logvar_min, logvar_max)={sizes}, "
                f"embedding 0 has {expected}: only embeddings of the same shape and bounds can be mixed."
            )
    # mean(x) = bias + (f(x) @ down) @ up is linear in (bias, up) given `down`: stacking the members' `down` side by
    # side and their weighted `up` on top of each other gives sum_i w_i mean_i(x) exactly, for every prompt.
    used = [(w, m) for w, m in zip(weights, members, strict=True) if w > 0]
    low_rank = [(w, m) for w, m in used if bool(m.up.detach().ne(0).any())]
    with torch.no_grad():
        bias = sum(w * m.bias.detach().float() for w, m in used)  # (2Z,)
        if low_rank:
            down = torch.cat([m.down.detach().float() for _, m in low_rank], dim=1)  # (F, sum of ranks)
            up = torch.cat([w * m.up.detach().float() for w, m in low_rank], dim=0)  # (sum of ranks, 2Z)
        else:  # prompt-independent members (e.g. built from examples): keep the first one's rank, all zero
            down = members[0].down.detach().float().clone()
            up = torch.zeros_like(members[0].up, dtype=torch.float32)
    config = PreferenceEmbeddingConfig(
        latent_dim=first.latent_dim,
        feature_dim=first.feature_dim,
        backbone_fingerprint=first.backbone_fingerprint,
        rank=down.shape[1],
        logvar_min=first.logvar_min,
        logvar_max=first.logvar_max,
        base_model=first.base_model,
        backbone=first.backbone,
        training={
            "method": "mix",
            "components": len(members),
            "weights": [round(w, 6) for w in weights],
            "component_methods": [m.config.training.get("method", "unknown") for m in members],
        },
    )
    mixed = _new_embedding(config)
    with torch.no_grad():
        mixed.bias.copy_(bias)
        mixed.down.copy_(down)
        mixed.up.copy_(up)
    return mixed.to(members[0].bias.device)


# ----------------------------------------------------------------------
# From examples
# ----------------------------------------------------------------------
def _rows(examples: Any, name: str) -> list[Mapping[str, Any]]:
    from datasets import Dataset

    if isinstance(examples, Dataset):
        columns = set(examples.column_names)
        if "prompt" not in columns or not columns & set(_RESPONSE_KEYS):
            raise ValueError(
                f"The {name} examples need `prompt` and `response` columns; found {examples.column_names}."
            )
        return list(examples)
    if isinstance(examples, (str, bytes, Mapping)) or not isinstance(examples, Sequence):
        raise TypeError(
            f"The {name} examples must be a list of {{'prompt': ..., 'response': ...}} dicts or a datasets.Dataset, "
            f"got {type(examples).__name__}"
            + (" (wrap a single example in a list)." if isinstance(examples, Mapping) else ".")
        )
    for index, row in enumerate(examples):
        if not isinstance(row, Mapping):
            raise TypeError(f"The {name} example {index} is a {type(row).__name__}, not a dict with prompt/response.")
    return list(examples)


def read_examples(examples: Any, disliked: Any = None) -> tuple[list[tuple[Any, str]], list[tuple[Any, str]]]:
    """`(prompt, response)` pairs of the liked and the disliked examples.

    Rows of `examples` with `liked` (or TRL's `label`) false count as disliked; rows of `disliked` are disliked.
    Responses may be text or TRL conversational completions; prompts text or chat messages.
    """
    liked_pairs: list[tuple[Any, str]] = []
    disliked_pairs: list[tuple[Any, str]] = []
    sources = [("liked", examples, True)] + ([] if disliked is None else [("disliked", disliked, False)])
    for name, source, default in sources:
        for index, row in enumerate(_rows(source, name)):
            prompt = row.get("prompt")
            response = next((row[key] for key in _RESPONSE_KEYS if row.get(key) is not None), None)
            if prompt is None or response is None:
                raise ValueError(
                    f"The {name} example {index} lacks a `prompt` or a `response`; it has keys {sorted(row)}."
                )
            if not (isinstance(prompt, str) or is_conversational(prompt)):
                raise TypeError(
                    f"The {name} example {index} has a prompt of type {type(prompt).__name__}; expected text or a "
                    "list of chat messages."
                )
            liked = next((row[key] for key in _LIKED_KEYS if row.get(key) is not None), default)
            if not isinstance(liked, bool):
                raise TypeError(f"The {name} example {index} has liked={liked!r}; expected true or false.")
            if not default and liked:
                raise ValueError(f"The disliked example {index} is marked liked=true.")
            (liked_pairs if liked else disliked_pairs).append((prompt, response_text(response)))
    if not liked_pairs:
        found = f" (only {len(disliked_pairs)} disliked)" if disliked_pairs else ""
        raise ValueError(
            f"No liked examples{found}: give at least one {{'prompt': ..., 'response': ...}} the user liked."
        )
    return liked_pairs, disliked_pairs


def precision_weighted(posteriors: DiagonalGaussian) -> tuple[torch.Tensor, torch.Tensor]:
    """Per dimension, the precision-weighted mean of `(N, Z)` posteriors and the variance of their moment-matched
    mixture (mean within-example variance, harmonically averaged, plus the spread of the means): `(Z,)`, `(Z,)`.

    Precision weights let the examples the encoder is sure about speak loudest; the mixture's variance makes the
    user's prior cover every liked example rather than shrink with k.
    """
    precision = torch.exp(-posteriors.logvar)  # (N, Z)
    weights = precision / precision.sum(dim=0, keepdim=True)  # (N, Z), columns sum to 1
    mean = (weights * posteriors.mean).sum(dim=0)  # (Z,)
    spread = (posteriors.mean - mean).pow(2)  # (N, Z)
    variance = (weights * (torch.exp(posteriors.logvar) + spread)).sum(dim=0)  # (Z,)
    return mean, variance


def _new_embedding(config: PreferenceEmbeddingConfig) -> PreferenceEmbedding:
    # The constructor draws `down` from the global RNG: fork it, so building a user leaves callers' seeds alone, and
    # draw from a fixed seed, so the same inputs give byte-identical files.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return PreferenceEmbedding(config)


def embedding_from_examples(
    model: PrefAlignForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    examples: Any,
    disliked: Any = None,
    *,
    disliked_weight: float = 1.0,
    variance: float | None = None,
    rank: int = 8,
    latent_cache: LatentCache | None = None,
    target_kl: float | None = DEFAULT_TARGET_KL,
) -> PreferenceEmbedding:
    """See [`PreferenceEmbedding.from_examples`]."""
    from ..data.latent_cache import LatentCache
    from ..models.prefalign.latent_metric import departure_record, departure_scale, quadratic_kl
    from ..models.prefalign.modeling_prefalign import PrefAlignForCausalLM

    start = time.perf_counter()
    if not isinstance(model, PrefAlignForCausalLM):
        raise TypeError(f"`model` must be a PrefAlignForCausalLM backbone, got {type(model).__name__}.")
    if (
        isinstance(disliked_weight, bool)
        or not isinstance(disliked_weight, Real)
        or not (math.isfinite(disliked_weight) and disliked_weight >= 0)
    ):
        raise ValueError(f"`disliked_weight` must be a finite number >= 0, got {disliked_weight!r}.")
    if target_kl is not None and (
        isinstance(target_kl, bool)
        or not isinstance(target_kl, Real)
        or not (math.isfinite(target_kl) and target_kl > 0)
    ):
        raise ValueError(f"`target_kl` must be a positive number of nats per token or None, got {target_kl!r}.")
    liked_pairs, disliked_pairs = read_examples(examples, disliked)
    model.check_tokenizer(tokenizer)
    if latent_cache is None:
        latent_cache = LatentCache(model, tokenizer)
    else:
        fingerprint = model.fingerprint()
        if latent_cache.fingerprint != fingerprint:
            raise ValueError(
                f"The latent cache was built for another backbone (fingerprint {latent_cache.fingerprint[:12]}, "
                f"this model's is {fingerprint[:12]}): its posteriors do not live in this model's latent space."
            )
    config = PreferenceEmbeddingConfig(
        latent_dim=model.config.latent_dim,
        feature_dim=model.config.text_config.hidden_size,
        backbone_fingerprint=latent_cache.fingerprint,
        rank=rank,
        base_model=model.config.base_model_name_or_path,
        backbone=model.name_or_path or None,
    )
    lo, hi = config.logvar_min, config.logvar_max
    if variance is not None and (
        isinstance(variance, bool) or not isinstance(variance, Real) or not math.exp(lo) < variance < math.exp(hi)
    ):
        raise ValueError(
            f"`variance` must be a number between exp(logvar_min)={math.exp(lo):.4g} and "
            f"exp(logvar_max)={math.exp(hi):.4g}, got {variance!r}."
        )

    # Posteriors q(z|x,y) of the examples, through the same encoding path as Latent DPO
    prompts, responses = zip(*liked_pairs, strict=True)
    mean, moment_variance = precision_weighted(latent_cache.posteriors(list(prompts), list(responses)))
    if disliked_pairs and disliked_weight > 0:
        prompts, responses = zip(*disliked_pairs, strict=True)
        disliked_mean, _ = precision_weighted(latent_cache.posteriors(list(prompts), list(responses)))
        mean = mean - disliked_weight * disliked_mean
    if float(mean.norm()) < 1e-6:
        logger.warning(
            f"The {len(liked_pairs)} liked example(s) all have the posterior mean z = 0, so this user is the neutral "
            "model. The backbone's encoder looks untrained: train it with CLaPTrainer first."
        )
    target = torch.full_like(mean, float(variance)) if variance is not None else moment_variance
    departure = {}
    if target_kl is not None:
        fisher = model.latent_fisher
        if fisher is None:
            logger.warning(
                f"target_kl={target_kl} is not applied: the backbone's latent metric was never measured, so the user "
                "keeps the length of the examples' mean difference. Measure it with "
                "`hf_prefalign.trainer.estimate_latent_metric(backbone, pool, tokenizer)` and save the backbone."
            )
        else:  # the prior is the same for every prompt: its departure is that of its mean
            before = quadratic_kl(mean, fisher.to(mean.device))
            scale = float(departure_scale(before, float(target_kl)))
            mean = mean * scale
            departure = departure_record(float(target_kl), float(before), scale)

    config.training = {
        "method": "from_examples",
        "liked": len(liked_pairs),
        "disliked": len(disliked_pairs),
        "disliked_weight": float(disliked_weight),
        "variance": "moment-matched" if variance is None else float(variance),
        **departure,
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    embedding = _new_embedding(config)
    set_constant_prior(embedding, mean, target)
    return embedding.eval()


def constant_prior_bias(mean: torch.Tensor, variance: torch.Tensor, config: PreferenceEmbeddingConfig) -> torch.Tensor:
    """The `bias` `(..., 2Z)` whose prior, with no prompt-dependent part, is N(mean, diag(variance)) (`(..., Z)`
    each)."""
    lo, hi = config.logvar_min, config.logvar_max
    # Invert logvar = lo + (hi - lo) * sigmoid(raw + shift) (see PreferenceEmbedding); a logvar at a bound is
    # unreachable, so it is pulled just inside.
    fraction = ((variance.float().log() - lo) / (hi - lo)).clamp(1e-4, 1 - 1e-4)  # (..., Z)
    raw_logvar = torch.logit(fraction) - math.log(-lo / hi)
    return torch.cat([mean.float(), raw_logvar], dim=-1)  # (..., 2Z)


def set_constant_prior(embedding: PreferenceEmbedding, mean: torch.Tensor, variance: torch.Tensor) -> None:
    """Make `embedding` the prompt-independent prior N(mean, diag(variance)) (`(Z,)` each), in place."""
    with torch.no_grad():
        embedding.bias.copy_(constant_prior_bias(mean, variance, embedding.config))  # (2Z,)
        embedding.up.zero_()  # no prompt-dependent part: the same z for every prompt


def pairs_mean_difference(
    chosen: DiagonalGaussian, rejected: DiagonalGaussian, rejected_weight: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a user who preferred `chosen` over `rejected` (`(N, Z)` posteriors) sits in z: the precision-weighted
    mean of the chosen posteriors minus `rejected_weight` times that of the rejected ones, and the variance of the
    chosen posteriors' moment-matched mixture; `(Z,)`, `(Z,)`. What [`PreferenceEmbedding.from_examples`] builds
    from liked and disliked examples, and what Latent DPO starts from with `prior_init="pairs"`."""
    mean, variance = precision_weighted(chosen)
    if rejected_weight > 0:
        mean = mean - rejected_weight * precision_weighted(rejected)[0]
    return mean, variance


__all__ = [
    "constant_prior_bias",
    "embedding_from_examples",
    "mix_embeddings",
    "normalize_mix_weights",
    "pairs_mean_difference",
    "precision_weighted",
    "read_examples",
    "set_constant_prior",
]
