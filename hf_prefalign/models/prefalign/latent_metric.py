"""How far a latent z moves the base: the Fisher metric of z, so that a user's departure is measured in nats.

Near z = 0 the per-token KL between the steered and the neutral next-token distributions is a quadratic form,
KL(p_z || p_0) ~= 1/2 z^T F z, with F the Fisher information of z averaged over response tokens. F is a `(Z, Z)`
property of the backbone (its adapter on its base), estimated once from prompt + response texts (`CLaPTrainer` does
it after training); then the fluency cost of any user's z is a 32 x 32 product, with no LM pass. Latent DPO uses it
to put each user at the same departure from the base (`LatentDPOConfig.target_kl`).

The estimate is the sampled Fisher: at z = 0, draw each scored position's next token from the model itself (the
context stays the real text), take the gradient G of the drawn tokens' summed log-likelihood with respect to the
row's z, and average G G^T per scored position. Draws at different positions are independent given their context,
so the cross terms vanish in expectation and E[G G^T] is the sum of the positions' Fisher matrices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .likelihood import positions_to_score


if TYPE_CHECKING:
    from .modeling_prefalign import PrefAlignForCausalLM


def latent_fisher(
    model: PrefAlignForCausalLM,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    num_draws: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int]:
    """The summed sampled-Fisher outer products of z over one batch, and how many positions they cover.

    Args:
        model ([`PrefAlignForCausalLM`]): the backbone; only z gets a gradient.
        input_ids (`torch.LongTensor` of shape `(B, T)`): prompt + response tokens, padded on either side.
        attention_mask (`torch.Tensor` of shape `(B, T)`): 1 for real tokens.
        response_mask (`torch.Tensor` of shape `(B, T)`): 1 for the response's tokens, whose predictions are scored.
        num_draws (`int`, *optional*, defaults to 1): independent token draws per row (the row is repeated).
        generator (`torch.Generator`, *optional*): for the token draws.

    Returns:
        `(fisher_sum, num_positions)`: the `(Z, Z)` fp32 sum of G G^T over rows and draws, and the number of scored
        positions times `num_draws`. Their ratio is the per-token Fisher.
    """
    if num_draws < 1:
        raise ValueError(f"`num_draws` must be at least 1, got {num_draws}.")
    ids = input_ids.repeat_interleave(num_draws, dim=0)  # (R, T), R = B * num_draws
    mask = attention_mask.repeat_interleave(num_draws, dim=0)
    scored = response_mask.repeat_interleave(num_draws, dim=0).bool()
    keep = positions_to_score(torch.where(scored, ids, -100))
    predicts = torch.zeros_like(scored)  # position t predicts token t + 1
    predicts[:, :-1] = scored[:, 1:]
    predicts = predicts[:, -keep:]  # (R, keep)
    latents = torch.zeros(ids.shape[0], model.config.latent_dim, device=ids.device, requires_grad=True)
    with torch.enable_grad():
        logits = model(
            input_ids=ids, attention_mask=mask, latents=latents, logits_to_keep=keep, use_cache=False
        ).logits
        with torch.no_grad():
            probs = torch.softmax(logits[predicts].float(), dim=-1)  # (N, V)
            drawn = torch.multinomial(probs, 1, generator=generator)  # (N, 1)
            # d log p(drawn) / d logits = onehot(drawn) - p: the backward pass needs no log-softmax graph.
            cotangent = torch.zeros_like(logits)
            cotangent[predicts] = (
                (-probs).scatter_add_(1, drawn, torch.ones_like(drawn, dtype=probs.dtype)).to(logits.dtype)
            )
        (grads,) = torch.autograd.grad(logits, latents, grad_outputs=cotangent)  # (R, Z): each row's G
    grads = grads.float()
    return grads.T @ grads, int(predicts.sum())


def quadratic_kl(latents: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """The per-token KL of each z under the metric, 1/2 z^T F z: `(..., Z)` -> `(...)`, in fp32."""
    latents = latents.float()
    return 0.5 * ((latents @ fisher.float()) * latents).sum(-1)


# Below this departure (nats per token) z is taken to be the neutral z = 0 (an untrained encoder gives exactly 0):
# there is no direction to scale.
MIN_DEPARTURE = 1e-10


def departure_scale(departure: torch.Tensor, target_kl: float) -> torch.Tensor:
    """The factor on a z (or a prior's mean) that moves a departure of `departure` nats per token to `target_kl` (1
    where z is 0): the KL is quadratic in z, so the factor is a square root. Elementwise over any shape, in float64."""
    departure = departure.double()
    return torch.where(
        departure > MIN_DEPARTURE, (target_kl / departure.clamp(min=MIN_DEPARTURE)).sqrt(), torch.ones_like(departure)
    )


def departure_record(target_kl: float, departure: float, scale: float) -> dict[str, float]:
    """What a user's `config.training` records of its scaling, the same for trained users (one at a time or many) and
    users from examples: `target_kl`, `departure_before` (nats per token before, 6 significant digits) and
    `departure_scale` (the factor applied)."""
    return {"target_kl": target_kl, "departure_before": float(f"{float(departure):.6g}"), "departure_scale": scale}


__all__ = ["MIN_DEPARTURE", "departure_record", "departure_scale", "latent_fisher", "quadratic_kl"]
