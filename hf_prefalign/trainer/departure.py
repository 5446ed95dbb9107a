"""A user's departure from the base, in nats: the prior's mean scaled to a target KL under the backbone's latent metric.

Latent DPO decides *which way* a user's z points; how *far* it goes is left to the scale of the DPO objective (beta,
epochs, how separable the pairs are), and the fluency cost of a step in z differs between directions. With
`LatentDPOConfig.target_kl`, the trained prior's mean is scaled so that its z costs `target_kl` nats per response
token, 1/2 z^T F z with F the backbone's Fisher metric (`models/prefalign/latent_metric.py`), averaged over the user's
training prompts. Every user then departs from the base by the same amount, chosen once on a validation split
(docs/preference_space.md), instead of by whatever the optimiser left.
"""

from __future__ import annotations

import torch

from ..models.prefalign.latent_metric import departure_record, departure_scale, quadratic_kl
from ..preference.embedding import PreferenceEmbedding


@torch.no_grad()
def scale_to_target_kl(
    embedding: PreferenceEmbedding, fisher: torch.Tensor, target_kl: float, features: torch.Tensor
) -> dict[str, float]:
    """Scale `embedding`'s mean (constant and prompt-dependent parts alike) in place so that its z departs from the
    base by `target_kl` nats per token on average over `features` `(N, F)` (the user's training prompts).

    Returns the record that [`LatentDPOTrainer`] keeps in the embedding's `config.training`: `target_kl`,
    `departure_before` (nats per token as trained) and `departure_scale` (the factor applied).
    """
    means = embedding(features.to(embedding.bias.device)).mean  # (N, Z)
    departure = quadratic_kl(means, fisher.to(means.device)).mean()
    scale = float(departure_scale(departure, target_kl))
    latent_dim = embedding.config.latent_dim
    embedding.bias[:latent_dim] *= scale
    embedding.up[:, :latent_dim] *= scale
    return departure_record(target_kl, float(departure), scale)


__all__ = ["scale_to_target_kl"]
