"""The three CLaP loss terms as plain functions of tensors (so each can be tested on hand-made inputs)."""

from __future__ import annotations

import math

import torch

from ..distributions import DiagonalGaussian
from ..models.prefalign.likelihood import sequence_log_likelihood


def aggregate_posterior_kl(
    posterior: DiagonalGaussian, group_index: torch.Tensor, num_samples: int = 16
) -> torch.Tensor:
    """Monte-Carlo KL between each group's aggregated posterior and N(0, I), per latent dimension.

    For a sample z ~ q_i of a response i in group g (the responses of one prompt), the estimate is, per dimension d,
    log((1/B_g) sum_j q_jd(z_d)) - log N(z_d; 0, 1). Averaged over samples and responses, summed over dimensions.
    It pulls the *mixture* of a prompt's posteriors towards the prior, so single posteriors may stay sharp while
    the prompt's latents spread over N(0, I), which keeps the prior a fair reference for every prompt.

    Args:
        posterior (`DiagonalGaussian`): q(z|x,y_i), mean and logvar of shape `(N, Z)`.
        group_index (`torch.Tensor` of shape `(N,)`): prompt of each response.
        num_samples (`int`, *optional*, defaults to 16): samples drawn from each posterior.

    Returns:
        `torch.Tensor` of shape `(Z,)`: the KL estimate of each dimension (averaged over groups).
    """
    z = posterior.rsample(num_samples)  # (M, N, Z)
    # log q_j(z_i^m) per dimension for every pair (i, j): (M, N_i, N_j, Z)
    pairwise = DiagonalGaussian(posterior.mean.unsqueeze(0), posterior.logvar.unsqueeze(0)).log_prob_per_dim(
        z.unsqueeze(2)
    )
    same_group = (group_index.unsqueeze(1) == group_index.unsqueeze(0)).float()  # (N_i, N_j)
    group_sizes = same_group.sum(-1)  # (N_i,)
    masked = pairwise + torch.log(same_group).unsqueeze(0).unsqueeze(-1)  # -inf outside i's group
    log_mixture = torch.logsumexp(masked, dim=2) - torch.log(group_sizes).view(1, -1, 1)  # (M, N, Z)
    log_prior = -0.5 * (math.log(2 * math.pi) + z**2)  # (M, N, Z)
    return (log_mixture - log_prior).mean(dim=(0, 1))


def analytic_kl(posterior: DiagonalGaussian) -> torch.Tensor:
    """Mean over responses of KL(q_i || N(0, I)) per dimension, shape `(Z,)`."""
    return posterior.kl_to_standard_normal().mean(0)


def info_nce(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE over candidate latents, the own latent at column 0.

    Args:
        scores (`torch.Tensor` of shape `(N, C)`): `scores[i, c]` = log p(y_i | x, z_c) for the C candidate latents of
            response i; column 0 holds its own latent, the others are negatives from the same prompt.

    Returns:
        `(loss, accuracy)`: mean cross-entropy towards column 0, and the fraction of rows ranking it first. A row
        whose own score ties with k-1 others counts 1/k (so identical latents score chance, not 100%).
    """
    scores = scores.float()
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    loss = torch.nn.functional.cross_entropy(scores, target)
    best = scores.max(dim=-1, keepdim=True).values
    at_best = scores == best  # (N, C)
    accuracy = (at_best[:, 0].float() / at_best.sum(-1).float()).mean()
    return loss, accuracy


def negative_indices(
    group_index: torch.Tensor, num_negatives: int | None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """For each response, the indices of other responses of its prompt whose latents serve as negatives.

    Args:
        group_index (`torch.Tensor` of shape `(N,)`): prompt of each response.
        num_negatives (`int`, *optional*): cap on negatives per response (random subset); `None` uses all.

    Returns:
        `torch.LongTensor` of shape `(N, C-1)`, with C-1 = min(num_negatives, smallest group size - 1).
    """
    n = group_index.shape[0]
    same = group_index.unsqueeze(1) == group_index.unsqueeze(0)
    same.fill_diagonal_(False)
    available = int(same.sum(-1).min())
    if available == 0:
        raise ValueError("Every prompt needs at least 2 responses for the contrastive term.")
    count = available if num_negatives is None else min(num_negatives, available)
    # Random scores, then the `count` highest among allowed columns: a uniform subset without replacement.
    noise = torch.rand(n, n, generator=generator, device=group_index.device)
    noise = noise.masked_fill(~same, -1.0)
    return noise.topk(count, dim=-1).indices


__all__ = ["aggregate_posterior_kl", "analytic_kl", "info_nce", "negative_indices", "sequence_log_likelihood"]
