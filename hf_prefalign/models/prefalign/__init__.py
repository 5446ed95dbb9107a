"""The PrefAlign model, laid out like a transformers model folder.

The backbone: latent encoder -> latents -> latent adapter -> prefix (or steering directions) in the base LM.
"""

from ...distributions import DiagonalGaussian
from .adapter import LatentAdapter
from .architectures import DECODER_LAYOUTS, DecoderLayout, get_decoder_layout
from .configuration_prefalign import PrefAlignConfig
from .encoder import LatentEncoder
from .modeling_prefalign import (
    LATENT_MODULES_PATTERN,
    PrefAlignForCausalLM,
    PrefAlignPreTrainedModel,
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
