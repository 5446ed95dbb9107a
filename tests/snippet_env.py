"""Tiny stand-ins for the embedded default model, shared by the docs snippet runner and the examples' tests.

`patch_tiny_world(monkeypatch, tmp_path)` makes the public entry points that would load or train the real model
fast, without changing what they return:

- `load_default_base()` returns a tiny random Llama (SmolLM2 is a Llama) and a word-level English tokenizer with a
  chat template. The base is named like the embedded default (`embedded:SmolLM2-135M-Instruct-Q4_1`), so saved
  backbones resolve their base back to it, exactly as with the real model.
- `build_response_pool(...)` samples from at most `MAX_POOL_PROMPTS` prompts, `MAX_POOL_RESPONSES` responses each
  (never fewer than 4, which preference pairs need) and `MAX_POOL_NEW_TOKENS` new tokens.
- Every `CLaPConfig` / `LatentDPOConfig` is built with `max_steps=TRAIN_STEPS`, `report_to="none"`,
  `disable_tqdm=True` and `use_cpu=True` on top of what the caller passed (the other fields are untouched).
- `$HF_PREFALIGN_CACHE` points into the test's tmp folder (the latent cache of Latent DPO is written there).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import VOCAB
from transformers import PreTrainedModel, PreTrainedTokenizerFast

import hf_prefalign
import hf_prefalign.data
import hf_prefalign.data.pools
import hf_prefalign.integrations
import hf_prefalign.integrations.embedded
import hf_prefalign.models.prefalign.modeling_prefalign
import hf_prefalign.trainer.clap_trainer
from hf_prefalign import CLaPConfig, LatentDPOConfig
from hf_prefalign.testing import make_tiny_base, make_word_level_tokenizer
from hf_prefalign.utils.constants import EMBEDDED_DEFAULT_BASE


MAX_POOL_PROMPTS = 4
MAX_POOL_RESPONSES = 4
MAX_POOL_NEW_TOKENS = 6
TRAIN_STEPS = 2

# Special tokens, then English words. Many carry a sentiment (VADER's lexicon), so a random model's responses get
# different `positive` / `negative` rewards and preference pairs can be built from them.
_SPECIALS = ["<pad>", "<bos>", "<eos>", "user", "assistant", "<unk>"]
_WORDS = (
    ". , ? ! the a i you it is was and but so very not this we they my of to in on with for about me tell "
    "describe plan review cheap hotel stayed rainy monday day picnic cats dog food room trip city weather think "
    "what do like "
    "good great happy love lovely wonderful nice fun amazing excellent best beautiful glad enjoy perfect "
    "bad awful terrible sad hate boring worst horrible ugly angry poor nasty disappointing annoying dull"
).split()
ENGLISH_VOCAB = _SPECIALS + _WORDS
assert len(ENGLISH_VOCAB) <= VOCAB and len(set(ENGLISH_VOCAB)) == len(ENGLISH_VOCAB)


def make_english_tokenizer() -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over `ENGLISH_VOCAB` (unknown words -> <unk>), with a chat template."""
    return make_word_level_tokenizer(ENGLISH_VOCAB, lowercase=True, split_punctuation=True, unk_token="<unk>")


def tiny_default_base(
    dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """What the patched `load_default_base()` returns: the same tiny Llama at every call, named like the default."""
    model = make_tiny_base("llama").to(torch.float32 if dtype == "auto" else dtype)  # stand-ins stay fp32
    model.name_or_path = EMBEDDED_DEFAULT_BASE
    model.config._name_or_path = EMBEDDED_DEFAULT_BASE
    tokenizer = make_english_tokenizer()
    tokenizer.name_or_path = EMBEDDED_DEFAULT_BASE
    return model, tokenizer


_real_build_response_pool = hf_prefalign.data.pools.build_response_pool


def small_response_pool(model, tokenizer, prompts, config=None, **overrides):
    """`build_response_pool` on the first `MAX_POOL_PROMPTS` prompts with small `num_responses` / `max_new_tokens`."""
    prompts = prompts[:MAX_POOL_PROMPTS] if isinstance(prompts, list) else prompts.select(range(MAX_POOL_PROMPTS))
    settings = {**(config.__dict__ if config else {}), **overrides}
    settings["num_responses"] = min(settings.get("num_responses", 8), MAX_POOL_RESPONSES)
    settings["max_new_tokens"] = min(settings.get("max_new_tokens", 48), MAX_POOL_NEW_TOKENS)
    return _real_build_response_pool(model, tokenizer, prompts, **settings)


def _short_training(config_class: type, mp: pytest.MonkeyPatch) -> None:
    original = config_class.__post_init__

    def __post_init__(self) -> None:
        self.max_steps = TRAIN_STEPS
        self.report_to = "none"
        self.disable_tqdm = True
        self.use_cpu = True
        original(self)

    mp.setattr(config_class, "__post_init__", __post_init__)


def patch_tiny_world(mp: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Apply every stand-in described in the module docstring (undone with `mp`)."""
    for module in (
        hf_prefalign,
        hf_prefalign.integrations,
        hf_prefalign.integrations.embedded,
        hf_prefalign.models.prefalign.modeling_prefalign,
        hf_prefalign.trainer.clap_trainer,
    ):
        mp.setattr(module, "load_default_base", tiny_default_base)
    for module in (hf_prefalign, hf_prefalign.data, hf_prefalign.data.pools):
        mp.setattr(module, "build_response_pool", small_response_pool)
    _short_training(CLaPConfig, mp)
    _short_training(LatentDPOConfig, mp)
    mp.setenv("HF_PREFALIGN_CACHE", str(tmp_path / "hf_prefalign_cache"))
