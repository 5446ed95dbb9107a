"""Where each supported base architecture keeps its decoder layers and attention projections.

The latent adapter turns z into pseudo hidden states, one set per layer, and pushes them through that layer's own
input norm and key/value projections (shared with the base, never copied). This table says where those live for
each `model_type`; adding an architecture means adding one row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel


KVProjection = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _split_heads(states: torch.Tensor, head_dim: int) -> torch.Tensor:
    # (B, P, H*D) -> (B, P, H, D) -> (B, H, P, D)
    batch, slots, _ = states.shape
    return states.view(batch, slots, -1, head_dim).transpose(1, 2)


def _separate_kv_projection(attention: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama-style attention with `k_proj` / `v_proj` (and `k_norm` where the family has one, e.g. Qwen3)."""
    keys = _split_heads(attention.k_proj(hidden), attention.head_dim)  # (B, H_kv, P, D)
    values = _split_heads(attention.v_proj(hidden), attention.head_dim)  # (B, H_kv, P, D)
    k_norm = getattr(attention, "k_norm", None)
    if k_norm is not None:
        keys = k_norm(keys)  # normalises the last dim D, so the head layout does not matter
    return keys, values


def _fused_gpt2_kv_projection(attention: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-2's fused `c_attn` (a Conv1D producing q, k and v side by side)."""
    _, keys, values = attention.c_attn(hidden).split(attention.split_size, dim=2)  # 3 x (B, P, H*D)
    return _split_heads(keys, attention.head_dim), _split_heads(values, attention.head_dim)


@dataclass(frozen=True)
class DecoderLayout:
    """How to reach a base LM's decoder layers and compute K/V for prefix slots.

    Args:
        layers (`str`): dotted path from the `*ForCausalLM` module to its `nn.ModuleList` of decoder layers.
        input_norm (`str`): attribute of a decoder layer holding the norm applied before self-attention.
        attention (`str`): attribute of a decoder layer holding the self-attention module.
        kv_projection (`Callable`): `(attention, hidden (B, P, hidden)) -> (keys, values)`, each `(B, H_kv, P, D)`.
    """

    layers: str
    input_norm: str
    attention: str
    kv_projection: KVProjection

    def decoder_layers(self, model: PreTrainedModel) -> nn.ModuleList:
        module: nn.Module = model
        for name in self.layers.split("."):
            module = getattr(module, name)
        return module

    def project(self, layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `(B, H_kv, P, D)` that `layer` would compute for the hidden states `(B, P, hidden)`."""
        normed = getattr(layer, self.input_norm)(hidden)
        return self.kv_projection(getattr(layer, self.attention), normed)


_LLAMA_LIKE = DecoderLayout("model.layers", "input_layernorm", "self_attn", _separate_kv_projection)

DECODER_LAYOUTS: dict[str, DecoderLayout] = {
    "gpt2": DecoderLayout("transformer.h", "ln_1", "attn", _fused_gpt2_kv_projection),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
}


def get_decoder_layout(model_type: str) -> DecoderLayout:
    """The [`DecoderLayout`] of `model_type`, or a `ValueError` listing the supported ones."""
    try:
        return DECODER_LAYOUTS[model_type]
    except KeyError:
        supported = ", ".join(sorted(DECODER_LAYOUTS))
        raise ValueError(
            f"hf_prefalign does not know where a {model_type!r} model keeps its attention layers. Supported "
            f"model types: {supported}. Add a `DecoderLayout` for it in hf_prefalign/models/prefalign/architectures.py."
        ) from None


__all__ = ["DECODER_LAYOUTS", "DecoderLayout", "get_decoder_layout"]
