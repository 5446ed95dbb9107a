"""The hidden-state encoder q(z|x,y): a linear head over the frozen base's own mid-layer states of the response."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from ...distributions import DiagonalGaussian
from .architectures import DecoderLayout
from .configuration_prefalign import PrefAlignConfig


class _StopForward(Exception):
    """Raised by the capture hook once the requested layer's input is read: the layers above never run."""


@torch.no_grad()
def read_hidden_states(
    base_model: PreTrainedModel,
    layout: DecoderLayout,
    layers: list[int],
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
) -> list[torch.Tensor]:
    """The residual stream entering each decoder layer of `layers`, `(B, T, hidden)` each, from one no-grad pass.

    The pass stops at the highest requested layer, so reading layer l of an L-layer base costs about l / L of a
    forward pass. Positions are counted from the first real token, as the base does without padding.
    """
    decoder_layers = layout.decoder_layers(base_model)
    captured: dict[int, torch.Tensor] = {}
    last = max(layers)

    def capture(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            captured[index] = args[0] if args else kwargs["hidden_states"]
            if index == last:
                raise _StopForward

        return hook

    handles = [decoder_layers[i].register_forward_pre_hook(capture(i), with_kwargs=True) for i in sorted(set(layers))]
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    try:
        base_model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return [captured[i] for i in layers]


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `(B, T, H)` states over the positions where `mask` `(B, T)` is set, in fp32: `(B, H)`."""
    weights = mask.to(torch.float32).unsqueeze(-1)  # (B, T, 1)
    return (states.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)


@torch.no_grad()
def batch_mean(features: torch.Tensor) -> torch.Tensor:
    """Mean of `(B, ...)` features over the batch and, in a distributed run, over every process's batch (as
    `SyncBatchNorm` does): a running mean updated with it is the same in every process, and the same as one process
    with the global batch computes. Every process must call it equally often (it all-reduces)."""
    total, count = features.float().sum(0), torch.tensor(features.shape[0], dtype=torch.float32)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        packed = torch.cat([total.flatten(), count.to(total.device).view(1)])
        dist.all_reduce(packed)
        total, count = packed[:-1].view_as(total), packed[-1]
    return total / count.to(total.device)


class HiddenStateEncoder(nn.Module):
    """Encodes a response by where it moves the base's residual stream: q(z|x,y) from mid-layer hidden states.

    One no-grad pass of the (frozen) base up to layer `encoder_layer` gives the residual stream of prompt + response;
    its mean over the response tokens, centred by a running mean (`feature_mean`, over the batches of all
    processes), goes through a linear head to the posterior's mean and log-variance. Mid-layer states already
    separate what users care about (tone, length, register: what a steering vector reads there), while the first
    blocks that the paper's encoder copies mostly carry token identity. The head starts at zero, so an untrained
    encoder returns N(0, exp(posterior_init_logvar) I); [`CLaPTrainer`] starts it from the principal directions of
    the pool's within-prompt variation.

    A prompt alone gives the features a user's prior reads: the mean state over the prompt, centred and normalised.
    """

    feature_mean_momentum = 0.01

    def __init__(self, config: PrefAlignConfig):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.layer = config.resolved_encoder_layer
        self.to_gaussian = nn.Linear(hidden_size, 2 * config.latent_dim)
        self.register_buffer("feature_mean", torch.zeros(hidden_size))  # (hidden,), responses
        self.register_buffer("prompt_feature_mean", torch.zeros(hidden_size))  # (hidden,), prompts
        self.register_buffer("feature_mean_updates", torch.zeros((), dtype=torch.long))

    def response_features(
        self,
        base_model: PreTrainedModel,
        layout: DecoderLayout,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Mean residual stream at `encoder_layer` over the response tokens (all real tokens without a mask): `(B, H)`."""
        (states,) = read_hidden_states(base_model, layout, [self.layer], input_ids, attention_mask)
        read = attention_mask.bool() if response_mask is None else response_mask.bool() & attention_mask.bool()
        return masked_mean(states, read)

    def forward(self, features: torch.Tensor) -> DiagonalGaussian:
        """q(z | x, y) from `(B, H)` response features; mean and log-variance `(B, Z)` in fp32."""
        features = features.float()
        if self.training and torch.is_grad_enabled():
            self._update_mean(self.feature_mean, features)
        params = self.to_gaussian(features - self.feature_mean)  # (B, 2Z)
        mean, logvar = params.float().chunk(2, dim=-1)
        return DiagonalGaussian(mean, logvar)

    def prompt_features(self, features: torch.Tensor) -> torch.Tensor:
        """What a user's prior reads: `(B, H)` mean prompt states, centred and scaled to unit RMS, fp32."""
        features = features.float()
        if self.training and torch.is_grad_enabled():
            self._update_mean(self.prompt_feature_mean, features)
        return F.layer_norm(features - self.prompt_feature_mean, features.shape[-1:])

    @torch.no_grad()
    def _update_mean(self, buffer: torch.Tensor, features: torch.Tensor) -> None:
        # A cumulative mean over the first 1/momentum batches, an exponential moving average after.
        weight = max(1.0 / float(self.feature_mean_updates + 1), self.feature_mean_momentum)
        buffer.lerp_(batch_mean(features).to(buffer.dtype), weight)
        if buffer is self.feature_mean:
            self.feature_mean_updates += 1


__all__ = ["HiddenStateEncoder", "batch_mean", "masked_mean", "read_hidden_states"]
