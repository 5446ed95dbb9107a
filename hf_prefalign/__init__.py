"""hf-prefalign: individual preference alignment for Hugging Face causal LMs.

Importing the package registers `PrefAlignConfig` / `PrefAlignForCausalLM` with transformers' `AutoConfig` and
`AutoModelForCausalLM`, so saved backbones load like any HF model, without `trust_remote_code`.
"""

__version__ = "0.1.0.dev0"

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from .configuration_prefalign import PrefAlignConfig  # noqa: E402
from .loading import default_cache_dir, load_base_model, load_default_base  # noqa: E402
from .modeling import (  # noqa: E402
    DiagonalGaussian,
    LatentAdapter,
    LatentEncoder,
    PrefAlignForCausalLM,
    PrefAlignPreTrainedModel,
    load_default_backbone,
)


AutoConfig.register(PrefAlignConfig.model_type, PrefAlignConfig, exist_ok=True)
AutoModelForCausalLM.register(PrefAlignConfig, PrefAlignForCausalLM, exist_ok=True)

__all__ = [
    "DiagonalGaussian",
    "LatentAdapter",
    "LatentEncoder",
    "PrefAlignConfig",
    "PrefAlignForCausalLM",
    "PrefAlignPreTrainedModel",
    "__version__",
    "default_cache_dir",
    "load_base_model",
    "load_default_backbone",
    "load_default_base",
]
