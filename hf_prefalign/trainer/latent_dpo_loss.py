"""The Latent DPO loss (stage 2): a user's prior trained on latents, never on text."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..distributions import DiagonalGaussian


def _pairwise_differences(values: torch.Tensor) -> torch.Tensor:
    """`values[a] - values[b]` over the n(n-1)/2 unordered pairs {a, b} of the last dimension: `(..., n)` -> `(..., K)`.

    Pairs are enumerated by cyclic distance, (a, (a + k) mod n) for k = 1 .. (n-1)//2, plus (a, a + n/2) for a < n/2
    when n is even: every unordered pair exactly once, computed from strided windows of the values (no gather, whose
    forward and backward cost several times more on the CPU).
    """
    n = values.shape[-1]
    half = (n - 1) // 2
    extended = torch.cat([values, values[..., : half + 1]], dim=-1)  # (..., n + half + 1)
    shifted = extended.unfold(-1, n, 1)[..., 1 : half + 1, :]  # (..., half, n): row k-1 holds values[(a + k) % n]
    differences = (values.unsqueeze(-2) - shifted).flatten(-2)  # (..., half * n)
    if n % 2 == 0:
        opposite = values[..., : n // 2] - values[..., n // 2 :]  # (..., n / 2)
        differences = torch.cat([differences, opposite], dim=-1)
    return differences


def _pair_indices(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent indices `(a, b)` of each unordered pair, in `_pairwise_differences`'s order: `(K,)` each."""
    positions = torch.arange(n, dtype=torch.float64)
    half = (n - 1) // 2
    extended = torch.cat([positions, positions[: half + 1]])
    first = positions.expand(half, n).flatten()
    second = extended.unfold(-1, n, 1)[1 : half + 1].flatten()
    if n % 2 == 0:
        first = torch.cat([first, positions[: n // 2]])
        second = torch.cat([second, positions[n // 2 :]])
    return first.long(), second.long()


def _log_density_ratio(z: torch.Tensor, chosen: DiagonalGaussian, rejected: DiagonalGaussian) -> torch.Tensor:
    """log q_w(z) - log q_l(z) for each pair's latents `z` `(..., B, N, Z)`: `(..., B, N)`, in fp32.

    Written per dimension as a difference of squared standardised distances, which stays accurate for sharp
    posteriors (expanding the squares would cancel large terms).
    """
    chosen_part = (z - chosen.mean.unsqueeze(-2)).square_().mul_(torch.exp(-chosen.logvar).unsqueeze(-2))
    rejected_part = (z - rejected.mean.unsqueeze(-2)).square_().mul_(torch.exp(-rejected.logvar).unsqueeze(-2))
    log_det = (rejected.logvar - chosen.logvar).sum(-1, keepdim=True)  # (..., B, 1)
    return 0.5 * (rejected_part.sub_(chosen_part).sum(-1) + log_det)


def _sorted(values: torch.Tensor) -> torch.Tensor:
    """`values` sorted along the last dimension. On the CPU through NumPy, whose vectorised sort of short float rows
    is an order of magnitude faster than `torch.sort` there (the values, hence the result, are the same)."""
    if values.device.type == "cpu":
        return torch.from_numpy(np.sort(values.numpy(), axis=-1))
    return values.sort(dim=-1).values


def _gap_threshold(size: torch.Tensor, quantile: float) -> torch.Tensor | None:
    """The `quantile` of the signed reward gaps over all ordered pairs a != b, from the unordered gap sizes.

    The signed gaps of n latents are the K = n(n-1)/2 sizes |r(z_a) - r(z_b)| and their negatives (floating-point
    subtraction is exactly antisymmetric), so their sorted list is the negated sizes in descending order followed by
    the sizes in ascending order: any order statistic is a size, read from a sort of K values instead of 2K.
    Interpolated linearly between the two neighbouring order statistics, exactly as `torch.quantile` does.

    Args:
        size (`torch.Tensor` of shape `(..., K)`): the gap sizes of each pair of responses.

    Returns:
        `torch.Tensor` of shape `(..., 1)`, or `None` when the threshold cannot be positive (then every positive gap
        passes it).
    """
    num = size.shape[-1]
    rank = torch.tensor(quantile, dtype=size.dtype) * (2 * num - 1)  # as torch.quantile: q * (N - 1), in fp32
    below, above = int(rank.floor()), int(rank.ceil())
    if above < num:  # both neighbours are negated sizes: the threshold is <= 0
        return None
    ordered = _sorted(size)  # (..., K)

    def order_statistic(index: int) -> torch.Tensor:  # the index-th smallest signed gap, (..., 1)
        if index >= num:
            return ordered[..., index - num : index - num + 1]
        return -ordered[..., num - 1 - index : num - index]

    low = order_statistic(below)
    if above == below:
        return low
    return torch.lerp(low, order_statistic(above), rank - below)


def _kept_gaps(
    z: torch.Tensor, chosen: DiagonalGaussian, rejected: DiagonalGaussian, gap_quantile: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward gaps r(z_a) - r(z_b) of each pair's unordered latent pairs `(..., B, K)`, from its latents
    `(..., B, 3M, Z)`, and which of them are kept: a positive size at or above the pair's `gap_quantile`."""
    reward = torch.sigmoid(_log_density_ratio(z, chosen, rejected))  # (..., B, 3M)
    gaps = _pairwise_differences(reward)
    size = gaps.abs()
    keep = size > 0
    threshold = _gap_threshold(size, gap_quantile)  # (..., B, 1)
    if threshold is not None:
        keep &= size >= threshold
    return gaps, keep


@dataclass
class KeptLatentPairs:
    """The kept latent pairs of G preference pairs, as what their DPO margins need from the latents.

    A kept pair (a, b) of pair g contributes `softplus(f . [quadratic, linear])` to the loss of a prior with
    `rho(z) = z^2 . quadratic + z . linear` (see [`latent_dpo_loss`]), with the margin features
    `f = -beta * sign(r(z_a) - r(z_b)) * [z_a^2 - z_b^2, z_a - z_b]` (`features()`): one prior's margins over a
    pair's kept latent pairs are one matrix product, and the latents, rewards and gap threshold (no gradient) are
    computed once for every prior that meets the same latents.

    Attributes:
        terms (`torch.Tensor` of shape `(G, 3M, 2Z)`): `[z^2, z]` of each pair's latents.
        first, second (`torch.Tensor` of shape `(G, k)`): the latents of each kept pair, padded to the largest count.
        scale (`torch.Tensor` of shape `(G, k)`): `-beta * sign` of each kept pair's reward gap, 0 on padding.
        count (`torch.Tensor` of shape `(G,)`): kept pairs per preference pair.
    """

    terms: torch.Tensor
    first: torch.Tensor
    second: torch.Tensor
    scale: torch.Tensor
    count: torch.Tensor

    @property
    def width(self) -> int:
        """k, the largest number of kept pairs (the padded width)."""
        return self.first.shape[-1]

    @property
    def mask(self) -> torch.Tensor:
        """`(G, k)`: `True` for real (unpadded) kept pairs."""
        return self.scale != 0

    def features(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """The margin features of pairs `start:end`, `(g, k, 2Z)`, zero on padding. Built on demand, a few pairs at
        a time: for a whole step they would be the largest tensor, written once and read twice."""
        terms = self.terms[start:end]
        first, second, scale = self.first[start:end], self.second[start:end], self.scale[start:end]
        rows = terms.flatten(0, 1)  # (g * 3M, 2Z)
        offset = (torch.arange(terms.shape[0], device=terms.device) * terms.shape[1]).unsqueeze(-1)

        def pick(index: torch.Tensor) -> torch.Tensor:  # whole rows: much faster than an expanded gather
            return rows.index_select(0, (index + offset).flatten()).view(*index.shape, rows.shape[-1])

        return pick(first).sub_(pick(second)).mul_(scale.unsqueeze(-1))


def kept_latent_pairs(
    latents: torch.Tensor,
    chosen: DiagonalGaussian,
    rejected: DiagonalGaussian,
    beta: float = 0.1,
    gap_quantile: float = 0.75,
) -> KeptLatentPairs:
    """The latent pairs that [`latent_dpo_loss`] keeps for each preference pair, for their margins.

    Args:
        latents (`torch.Tensor` of shape `(G, 3M, Z)`): each pair's latents, as `latent_dpo_loss` orders them.
        chosen, rejected (`DiagonalGaussian`): the pairs' cached posteriors, `(G, Z)`.
        beta, gap_quantile: as in [`latent_dpo_loss`].

    Returns:
        [`KeptLatentPairs`]; `latent_dpo_loss` on a prior equals the mean of `softplus(features() . theta)` over the
        kept pairs, `theta = prior_margin_weights(prior)` (up to float rounding).
    """
    with torch.no_grad():
        z = latents.float()
        gaps, keep = _kept_gaps(z, chosen, rejected, gap_quantile)  # (G, K) each
        count = keep.sum(-1)  # (G,)
        width = int(count.max()) if count.numel() else 0
        # Each group's kept pairs first (in pair order), cut to the largest count: (G, k)
        kept = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[:, :width]
        mask = torch.arange(width, device=z.device) < count.unsqueeze(-1)
        first, second = (index.to(z.device)[kept] for index in _pair_indices(z.shape[-2]))
        scale = torch.sign(gaps.gather(-1, kept)).mul_(-beta).mul_(mask)  # (G, k), 0 on padding
    return KeptLatentPairs(torch.cat([z.square(), z], dim=-1), first, second, scale, count)


def prior_margin_weights(prior: DiagonalGaussian) -> torch.Tensor:
    """`theta = [quadratic, linear]` `(..., 2Z)` of a prior: `rho(z) = z^2 . quadratic + z . linear + c`."""
    quadratic = -0.5 * torch.expm1(-prior.logvar)
    linear = prior.mean * torch.exp(-prior.logvar)
    return torch.cat([quadratic, linear], dim=-1)


def latent_dpo_loss(
    prior: DiagonalGaussian,
    chosen: DiagonalGaussian,
    rejected: DiagonalGaussian,
    beta: float = 0.1,
    num_samples: int = 16,
    gap_quantile: float = 0.75,
    generator: torch.Generator | None = None,
    *,
    latents: torch.Tensor | None = None,
    pair_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Latent DPO over a batch of preference pairs, for one user or for many at once.

    Per pair: draw M latents each from N(0, I), q(z|x,y_w) and q(z|x,y_l) (no gradient); latent reward
    r(z) = q_w(z) / (q_w(z) + q_l(z)); implicit reward rho(z) = log p_user(z|x) - log N(z; 0, I). Among the 3M
    latents, keep the ordered pairs (a, b) whose reward gap r(z_a) - r(z_b) is positive and at least the pair's
    `gap_quantile` of gaps; loss = mean of -log sigmoid(beta * (rho(z_a) - rho(z_b))). All in fp32.

    Leading dimensions before `(B, Z)` are independent problems (e.g. users `U`): each gets its own loss, averaged
    over its own kept latent pairs, so summing the losses gives every user exactly the gradient it would get alone.
    Only the unordered latent pairs are formed (at most one orientation of each has a positive gap), which halves
    the work of the ordered-pair formulation and gives the same loss.

    Args:
        prior (`DiagonalGaussian`): p_user(z|x) for each pair, `(..., B, Z)` (carries the gradient).
        chosen, rejected (`DiagonalGaussian`): cached posteriors of the chosen / rejected responses, `(..., B, Z)`.
        beta (`float`, *optional*, defaults to 0.1): DPO's inverse temperature.
        num_samples (`int`, *optional*, defaults to 16): M, latents drawn from each of the three distributions.
        gap_quantile (`float`, *optional*, defaults to 0.75): keep the latent pairs at or above this quantile of gaps.
        generator (`torch.Generator`, *optional*): source of the latents when `latents` is not given.
        latents (`torch.Tensor` of shape `(3M, ..., B, Z)`, *optional*): the latents to use instead of drawing them:
            M from N(0, I), then M from `chosen`, then M from `rejected` (how a batched trainer gives each user its
            own random stream).
        pair_mask (`torch.Tensor` of shape `(..., B)`, *optional*): `False` marks padding pairs, which count nowhere.

    Returns:
        `(loss, metrics)`, each of shape `(...)` (a scalar for one user), with metrics `pairs/kept` (mean kept latent
        pairs per example), `rewards/margin` (mean rho gap over kept pairs), `rewards/accuracy` (fraction of kept
        pairs with rho_a > rho_b).
    """
    with torch.no_grad():
        if latents is None:
            noise = torch.randn((num_samples, *chosen.mean.shape), generator=generator, device=chosen.mean.device)
            latents = torch.cat(
                [
                    noise,
                    chosen.rsample(num_samples, generator=generator),
                    rejected.rsample(num_samples, generator=generator),
                ]
            )  # (3M, ..., B, Z)
        elif latents.shape[1:] != chosen.mean.shape:
            raise ValueError(
                f"`latents` must have shape (3M, *{tuple(chosen.mean.shape)}), got {tuple(latents.shape)}."
            )
        z = latents.float().movedim(0, -2).contiguous()  # (..., B, 3M, Z): each pair's latents together
        gaps, keep = _kept_gaps(z, chosen, rejected, gap_quantile)  # (..., B, K) each
        if pair_mask is not None:
            keep &= pair_mask.unsqueeze(-1)
        # -beta where z_a is the preferred latent of the pair, +beta where z_b is: the softplus argument's sign
        scale = torch.sign(gaps).mul_(-beta)
        z_squared = z.square()
    # rho(z) = log p_user(z|x) - log N(z; 0, I) = sum_k z_k^2 (1 - 1/var_k) / 2 + z_k mean_k / var_k + c, with c the
    # same for every latent of a pair: it cancels in each margin rho(z_a) - rho(z_b) and is left out. Two
    # contractions over Z instead of two full log-densities; a prior equal to N(0, I) gives rho = 0 exactly.
    quadratic = -0.5 * torch.expm1(-prior.logvar)  # (..., B, Z)
    linear = prior.mean * torch.exp(-prior.logvar)  # (..., B, Z)
    rho = (z_squared * quadratic.unsqueeze(-2)).sum(-1) + (z * linear.unsqueeze(-2)).sum(-1)  # (..., B, 3M)
    # -beta * (rho of the preferred latent - rho of the other), per unordered pair: (..., B, K)
    scaled_margins = scale * _pairwise_differences(rho)
    weights = keep.float()
    count = weights.sum(dim=(-2, -1))  # (...)
    denominator = count.clamp(min=1.0)
    # -log sigmoid(beta * margin) = softplus(-beta * margin), averaged over the kept latent pairs
    loss = (F.softplus(scaled_margins) * weights).sum(dim=(-2, -1)) / denominator
    with torch.no_grad():
        num_pairs = chosen.mean.shape[-2] if pair_mask is None else pair_mask.sum(-1).clamp(min=1)
        metrics = {
            "pairs/kept": count / num_pairs,
            "rewards/margin": (scaled_margins * weights).sum(dim=(-2, -1)) / (-beta * denominator),
            "rewards/accuracy": ((scaled_margins < 0) & keep).sum(dim=(-2, -1)) / denominator,
        }
    return loss, metrics


__all__ = ["KeptLatentPairs", "kept_latent_pairs", "latent_dpo_loss", "prior_margin_weights"]
