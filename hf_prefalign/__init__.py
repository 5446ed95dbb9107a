"""hf-prefalign: individual preference alignment for Hugging Face causal LMs.

Importing the package registers `PrefAlignConfig` / `PrefAlignForCausalLM` with transformers' `AutoConfig` and
`AutoModelForCausalLM`, so saved backbones load like any HF model, without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .data import (
    DataCollatorForResponseGroups,
    ResponsePoolConfig,
    as_response_pool,
    build_response_pool,
    load_bundled_prompts,
    load_response_pool,
    save_response_pool,
)
from .data.latent_cache import LatentCache
from .distributions import DiagonalGaussian
from .integrations import default_cache_dir, load_base_model, load_default_base
from .models import (
    LATENT_MODULES_PATTERN,
    LatentAdapter,
    LatentEncoder,
    PrefAlignConfig,
    PrefAlignForCausalLM,
    PrefAlignPreTrainedModel,
    load_default_backbone,
)
from .preference import PreferenceBank, PreferenceEmbedding, PreferenceEmbeddingConfig
from .trainer import (
    CLaPConfig,
    CLaPTrainer,
    LatentDPOConfig,
    LatentDPOTrainer,
    MultiUserLatentDPOTrainer,
    StackedPreferenceEmbedding,
    align_users,
    update_user,
)
from .version import __version__


AutoConfig.register(PrefAlignConfig.model_type, PrefAlignConfig, exist_ok=True)
AutoModelForCausalLM.register(PrefAlignConfig, PrefAlignForCausalLM, exist_ok=True)

__all__ = [
    "CLaPConfig",
    "CLaPTrainer",
    "DataCollatorForResponseGroups",
    "DiagonalGaussian",
    "LATENT_MODULES_PATTERN",
    "LatentCache",
    "LatentDPOConfig",
    "LatentDPOTrainer",
    "LatentAdapter",
    "LatentEncoder",
    "MultiUserLatentDPOTrainer",
    "PrefAlignConfig",
    "PrefAlignForCausalLM",
    "PrefAlignPreTrainedModel",
    "PreferenceBank",
    "PreferenceEmbedding",
    "PreferenceEmbeddingConfig",
    "ResponsePoolConfig",
    "StackedPreferenceEmbedding",
    "__version__",
    "align_users",
    "as_response_pool",
    "build_response_pool",
    "default_cache_dir",
    "load_base_model",
    "load_default_backbone",
    "load_bundled_prompts",
    "load_default_base",
    "load_response_pool",
    "save_response_pool",
    "update_user",
]
