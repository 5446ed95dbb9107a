"""The residual latent adapter p(y|x,z): z becomes additive directions in the base's residual stream.

Beside the paper's key/value prefix (`adapter.py`), z can act where a steering vector acts: each steering layer l
adds `W_l z` to the residual stream entering it, at every position. The map has no bias, so z = 0 adds exactly
nothing: the neutral model *is* the base model, and rows without a user cost nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedModel

from .architectures import DecoderLayout
from .configuration_prefalign import PrefAlignConfig


class ResidualLatentAdapter(nn.Module):
    """Maps z `(B, Z)` to one additive direction per steering layer, `(B, S, hidden)`.

    The directions are applied by forward pre-hooks on the base's decoder layers (installed once by
    [`~ResidualLatentAdapter.attach`]) that read the offsets of the *current thread*: several threads can decode
    with different users on one model, and a forward pass outside [`~ResidualLatentAdapter.steer`] is the plain base.

    Parameters: S * hidden * Z (18k for SmolLM2-135M at one layer and Z = 32).
    """

    def __init__(self, config: PrefAlignConfig):
        super().__init__()
        self.layers = list(config.resolved_steering_layers)
        self.hidden_size = config.text_config.hidden_size
        self.weight = nn.Parameter(torch.empty(len(self.layers), self.hidden_size, config.latent_dim))  # (S, H, Z)
        self.skip = None  # the prefix adapter's gradient shortcut has no counterpart here: z already acts directly
        # The Fisher metric of z (latent_metric.py), measured after CLaP; zeros: not measured.
        self.register_buffer("fisher", torch.zeros(config.latent_dim, config.latent_dim))  # (Z, Z)
        self._state = threading.local()

    def offsets(self, latents: torch.Tensor) -> torch.Tensor:
        """`(B, Z)` latents -> `(B, S, hidden)` additive directions (exactly zero for z = 0)."""
        return torch.einsum("bz,shz->bsh", latents.to(self.weight.dtype), self.weight)

    def attach(self, base_model: PreTrainedModel, layout: DecoderLayout) -> list:
        """Install the pre-hooks on the steering layers; returns their handles."""
        decoder_layers = layout.decoder_layers(base_model)
        return [
            decoder_layers[layer].register_forward_pre_hook(self._hook(slot), with_kwargs=True)
            for slot, layer in enumerate(self.layers)
        ]

    def _hook(self, slot: int):
        def add_offset(module: nn.Module, args: tuple, kwargs: dict):
            offsets = getattr(self._state, "offsets", None)
            if offsets is None:
                return None
            delta = offsets[:, slot].unsqueeze(1)  # (B, 1, hidden)
            if args:
                hidden = args[0]
                return (hidden + delta.to(hidden.dtype), *args[1:]), kwargs
            hidden = kwargs["hidden_states"]
            return args, {**kwargs, "hidden_states": hidden + delta.to(hidden.dtype)}

        return add_offset

    @contextmanager
    def steer(self, latents: torch.Tensor | None) -> Iterator[None]:
        """Within the block, this thread's forward passes of the base add `W_l z` at every steering layer.

        `None`, or all-zero latents outside training, installs nothing: the pass is the base's, bit for bit.
        """
        previous = getattr(self._state, "offsets", None)
        if latents is None or (not torch.is_grad_enabled() and not bool(latents.any())):
            self._state.offsets = None
        else:
            self._state.offsets = self.offsets(latents)
        try:
            yield
        finally:
            self._state.offsets = previous

    def __getstate__(self):  # thread-local state is not copyable (deepcopy, pickling by DataParallel)
        state = self.__dict__.copy()
        state["_state"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._state = threading.local()


__all__ = ["ResidualLatentAdapter"]
