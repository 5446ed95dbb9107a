"""Where base models come from: the embedded default (`embedded.py`) and any Hub/local causal LM (`base_models.py`)."""

from .base_models import load_base_model
from .embedded import default_cache_dir, find_default_gguf, load_default_base


__all__ = ["default_cache_dir", "find_default_gguf", "load_base_model", "load_default_base"]
