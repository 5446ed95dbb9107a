"""The Latent DPO loss (stage 2): a user's prior trained on latents, never on text."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..modeling.distributions import DiagonalGaussian


def latent_dpo_loss(
    prior: DiagonalGaussian,
    chosen: DiagonalGaussian,
    rejected: DiagonalGaussian,
    beta: float = 0.1,
    num_samples: int = 16,
    gap_quantile: float = 0.75,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Latent DPO over a batch of preference pairs.

    Per pair: draw M latents each from N(0, I), q(z|x,y_w) and q(z|x,y_l) (no gradient); latent reward
    r(z) = q_w(z) / (q_w(z) + q_l(z)); implicit reward rho(z) = log p_user(z|x) - log N(z; 0, I). Among the 3M
    latents, keep the ordered pairs (a, b) whose reward gap r(z_a) - r(z_b) is positive and at least the pair's
    `gap_quantile` of gaps; loss = mean of -log sigmoid(beta * (rho(z_a) - rho(z_b))). All in fp32.

    Args:
        prior (`DiagonalGaussian`): p_user(z|x) for each pair, `(B, Z)` (carries the gradient).
        chosen, rejected (`DiagonalGaussian`): cached posteriors of the chosen / rejected responses, `(B, Z)`.

    Returns:
        `(loss, metrics)` with metrics `pairs/kept` (mean kept latent pairs per example), `rewards/margin`
        (mean rho gap over kept pairs), `rewards/accuracy` (fraction of kept pairs with rho_a > rho_b).
    """
    with torch.no_grad():
        noise = torch.randn((num_samples, *chosen.mean.shape), generator=generator, device=chosen.mean.device)
        z = torch.cat(
            [
                noise,
                chosen.rsample(num_samples, generator=generator),
                rejected.rsample(num_samples, generator=generator),
            ]
        )  # (3M, B, Z)
        reward = torch.sigmoid(chosen.log_prob(z) - rejected.log_prob(z))  # (3M, B)
        gaps = reward.unsqueeze(1) - reward.unsqueeze(0)  # (3M_a, 3M_b, B): r(z_a) - r(z_b)
        n = z.shape[0]
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=z.device)
        threshold = torch.quantile(gaps[off_diagonal], gap_quantile, dim=0)  # (B,)
        keep = (gaps >= threshold) & (gaps > 0) & off_diagonal.unsqueeze(-1)  # (3M, 3M, B)
    # The reference goes through the same code as the prior, so a prior equal to N(0, I) gives rho = 0 exactly.
    reference = DiagonalGaussian.standard_normal(tuple(prior.mean.shape), device=prior.mean.device)
    rho = prior.log_prob(z) - reference.log_prob(z)  # (3M, B)
    margins = rho.unsqueeze(1) - rho.unsqueeze(0)  # (3M_a, 3M_b, B)
    weights = keep.float()
    count = weights.sum().clamp(min=1.0)
    loss = (-F.logsigmoid(beta * margins) * weights).sum() / count
    metrics = {
        "pairs/kept": weights.sum() / chosen.mean.shape[0],
        "rewards/margin": (margins.detach() * weights).sum() / count,
        "rewards/accuracy": ((margins.detach() > 0).float() * weights).sum() / count,
    }
    return loss, metrics


__all__ = ["latent_dpo_loss"]
