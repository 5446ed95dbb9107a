"""The latent adapter p(y|x,z): z becomes a prefix of keys and values in every attention layer of the base LM."""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from .architectures import DecoderLayout
from .configuration_prefalign import PrefAlignConfig


class LatentAdapter(nn.Module):
    """Maps z to `num_prefix_slots` pseudo hidden states per layer, then to keys and values.

    Each layer l has its own affine map z -> P pseudo hidden states; they pass through layer l's own input norm and
    key/value projections (the base's modules, shared, not copied), so the prefix lives in the same space as real
    tokens' keys and values and respects grouped-query attention (`num_key_value_heads`, `head_dim`) by construction.
    Prefix keys carry no rotary/absolute position: they are position-free slots that every token can attend to.

    Parameters: L * P * hidden * (Z + 1), about 2% of SmolLM2-135M at the defaults.
    """

    def __init__(self, config: PrefAlignConfig):
        super().__init__()
        text_config = config.text_config
        self.num_layers = text_config.num_hidden_layers
        self.num_slots = config.num_prefix_slots
        self.hidden_size = text_config.hidden_size
        slots_width = self.num_slots * self.hidden_size
        self.weight = nn.Parameter(torch.empty(self.num_layers, slots_width, config.latent_dim))  # (L, P*hidden, Z)
        self.bias = nn.Parameter(torch.empty(self.num_layers, slots_width))  # (L, P*hidden)
        # Gradient-only shortcut z -> final hidden state (see `skip_gradient`); None unless configured.
        self.skip = nn.Linear(config.latent_dim, self.hidden_size, bias=False) if config.gradient_skip_path else None
        # The Fisher metric of z (latent_metric.py), measured after CLaP; zeros: not measured.
        self.register_buffer("fisher", torch.zeros(config.latent_dim, config.latent_dim))  # (Z, Z)

    @torch.no_grad()
    def init_from_base(self, base_model: PreTrainedModel, token_id: int, relative_scale: float = 0.2) -> None:
        """Start every slot as a copy of one real token at position 0 (an "attention sink", e.g. BOS).

        The bias of layer l becomes the hidden state that enters layer l when the base reads `token_id` alone, so
        with z = 0 the prefix is P copies of that token's keys and values: a prefix the base already knows how to
        ignore. Without this, random slots disturb the frozen base from step 0. The weights are then scaled per layer
        so that z ~ N(0, I) moves each slot by `relative_scale` of that state's norm: hidden states of different
        layers differ in norm by orders of magnitude, and a fixed init scale would leave z without effect (and the
        encoder without gradient) in most layers.
        """
        ids = torch.tensor([[token_id]], device=self.bias.device)
        outputs = base_model(input_ids=ids, output_hidden_states=True, use_cache=False)
        latent_dim = self.weight.shape[-1]
        for layer_idx in range(self.num_layers):
            state = outputs.hidden_states[layer_idx][0, 0].to(self.bias.dtype)  # (hidden,), input of layer l
            self.bias[layer_idx].copy_(state.repeat(self.num_slots))  # (P*hidden,)
            # ||W_slot z|| ~ std * sqrt(hidden * Z) for z ~ N(0, I)
            std = relative_scale * state.norm() / (self.hidden_size * latent_dim) ** 0.5
            self.weight[layer_idx].normal_(0.0, float(std))

    def pseudo_hidden_states(self, latents: torch.Tensor) -> torch.Tensor:
        """`(B, Z)` latents -> `(B, L, P, hidden)` pseudo hidden states."""
        latents = latents.to(self.weight.dtype)
        states = torch.einsum("bz,lsz->bls", latents, self.weight) + self.bias  # (B, L, P*hidden)
        return states.view(latents.shape[0], self.num_layers, self.num_slots, self.hidden_size)

    def forward(
        self, latents: torch.Tensor, base_model: PreTrainedModel, layout: DecoderLayout, cache: DynamicCache
    ) -> DynamicCache:
        """Write the prefix for `latents` `(B, Z)` into the empty `cache` and return it.

        After this call every layer of `cache` holds keys and values of shape `(B, H_kv, P, D)`.
        """
        states = self.pseudo_hidden_states(latents)  # (B, L, P, hidden)
        for layer_idx, layer in enumerate(layout.decoder_layers(base_model)):
            keys, values = layout.project(layer, states[:, layer_idx].to(_module_dtype(layer)))  # 2 x (B, H_kv, P, D)
            cache.update(keys, values, layer_idx)
        return cache

    def skip_gradient(self, latents: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Add `skip(z) - skip(z).detach()` to `(B, T, hidden)` states: zero in value, a direct gradient to z."""
        shortcut = self.skip(latents.to(self.skip.weight.dtype)).unsqueeze(1)  # (B, 1, hidden)
        return hidden_states + (shortcut - shortcut.detach()).to(hidden_states.dtype)


def _module_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


__all__ = ["LatentAdapter"]
