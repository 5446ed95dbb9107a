"""The models of hf-prefalign; one folder per model, as in `transformers.models` (only `prefalign` today)."""

from .prefalign import (
    DECODER_LAYOUTS,
    LATENT_MODULES_PATTERN,
    DecoderLayout,
    DiagonalGaussian,
    LatentAdapter,
    LatentEncoder,
    PrefAlignConfig,
    PrefAlignForCausalLM,
    PrefAlignPreTrainedModel,
    get_decoder_layout,
    load_default_backbone,
)


__all__ = [
    "DECODER_LAYOUTS",
    "LATENT_MODULES_PATTERN",
    "DecoderLayout",
    "DiagonalGaussian",
    "LatentAdapter",
    "LatentEncoder",
    "PrefAlignConfig",
    "PrefAlignForCausalLM",
    "PrefAlignPreTrainedModel",
    "get_decoder_layout",
    "load_default_backbone",
]
