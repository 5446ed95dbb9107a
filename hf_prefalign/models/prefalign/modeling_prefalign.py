"""PrefAlignForCausalLM: any Hugging Face causal LM with a latent variable z steering what it writes."""

from __future__ import annotations

import contextlib
import contextvars
import copy
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    GenerationConfig,
    GenerationMixin,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging

from ...distributions import DiagonalGaussian
from ...hub.model_card import backbone_card, write_card
from ...hub.transfer import pull_folder, push_folder
from ...integrations import load_base_model, load_default_base
from ...utils.constants import (
    BASE_MODEL_SUBFOLDER,
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    README_NAME,
    TRAINING_SUMMARY_NAME,
    WEIGHTS_NAME,
)
from ...utils.precision import resolve_dtype
from ...utils.serialization import (
    atomic_directory,
    load_tensors,
    save_tensors_atomic,
    write_json_atomic,
)
from ...version import __version__
from .adapter import LatentAdapter
from .architectures import get_decoder_layout
from .configuration_prefalign import PrefAlignConfig
from .encoder import LatentEncoder
from .hidden_state_encoder import HiddenStateEncoder
from .likelihood import positions_to_score, sequence_log_likelihood
from .steering import ResidualLatentAdapter


if TYPE_CHECKING:
    from ...preference.bank import PreferenceBank
    from ...preference.embedding import PreferenceEmbedding


logger = logging.get_logger(__name__)

# Models inside `disable_latent()` in the current thread / context (by id): a per-thread switch, not a model-wide one.
_LATENT_DISABLED: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "prefalign_latent_disabled", default=frozenset()
)
# What `save_pretrained` writes; anything else in the folder is carried over when it is overwritten.
_BACKBONE_FILES = frozenset(
    {CONFIG_NAME, WEIGHTS_NAME, GENERATION_CONFIG_NAME, README_NAME, TRAINING_SUMMARY_NAME, BASE_MODEL_SUBFOLDER}
)

# Prefixes of the parameters that belong to the latent modules (what a frozen-base backbone saves).
LATENT_MODULES = ("latent_encoder", "latent_adapter")
# Base config fields that must agree between a saved backbone and the base it is loaded onto.
_BASE_IDENTITY_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)
_LATENT_OPTIONS = (
    "latent_dim",
    "encoder_type",
    "encoder_layer",
    "adapter_type",
    "steering_layers",
    "num_prefix_slots",
    "num_encoder_layers",
    "num_encoder_queries",
    "adapter_init_std",
    "posterior_init_logvar",
    "posterior_refinement_steps",
    "posterior_refinement_step_size",
)
# Options of how a trained backbone encodes; `from_pretrained` accepts them as overrides.
_INFERENCE_OPTIONS = ("posterior_refinement_steps", "posterior_refinement_step_size")


def _check_base_matches(expected: Any, found: Any, where: str) -> None:
    """Raise if the base model's architecture differs from the one the backbone was built on."""
    differences = []
    for field in _BASE_IDENTITY_FIELDS:
        a, b = getattr(expected, field, None), getattr(found, field, None)
        if a is not None and b is not None and a != b:
            differences.append(f"{field}: expected {a!r}, found {b!r}")
    if differences:
        raise ValueError(f"The base model {where} does not match the backbone's base: " + "; ".join(differences))


def _peft_adapter_layers(module: nn.Module) -> list[nn.Module]:
    """PEFT's adapter layers (LoRA, ...) injected into `module`.

    Read from `sys.modules`: without `peft` imported no adapter can exist, and importing it here would cost every
    `from_base` and `save_pretrained` a second.
    """
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    if tuners is None:
        return []
    return [layer for layer in module.modules() if isinstance(layer, tuners.BaseTunerLayer)]


# The modules a backbone adds to its base, as a PEFT `exclude_modules` regex: LoRA on the base, never on them.
LATENT_MODULES_PATTERN = r"latent_(encoder|adapter)(\..*)?"
# The latent metric's tensor in the latent state dict (see `PrefAlignForCausalLM.latent_fisher`).
FISHER_KEY = "latent_adapter.fisher"
# Why a base with PEFT adapters injected (but no PeftModel around it to merge them) cannot become a backbone's base.
_PEFT_BASE_MESSAGE = (
    "{found} carries PEFT adapters. A backbone records its base by name (or saves it whole, in transformers' format), "
    "so unmerged adapters would be lost or unloadable: pass the PeftModel itself (`from_base` merges its adapters "
    "into the base, as `merge_and_unload()` does), or merge them yourself and pass the merged model. To put LoRA on a "
    "backbone's base instead, wrap the backbone: "
    "`get_peft_model(backbone, LoraConfig(..., exclude_modules=hf_prefalign.LATENT_MODULES_PATTERN))`."
)


class PrefAlignPreTrainedModel(PreTrainedModel):
    config_class = PrefAlignConfig
    base_model_prefix = "language_model"
    # Checkpointed decoder layers drop the cache (transformers' GradientCheckpointingLayer), and the cache is what
    # carries the latent prefix, so gradient checkpointing would silently train without z.
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["cache"]

    def _init_weights(self, module: nn.Module) -> None:
        # Runs from `post_init`; zero-inits written in `__init__` would be overwritten here otherwise.
        if isinstance(module, LatentEncoder):
            init.normal_(module.queries, mean=0.0, std=self.config.adapter_init_std)
            init.ones_(module.output_norm.weight)
            init.zeros_(module.output_norm.bias)
            # A zero output layer makes an untrained encoder return N(0, exp(posterior_init_logvar) I): N(0, I) at 0.
            init.zeros_(module.to_gaussian.weight)
            bias = torch.zeros_like(module.to_gaussian.bias)  # (2Z,): mean half, log-variance half
            bias[self.config.latent_dim :] = self.config.posterior_init_logvar
            init.copy_(module.to_gaussian.bias, bias)  # (skipped, like every init, for weights loaded from disk)
            init.zeros_(module.feature_mean)
            init.zeros_(module.feature_mean_updates)
        elif isinstance(module, HiddenStateEncoder):
            # Zero weights: an untrained encoder returns N(0, exp(posterior_init_logvar) I) for every response.
            init.zeros_(module.to_gaussian.weight)
            bias = torch.zeros_like(module.to_gaussian.bias)
            bias[self.config.latent_dim :] = self.config.posterior_init_logvar
            init.copy_(module.to_gaussian.bias, bias)
            init.zeros_(module.feature_mean)
            init.zeros_(module.prompt_feature_mean)
            init.zeros_(module.feature_mean_updates)
        elif isinstance(module, ResidualLatentAdapter):
            init.normal_(module.weight, mean=0.0, std=self.config.adapter_init_std)
        elif isinstance(module, LatentAdapter):
            init.normal_(module.weight, mean=0.0, std=self.config.adapter_init_std)
            init.normal_(module.bias, mean=0.0, std=self.config.adapter_init_std)
            if module.skip is not None:
                init.normal_(module.skip.weight, mean=0.0, std=self.config.adapter_init_std)


class PrefAlignForCausalLM(PrefAlignPreTrainedModel, GenerationMixin):
    """A causal LM conditioned on a latent z that steers what it writes.

    Holds three parts: `language_model` (the base `*ForCausalLM`, usually frozen), `latent_encoder` (the posterior
    q(z|x,y)) and `latent_adapter` (how z acts on the base). By default the encoder reads the base's own mid-layer
    residual stream and the adapter adds `W z` there ([`HiddenStateEncoder`], [`ResidualLatentAdapter`]), so z = 0
    is the base model; the paper's token-embedding encoder and key/value prefix are `encoder_type="blocks"`,
    `adapter_type="prefix"` (see [`PrefAlignConfig`]). Build one around a pretrained base with
    [`~PrefAlignForCausalLM.from_base`].

    Positions: real tokens get the positions the base would give them (0, 1, ... after left padding); prefix slots,
    when there are any, are position-free. Training forward passes and `generate` use the same convention.
    """

    def __init__(self, config: PrefAlignConfig, base_model: PreTrainedModel | None = None):
        super().__init__(config)
        if config.text_config is None:
            raise ValueError("PrefAlignConfig.text_config is None: the backbone needs its base model's config.")
        self.layout = get_decoder_layout(config.text_config.model_type)
        if base_model is None:
            base_model = AutoModelForCausalLM.from_config(config.text_config)
        else:
            _check_base_matches(config.text_config, base_model.config, where="passed to PrefAlignForCausalLM")
            # The base is already initialised (pretrained): keep `post_init` from re-initialising it.
            for module in base_model.modules():
                module._is_hf_initialized = True
        self.language_model = base_model
        # What training made this backbone (set by `CLaPTrainer`, saved as `training_summary.json`); cards read it.
        self.training_summary: dict[str, Any] | None = None
        self._check_cache_layers()
        self.latent_encoder = (
            HiddenStateEncoder(config) if config.encoder_type == "hidden_states" else LatentEncoder(config)
        )
        if config.adapter_type == "residual":
            self.latent_adapter = ResidualLatentAdapter(config)
            self.latent_adapter.attach(self.language_model, self.layout)
        else:
            self.latent_adapter = LatentAdapter(config)
        self.post_init()
        if base_model.generation_config is not None:
            self.generation_config = copy.deepcopy(base_model.generation_config)

    def enable_gradient_skip_path(self) -> None:
        """Add the gradient-only shortcut z -> final hidden state (see [`PrefAlignConfig.gradient_skip_path`])."""
        if self.config.adapter_type != "prefix":
            raise ValueError(
                "The gradient skip path helps a key/value prefix learn; the residual adapter already acts on the "
                "residual stream directly. Use it with `adapter_type='prefix'`."
            )
        if self.latent_adapter.skip is not None:
            return
        self.config.gradient_skip_path = True
        adapter = self.latent_adapter
        skip = nn.Linear(self.config.latent_dim, adapter.hidden_size, bias=False)
        nn.init.normal_(skip.weight, std=self.config.adapter_init_std)
        adapter.skip = skip.to(device=adapter.weight.device, dtype=adapter.weight.dtype)

    def _check_cache_layers(self) -> None:
        if self.config.adapter_type != "prefix":
            return
        cache = DynamicCache(config=self.config.text_config)
        if any(cache.is_sliding):
            raise ValueError(
                f"The base model ({self.config.text_config.model_type}) uses sliding-window attention layers, which "
                "would evict the latent prefix from the cache. Disable the sliding window in its config "
                "(e.g. `sliding_window=None`) or use a full-attention base."
            )

    # ------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------
    @classmethod
    def from_base(
        cls,
        base_model_or_path: PreTrainedModel | str,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        freeze_base: bool = True,
        revision: str | None = None,
        dtype: torch.dtype | str | None = None,
        **latent_options: Any,
    ) -> PrefAlignForCausalLM:
        """Wrap a pretrained causal LM into a fresh (untrained) backbone.

        Args:
            base_model_or_path (`PreTrainedModel` or `str`):
                A loaded `*ForCausalLM`, a Hub id, a local path, or `"embedded:SmolLM2-135M-Instruct-Q4_1"`. A PEFT
                `PeftModel` (e.g. a LoRA-fine-tuned base) has its adapters merged into its base, in place, as
                `merge_and_unload()` does; the merged weights are no longer the named base's, so the backbone then
                saves its base whole (`base_model/`). A model with adapters injected but no `PeftModel` around it
                (a `PeftModel`'s `get_base_model()`) is refused: its adapters cannot be merged from there.
            tokenizer (`PreTrainedTokenizerBase`, *optional*):
                If given, checked against the base's vocabulary (see [`~PrefAlignForCausalLM.check_tokenizer`]).
            freeze_base (`bool`, *optional*, defaults to `True`):
                Freeze the base LM (the default CLaP recipe trains only the latent modules).
            revision (`str`, *optional*): Hub revision when loading by name.
            dtype (`torch.dtype` or `str`, *optional*): dtype when loading by name.
            **latent_options: `latent_dim`, `encoder_type`, `encoder_layer`, `adapter_type`, `steering_layers`,
                `num_prefix_slots`, `num_encoder_layers`, `num_encoder_queries`, `adapter_init_std`,
                `posterior_init_logvar` (see [`PrefAlignConfig`]).

        Example:

        ```python
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from hf_prefalign import PrefAlignForCausalLM
        >>> base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64))
        >>> model = PrefAlignForCausalLM.from_base(base, latent_dim=8)
        >>> model.posterior(torch.tensor([[1, 2, 3]])).mean.shape
        torch.Size([1, 8])
        ```
        """
        unknown = sorted(set(latent_options) - set(_LATENT_OPTIONS))
        if unknown:
            raise TypeError(f"Unknown latent option(s) {unknown}; expected some of {list(_LATENT_OPTIONS)}.")
        merged_adapters = False
        if isinstance(base_model_or_path, (str, os.PathLike)):
            base = load_base_model(str(base_model_or_path), revision=revision, dtype=dtype)
        elif isinstance(base_model_or_path, PrefAlignForCausalLM):
            raise TypeError("The base model is already a PrefAlignForCausalLM; pass its `get_base_model()` instead.")
        elif isinstance(base_model_or_path, PreTrainedModel):
            base = base_model_or_path
            if _peft_adapter_layers(base):  # e.g. the `get_base_model()` of a PeftModel
                raise ValueError(_PEFT_BASE_MESSAGE.format(found=f"The base model ({type(base).__name__})"))
        elif isinstance(getattr(base_model_or_path, "get_base_model", lambda: None)(), PrefAlignForCausalLM):
            raise TypeError(
                f"`from_base` got a {type(base_model_or_path).__name__} around a PrefAlignForCausalLM, which is a "
                "backbone already (with PEFT adapters on its base) and cannot be the base of another."
            )
        elif isinstance(getattr(base_model_or_path, "get_base_model", lambda: None)(), PreTrainedModel) and hasattr(
            base_model_or_path, "merge_and_unload"
        ):  # a PeftModel around a transformers LM
            logger.info(
                f"from_base: merging the PEFT adapters of the {type(base_model_or_path).__name__} into its base (in "
                "place, as `merge_and_unload()` does); the backbone saves the merged base whole."
            )
            base = base_model_or_path.merge_and_unload()
            merged_adapters = True
        elif isinstance(base_model_or_path, nn.Module) and _peft_adapter_layers(base_model_or_path):
            raise TypeError(
                _PEFT_BASE_MESSAGE.format(found=f"`from_base` got a {type(base_model_or_path).__name__}, which")
            )
        else:
            raise TypeError(
                f"`base_model_or_path` must be a PreTrainedModel or a name/path, got {type(base_model_or_path).__name__}."
            )
        if not isinstance(base, GenerationMixin) or base.get_output_embeddings() is None:
            raise ValueError(
                f"The base model ({type(base).__name__}) has no causal-LM head. Load it with "
                "`AutoModelForCausalLM.from_pretrained(...)` rather than `AutoModel`."
            )
        config = PrefAlignConfig(
            text_config=base.config,
            base_model_name_or_path=base.name_or_path or None,
            base_model_revision=revision,
            # Without this, building the config would reset the (shared) base config's attention implementation.
            attn_implementation=base.config._attn_implementation,
            base_included=merged_adapters,  # the named base's weights are not these: save them with the backbone
            **latent_options,
        )
        model = cls(config, base_model=base)
        if isinstance(model.latent_encoder, LatentEncoder):
            model.latent_encoder.init_from_base(base)
        if isinstance(model.latent_adapter, LatentAdapter):
            model.latent_adapter.init_from_base(base, token_id=_sink_token_id(base.config))
        if freeze_base:
            model.freeze_base()
        if tokenizer is not None:
            model.check_tokenizer(tokenizer)
        return model

    # ------------------------------------------------------------------
    # Wrapper ergonomics (PEFT-style)
    # ------------------------------------------------------------------
    def get_base_model(self) -> PreTrainedModel:
        """The wrapped base `*ForCausalLM`."""
        return self.language_model

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def freeze_base(self) -> None:
        """Stop gradients to the base LM (its token embeddings, shared with the encoder, included)."""
        self.language_model.requires_grad_(False)

    def unfreeze_base(self) -> None:
        self.language_model.requires_grad_(True)

    @property
    def is_base_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.language_model.parameters())

    def latent_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the latent encoder and adapter (never the shared token embeddings)."""
        for name in LATENT_MODULES:
            yield from getattr(self, name).parameters()

    def num_latent_parameters(self) -> int:
        return sum(p.numel() for p in self.latent_parameters())

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """`(trainable, all)` parameter counts, like PEFT's method of the same name (shared tensors count once).

        Example:

        ```python
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from hf_prefalign import PrefAlignForCausalLM
        >>> base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64))
        >>> model = PrefAlignForCausalLM.from_base(base, latent_dim=8)  # frozen base
        >>> model.get_nb_trainable_parameters()[0] == model.num_latent_parameters()
        True
        ```
        """
        trainable = total = 0
        for parameter in self.parameters():
            total += parameter.numel()
            if parameter.requires_grad:
                trainable += parameter.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print trainable / total parameter counts, in PEFT's format."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    @property
    def _latent_enabled(self) -> bool:
        return id(self) not in _LATENT_DISABLED.get()

    @contextlib.contextmanager
    def disable_latent(self) -> Iterator[None]:
        """Context manager in which the model runs as its plain base LM (no prefix at all).

        It holds for the calling thread (and asyncio task) only: a thread sampling a pool inside it never strips the
        user prefix from the generations of other threads sharing the model.
        """
        token = _LATENT_DISABLED.set(_LATENT_DISABLED.get() | {id(self)})
        try:
            yield
        finally:
            _LATENT_DISABLED.reset(token)

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Raise a `ValueError` if `tokenizer` cannot belong to the base model."""
        rows = self.get_input_embeddings().num_embeddings
        if len(tokenizer) > rows:
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} tokens but the base model's embedding table has {rows} rows: "
                f"this tokenizer ({tokenizer.name_or_path!r}) does not belong to the base model "
                f"({self.config.base_model_name_or_path!r}). Load the base model's own tokenizer."
            )
        for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
            token_id = getattr(tokenizer, attr, None)
            if token_id is not None and token_id >= rows:
                raise ValueError(f"tokenizer.{attr}={token_id} is outside the base model's vocabulary (size {rows}).")
        base_eos = self.generation_config.eos_token_id if self.generation_config is not None else None
        base_eos = {base_eos} if isinstance(base_eos, int) else set(base_eos or [])
        if base_eos and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in base_eos:
            raise ValueError(
                f"tokenizer.eos_token_id={tokenizer.eos_token_id} is not the base model's end-of-sequence token "
                f"({sorted(base_eos)}): the tokenizer and the base model do not match."
            )

    # ------------------------------------------------------------------
    # Latent side
    # ------------------------------------------------------------------
    def posterior(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        response_mask: torch.Tensor | None = None,
        refinement_steps: int | None = None,
    ) -> DiagonalGaussian:
        """q(z | x, y) for token sequences (prompt + response, or a prompt alone).

        Args:
            input_ids (`torch.LongTensor` of shape `(B, T)`): token ids, padded on either side.
            attention_mask (`torch.Tensor` of shape `(B, T)`, *optional*): 1 for real tokens.
            response_mask (`torch.Tensor` of shape `(B, T)`, *optional*): 1 for the response's tokens (EOS included),
                which the encoder's queries read (CLaP trains them so, and [`LatentCache`] encodes so). `None`: the
                queries read every token.
            refinement_steps (`int`, *optional*): gradient steps on the posterior mean (defaults to
                `config.posterior_refinement_steps`; see [`PrefAlignConfig`]). They need `response_mask`.

        Returns:
            [`DiagonalGaussian`] with `mean` and `logvar` of shape `(B, Z)`, in fp32.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if isinstance(self.latent_encoder, HiddenStateEncoder):
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.is_base_frozen):
                features = self.latent_encoder.response_features(
                    self.language_model, self.layout, input_ids, attention_mask, response_mask
                )
            posterior = self.latent_encoder(features)
        else:
            posterior = self.latent_encoder(self.get_input_embeddings()(input_ids), attention_mask, response_mask)
        steps = self.config.posterior_refinement_steps if refinement_steps is None else refinement_steps
        if steps > 0:
            if response_mask is None:
                raise ValueError("Posterior refinement scores the response: pass `response_mask`.")
            posterior = self._refine_posterior(posterior, input_ids, attention_mask, response_mask, steps)
        return posterior

    def _refine_posterior(
        self,
        posterior: DiagonalGaussian,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor,
        steps: int,
    ) -> DiagonalGaussian:
        """Move the posterior mean by fixed-length steps along grad_z log p(y | x, z) (semi-amortised inference).

        The step direction is a constant for autograd: gradients of a loss on the refined mean reach the encoder
        through the amortised mean (identity Jacobian) and never differentiate through the LM twice. Only the
        gradient with respect to z is computed, so no parameter's `.grad` changes. The log-variance is the encoder's.
        """
        labels = input_ids.masked_fill(~(response_mask.bool() & attention_mask.bool()), -100)  # (B, T)
        keep = positions_to_score(labels)
        labels = labels[:, -keep:]
        step_size = self.config.posterior_refinement_step_size
        mean = posterior.mean  # (B, Z)
        for _ in range(steps):
            with torch.enable_grad():
                latents = mean.detach().requires_grad_(True)
                logits = self(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    latents=latents,
                    use_cache=False,
                    logits_to_keep=keep,
                ).logits  # (B, keep, V)
                log_likelihood, _ = sequence_log_likelihood(logits, labels)  # (B,)
                (gradient,) = torch.autograd.grad(log_likelihood.sum(), latents)  # rows are independent
            direction = gradient / gradient.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # (B, Z)
            mean = mean + step_size * direction
        return DiagonalGaussian(mean, posterior.logvar)

    def encode_features(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's raw features for `(B, T)` tokens: query outputs `(B, Q, hidden)` of the `"blocks"` encoder,
        the mean residual stream at `encoder_layer` `(B, 1, hidden)` of the `"hidden_states"` one."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if isinstance(self.latent_encoder, HiddenStateEncoder):
            with torch.no_grad():
                features = self.latent_encoder.response_features(
                    self.language_model, self.layout, input_ids, attention_mask, None
                )
            return features.unsqueeze(1)
        return self.latent_encoder.features(self.get_input_embeddings()(input_ids), attention_mask)

    def prompt_features(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """What a user's prior reads: the encoder's normalised query outputs for a prompt, averaged, `(B, hidden)`.

        The prompt is tokenized exactly as for generation (chat template with the generation prompt).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if isinstance(self.latent_encoder, HiddenStateEncoder):
            with torch.no_grad():
                features = self.latent_encoder.response_features(
                    self.language_model, self.layout, input_ids, attention_mask, None
                )
            return self.latent_encoder.prompt_features(features)
        embeds = self.get_input_embeddings()(input_ids)
        features = self.latent_encoder.normalized_features(embeds, attention_mask)  # (B, Q, hidden)
        return features.mean(dim=1).float()

    def fingerprint(self) -> str:
        """A hash of the latent modules' weights and the base model's identity.

        Preference embeddings record it; loading one onto a backbone with another fingerprint fails.
        """
        digest = hashlib.sha256()
        identity = {field: getattr(self.config.text_config, field, None) for field in _BASE_IDENTITY_FIELDS}
        identity["base_model_name_or_path"] = self.config.base_model_name_or_path
        if self.config.posterior_refinement_steps > 0:  # another posterior, another latent space for users
            identity["posterior_refinement"] = [
                self.config.posterior_refinement_steps,
                self.config.posterior_refinement_step_size,
            ]
        digest.update(json.dumps(identity, sort_keys=True).encode())
        for name, tensor in sorted(self.latent_state_dict().items()):
            if name.startswith("latent_adapter.skip") or name == FISHER_KEY:
                continue  # a training-only shortcut (zero in every pass), and a measurement of z, not what z does
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()

    @property
    def latent_fisher(self) -> torch.Tensor | None:
        """The Fisher metric of z `(Z, Z)`: 1/2 z^T F z is the per-token KL of z from the base (see
        `models/prefalign/latent_metric.py`). `None` until measured (`CLaPTrainer` measures it after training;
        `hf_prefalign.trainer.estimate_latent_metric` adds it to an older backbone)."""
        fisher = self.latent_adapter.fisher
        return fisher if bool(fisher.any()) else None

    @property
    def preferences(self) -> PreferenceBank:
        """The bank of users' preference embeddings that `generate(preference_id=...)` reads from."""
        from ...preference.bank import PreferenceBank  # lazy: loading the model does not load the preference side

        bank = self.__dict__.get("_preference_bank")
        if bank is None:
            bank = PreferenceBank(self.fingerprint, self.config.latent_dim, self.config.text_config.hidden_size)
            self.__dict__["_preference_bank"] = bank
        return bank

    def load_preference(
        self,
        path: str | os.PathLike | PreferenceEmbedding,
        preference_id: str,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        overwrite: bool = False,
    ) -> None:
        """Register a user's preference embedding in [`preferences`] under `preference_id`.

        `path` is an instance, a local directory, or a Hub repo (`subfolder` picks one user of a bank repo and only
        its files are downloaded). It is read and checked against this backbone before it is registered, so a corrupt
        file, an interrupted download or a foreign embedding never leaves a half-registered user.
        """
        from ...preference.embedding import PreferenceEmbedding

        if isinstance(path, PreferenceEmbedding):
            embedding = path
        else:
            embedding = PreferenceEmbedding.from_pretrained(
                path, subfolder=subfolder, revision=revision, token=token, cache_dir=cache_dir
            )
        self.preferences.add(preference_id, embedding, overwrite=overwrite)

    @torch.no_grad()
    def preference_latents(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        preference_id: str | Mapping[str, float] | Sequence[str | Mapping[str, float] | None] | None,
        sample: bool = False,
        temperature: float = 1.0,
        strength: float = 1.0,
    ) -> torch.Tensor:
        """z per row for `preference_id` (one id for the batch or one per row; `None` is the neutral z = 0).

        An id may be a mix of users, `{"alice": 0.7, "bob": 0.3}`: the convex combination of their z (weights
        normalised to sum to 1). `strength` scales each row's departure from the neutral prior mean z = 0: 0 is
        neutral, 1 as trained.
        """
        strength = _check_strength(strength)
        batch = input_ids.shape[0]
        one = preference_id is None or isinstance(preference_id, (str, Mapping))
        ids = [preference_id] * batch if one else list(preference_id)
        if len(ids) != batch:
            raise ValueError(
                f"Got {len(ids)} preference ids for a batch of {batch} prompts. Give one id per prompt (a "
                "`pipeline` hands the same list to every batch: use `batch_size` = the number of prompts, or one "
                "call per user)."
            )
        for pid in ids:
            self.preferences.mixture_weights(pid)  # unknown users, bad weights: fail before the LM runs
        if all(pid is None for pid in ids):
            return torch.zeros(batch, self.config.latent_dim, device=input_ids.device)
        features = self.prompt_features(input_ids, attention_mask)  # (B, hidden)
        return strength * self.preferences.latents(ids, features, sample=sample, temperature=temperature)

    def build_prefix_cache(self, latents: torch.Tensor) -> DynamicCache:
        """A fresh cache whose every layer holds the `(B, H_kv, P, D)` prefix for `latents` `(B, Z)`."""
        if self.config.adapter_type != "prefix":
            raise ValueError("`build_prefix_cache` needs `adapter_type='prefix'`; the residual adapter has no prefix.")
        cache = DynamicCache(config=self.config.text_config)
        return self.latent_adapter(latents, self.language_model, self.layout, cache)

    def _resolve_latents(self, latents: torch.Tensor | None, batch_size: int, device: torch.device) -> torch.Tensor:
        """Check `latents` and return them as `(B, Z)`; `None` means z = 0, the mean of the N(0, I) prior."""
        latent_dim = self.config.latent_dim
        if latents is None:
            return torch.zeros(batch_size, latent_dim, device=device)
        if not isinstance(latents, torch.Tensor):
            raise TypeError(
                f"`latents` must be a torch.Tensor of shape (batch, {latent_dim}), got {type(latents).__name__}."
            )
        if latents.dim() == 1 and latents.shape[0] == latent_dim:
            return latents.to(device).unsqueeze(0).expand(batch_size, -1)  # one z for every row
        if latents.dim() != 2 or latents.shape[1] != latent_dim:
            raise ValueError(
                f"`latents` must have shape (batch, {latent_dim}) or ({latent_dim},), got {tuple(latents.shape)}."
            )
        if latents.shape[0] != batch_size:
            raise ValueError(
                f"`latents` has batch size {latents.shape[0]} but the inputs have batch size {batch_size}."
            )
        return latents.to(device)

    # ------------------------------------------------------------------
    # Forward and generation
    # ------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: DynamicCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        latents: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        r"""Run the base LM under the prefix of `latents`.

        Args:
            input_ids (`torch.LongTensor` of shape `(B, T)`): tokens not yet in `cache`.
            attention_mask (`torch.Tensor` of shape `(B, T_past + T)`, *optional*):
                Mask over real tokens only (past and current); the prefix slots are added internally.
            position_ids (`torch.LongTensor` of shape `(B, T)`, *optional*):
                Positions of the real tokens; by default counted from the first unpadded token.
            cache (`DynamicCache`, *optional*):
                A cache returned by an earlier call (it already holds the prefix). When empty or `None`, the
                prefix for `latents` is written into a new one.
            labels (`torch.LongTensor` of shape `(B, T)`, *optional*): targets, `-100` where ignored.
            latents (`torch.Tensor` of shape `(B, Z)` or `(Z,)`, *optional*):
                The latent z per row; `None` means z = 0 (the prior's mean). Ignored when `cache` already holds a prefix.
            use_cache (`bool`, *optional*): return the cache (defaults to `True` in eval mode, `False` in training).
            logits_to_keep (`int` or `torch.Tensor`, *optional*): as in transformers' causal LMs.

        Returns:
            `CausalLMOutputWithPast`, with the loss averaged over labelled tokens when `labels` is given.
        """

        def run_base(position_ids: torch.LongTensor | None) -> CausalLMOutputWithPast:
            return self.language_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )

        if not self._latent_enabled:
            return run_base(position_ids)
        tokens = input_ids if input_ids is not None else inputs_embeds
        if tokens is None:
            raise ValueError("Pass either `input_ids` or `inputs_embeds`.")
        batch_size, length = tokens.shape[:2]
        device = tokens.device
        if use_cache is None:
            use_cache = not self.training and getattr(self.config.text_config, "use_cache", True)
        if self.config.adapter_type == "residual":
            # z acts at every position of every pass (prompt, then each decoding step), so it is passed each time.
            z = self._resolve_latents(latents, batch_size, device)
            past = cache.get_seq_length() if cache is not None else 0
            if attention_mask is not None and attention_mask.shape != (batch_size, past + length):
                raise ValueError(
                    f"`attention_mask` must cover the {past} cached and {length} new tokens "
                    f"(shape ({batch_size}, {past + length})), got {tuple(attention_mask.shape)}."
                )
            if position_ids is None and attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]  # (B, T)
            with self.latent_adapter.steer(z):
                outputs = run_base(position_ids)
            return CausalLMOutputWithPast(
                loss=outputs.loss,
                logits=outputs.logits,
                cache=outputs.cache if use_cache else None,
                hidden_states=outputs.hidden_states,
                attentions=outputs.attentions,
            )

        num_prefix = self.config.num_prefix_slots
        if cache is None:
            cache = DynamicCache(config=self.config.text_config)
        z = None
        if cache.get_seq_length() == 0:
            z = self._resolve_latents(latents, batch_size, device)
            self.latent_adapter(z, self.language_model, self.layout, cache)
        num_past_tokens = cache.get_seq_length() - num_prefix  # real tokens already cached

        if attention_mask is None:
            attention_mask = torch.ones(batch_size, num_past_tokens + length, dtype=torch.long, device=device)
        elif attention_mask.shape != (batch_size, num_past_tokens + length):
            raise ValueError(
                f"`attention_mask` must cover the {num_past_tokens} cached and {length} new tokens "
                f"(shape ({batch_size}, {num_past_tokens + length})), got {tuple(attention_mask.shape)}."
            )
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]  # (B, T)
        # The base sees the prefix as P always-visible cache entries in front of the real tokens.
        full_mask = torch.cat(
            [attention_mask.new_ones(batch_size, num_prefix), attention_mask], dim=-1
        )  # (B, P+T_past+T)

        base_inputs = {
            "input_ids": input_ids,
            "inputs_embeds": inputs_embeds,
            "attention_mask": full_mask,
            "position_ids": position_ids,
            "cache": cache,
            "use_cache": use_cache,
        }
        if self.latent_adapter.skip is not None and self.training and z is not None and torch.is_grad_enabled():
            outputs = self._forward_with_skip_gradient(z, base_inputs, labels, logits_to_keep, **kwargs)
        else:
            outputs = self.language_model(**base_inputs, labels=labels, logits_to_keep=logits_to_keep, **kwargs)
        return CausalLMOutputWithPast(
            loss=outputs.loss,
            logits=outputs.logits,
            cache=cache if use_cache else None,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def _forward_with_skip_gradient(
        self,
        latents: torch.Tensor,
        base_inputs: dict[str, Any],
        labels: torch.Tensor | None,
        logits_to_keep: int | torch.Tensor,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """The base's forward, split at the final hidden state to add the gradient-only shortcut from z."""
        outputs = self.language_model.base_model(**base_inputs, **kwargs)
        hidden = self.latent_adapter.skip_gradient(latents, outputs.last_hidden_state)  # (B, T, hidden)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.language_model.get_output_embeddings()(hidden)
        loss = None
        if labels is not None:
            loss = self.language_model.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        preference_id: str | Mapping[str, float] | Sequence[str | Mapping[str, float] | None] | None = None,
        preference_sampling: str = "mean",
        preference_temperature: float = 1.0,
        preference_strength: float = 1.0,
        **kwargs: Any,
    ):
        """`GenerationMixin.generate`, decoding row i under its own latent z.

        Args:
            latents (`torch.Tensor` of shape `(B, Z)` or `(Z,)`, *optional*): z per row.
            preference_id (`str`, `dict[str, float]` or `list`, *optional*):
                A user of [`preferences`] for the whole batch, or one id per row (`None` rows are neutral); z is the
                mean of each user's prior p_user(z|x) for the row's prompt. A mapping `{"alice": 0.7, "bob": 0.3}`
                mixes users (the convex combination of their z). Exclusive with `latents`.
            preference_sampling (`str`, *optional*, defaults to `"mean"`): `"mean"` or `"sample"` from the prior;
                with `"sample"`, each of `num_return_sequences` sequences gets its own z (without beam search).
            preference_temperature (`float`, *optional*, defaults to 1.0): scales the prior's std when sampling.
            preference_strength (`float`, *optional*, defaults to 1.0): scales each user's z, its departure from the
                neutral z = 0: 0 is the neutral (base) model, 1 the user as trained, above 1 stronger.
            **kwargs: everything `transformers`' `generate` accepts.

        With neither `latents` nor `preference_id`, z = 0: the neutral model (the N(0, I) prior's mean).
        """
        if preference_sampling not in ("mean", "sample"):
            raise ValueError(f"`preference_sampling` must be 'mean' or 'sample', got {preference_sampling!r}.")
        if not self._latent_enabled:
            if latents is not None or preference_id is not None:
                raise ValueError("`latents` / `preference_id` were given inside `disable_latent()`.")
            return super().generate(inputs, **kwargs)
        tokens = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if preference_id is not None:
            if latents is not None:
                raise ValueError("Pass either `latents` or `preference_id`, not both.")
            if tokens is None or tokens.dtype not in (torch.long, torch.int):
                raise ValueError("`preference_id` needs the prompt as token ids (`input_ids`).")
            copies = self._sampled_copies(preference_sampling, kwargs)
            if copies > 1:
                # One z drawn per returned sequence: each prompt is repeated here (in the order generate's own
                # expansion uses, row-major) so that each copy samples its own z, and generate expands nothing.
                batch = tokens.shape[0]
                if isinstance(preference_id, (list, tuple)):
                    preference_id = [pid for pid in preference_id for _ in range(copies)]
                if inputs is not None:
                    inputs = inputs.repeat_interleave(copies, dim=0)
                for key, value in list(kwargs.items()):
                    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
                        kwargs[key] = value.repeat_interleave(copies, dim=0)  # (B * n, ...)
                kwargs["num_return_sequences"] = 1
                tokens = inputs if inputs is not None else kwargs.get("input_ids")
            latents = self.preference_latents(
                tokens,
                kwargs.get("attention_mask"),
                preference_id,
                sample=preference_sampling == "sample",
                temperature=preference_temperature,
                strength=preference_strength,
            )
        if tokens is not None:
            # Normalise to (B, Z) here: generate's own expansion for num_return_sequences / beams assumes it.
            kwargs["latents"] = self._resolve_latents(latents, tokens.shape[0], tokens.device)
        return super().generate(inputs, **kwargs)

    def _sampled_copies(self, preference_sampling: str, kwargs: dict[str, Any]) -> int:
        """How many sequences per prompt need their own sampled z: `num_return_sequences` when sampling z and not
        searching beams (the sequences of one beam search share its z), else 1."""
        if preference_sampling != "sample":
            return 1
        config = kwargs.get("generation_config") or self.generation_config or GenerationConfig()
        copies = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", None)) or 1
        beams = kwargs.get("num_beams", getattr(config, "num_beams", None)) or 1
        return int(copies) if beams == 1 else 1

    # ------------------------------------------------------------------
    # Saving and loading
    # ------------------------------------------------------------------
    def latent_state_dict(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The latent modules' tensors, named as in this model's `state_dict()`."""
        state_dict = self.state_dict() if state_dict is None else state_dict
        return {name: tensor for name, tensor in state_dict.items() if name.split(".", 1)[0] in LATENT_MODULES}

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        state_dict: dict[str, torch.Tensor] | None = None,
        save_base: bool | None = None,
        is_main_process: bool = True,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        with_tokenizer: bool = False,
        **kwargs: Any,
    ) -> None:
        """Save the backbone into a staging folder that replaces `save_directory` whole, once complete.

        A backbone whose base is frozen saves only the latent modules plus a reference to the base (its name or path,
        revision and config), like a PEFT adapter. A backbone whose base has trainable parameters also saves the base,
        whole, in the `base_model/` sub-folder.

        Args:
            save_directory (`str` or `os.PathLike`): target directory (created if needed).
            state_dict (`dict`, *optional*): tensors to save instead of `self.state_dict()` (latent entries only are used).
            save_base (`bool`, *optional*): force saving (or not) the full base; by default, saved iff some of its
                parameters are trainable (PEFT adapters aside: a base carrying them is never saved whole) or the
                backbone holds a base of its own (`config.base_included`: loaded from a folder that included it, or
                merged from a `PeftModel`), whose weights the named base does not have.
            is_main_process (`bool`, *optional*, defaults to `True`): only the main process writes.
            repo_id (`str`, *optional*): the Hub repo the save is meant for (used in the model card's usage snippet).
            with_tokenizer (`bool`, *optional*): the tokenizer is saved beside it (the card's snippet loads it there).
        """
        if push_to_hub:
            raise ValueError(
                "`save_pretrained(push_to_hub=True)` is not supported; call `model.push_to_hub(repo_id)`."
            )
        ignored = sorted(set(kwargs) - {"safe_serialization", "max_shard_size", "variant", "token"})
        if ignored:
            logger.warning(f"PrefAlignForCausalLM.save_pretrained ignores {ignored}.")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory ({save_directory}) must be a directory, not a file.")
        if not is_main_process:
            return
        adapters = _peft_adapter_layers(self.language_model)
        if save_base is None:
            # Adapter weights are the PeftModel's to save (its `save_pretrained`): they do not make the base "trained".
            adapter_ids = {id(p) for layer in adapters for p in layer.parameters()} - {
                id(p) for layer in adapters for p in layer.get_base_layer().parameters()
            }
            save_base = self.config.base_included or any(
                p.requires_grad and id(p) not in adapter_ids for p in self.language_model.parameters()
            )
        if save_base and adapters:
            raise ValueError(
                "The base carries PEFT adapters, so it cannot be saved whole in transformers' format. Save the adapters "
                "with the PeftModel's `save_pretrained` and the backbone with `save_base=False`, or merge them first "
                "(`merge_and_unload()`)."
            )
        latent_tensors = self.latent_state_dict(state_dict)
        metadata = {"format": "pt", "hf_prefalign_version": __version__}
        config = copy.deepcopy(self.config)
        config.base_included = save_base
        config.architectures = [type(self).__name__]
        # The folder is replaced whole (`atomic_directory`): a reader, even after a kill -9, sees the old backbone or
        # the new one, never new weights under an old config, nor a stale `base_model/`. Files the backbone does not
        # own (a tokenizer saved beside it, checkpoints of a Trainer's output_dir) are carried over.
        with atomic_directory(save_directory, carry=lambda name: name not in _BACKBONE_FILES) as tmp:
            save_tensors_atomic(latent_tensors, tmp / WEIGHTS_NAME, metadata=metadata)
            if save_base:
                self.language_model.save_pretrained(tmp / BASE_MODEL_SUBFOLDER)
            if self.generation_config is not None:
                write_json_atomic(self.generation_config.to_dict(), tmp / GENERATION_CONFIG_NAME)
            if self.training_summary is not None:
                write_json_atomic(self.training_summary, tmp / TRAINING_SUMMARY_NAME)
            write_card(
                backbone_card,
                tmp / README_NAME,
                self,
                existing=Path(save_directory) / README_NAME,
                repo_id=repo_id,
                with_tokenizer=with_tokenizer,
            )
            write_json_atomic(json.loads(config.to_json_string(use_diff=False)), tmp / CONFIG_NAME)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str = "Upload PrefAlign backbone",
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        save_base: bool | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **kwargs: Any,
    ) -> str:
        """Upload the backbone (as `save_pretrained` writes it, model card included) to a Hub repo; returns the commit URL.

        A frozen-base backbone's repo holds only the latent modules and the base reference, and its card declares
        `base_model`. Tokens, private repos and revisions are handled by `huggingface_hub`.
        """
        if kwargs:
            logger.warning(f"PrefAlignForCausalLM.push_to_hub ignores {sorted(kwargs)}.")
        return push_folder(
            lambda folder: self.save_pretrained(folder, save_base=save_base, repo_id=repo_id),
            repo_id,
            token=token,
            private=private,
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
        )

    def load_latent_weights(self, path: str | os.PathLike) -> None:
        """Load the latent modules' tensors from a safetensors file written by `save_pretrained` (strict)."""
        path = Path(path)
        weights = load_tensors(path)
        own = self.latent_state_dict()
        # Backbones saved before the latent metric existed load with it unmeasured (zeros).
        missing = sorted(set(own) - set(weights) - {FISHER_KEY})
        unexpected = sorted(set(weights) - set(own))
        if missing or unexpected:
            raise OSError(
                f"{path} does not hold this backbone's latent weights (missing: {missing[:5]}, unexpected: "
                f"{unexpected[:5]}). The file is corrupt or from another model."
            )
        for name, tensor in weights.items():
            if tensor.shape != own[name].shape:
                raise OSError(
                    f"{path}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(own[name].shape)}."
                )
        self.load_state_dict(weights, strict=False)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        config: PrefAlignConfig | None = None,
        base_model: PreTrainedModel | None = None,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        dtype: torch.dtype | str | None = None,
        device_map: str | int | torch.device | dict[str, Any] | None = None,
        is_trainable: bool = False,
        **kwargs: Any,
    ) -> PrefAlignForCausalLM:
        """Load a backbone saved by [`~PrefAlignForCausalLM.save_pretrained`] (also via `AutoModelForCausalLM` and
        `pipeline("text-generation", model=...)`).

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): local directory or Hub repo id.
            base_model (`PreTrainedModel`, *optional*):
                The base LM to attach, instead of loading the one the checkpoint references.
            subfolder (`str`, *optional*): the backbone's folder inside the directory or repo.
            revision, token, cache_dir, force_download, local_files_only: Hub download options, as in transformers
                (`HF_HUB_OFFLINE` is honoured). `token`, `cache_dir`, `force_download` and `local_files_only` also
                apply to the base model the checkpoint references; its revision is the one the checkpoint records.
            dtype (`torch.dtype` or `str`, *optional*): dtype of the base LM; the latent modules stay in fp32, where
                their log-densities are computed. `None` loads the base as saved. `"auto"` (what `pipeline` passes)
                means what it means to the base's own loader: the checkpoint's dtype for a Hub or local base (and a
                base saved inside the backbone), as in transformers; bf16 where the hardware computes it natively,
                else fp32, for the embedded default (see [`load_default_base`]).
            device_map (`str`, `int`, `torch.device` or `dict`, *optional*):
                The one device the whole backbone goes to (`"cpu"`, `"cuda:0"`, `0`, `{"": 0}`); `"auto"` is the
                current accelerator if there is one, else the CPU. The latent modules hook into the base's layers,
                so a map that spreads the model over several devices is refused.
            is_trainable (`bool`, *optional*, defaults to `False`):
                As in PEFT: `False` loads for inference, in eval mode with every parameter frozen (`requires_grad`
                False); `True` loads in training mode with the latent modules trainable (and the base, when the
                checkpoint includes it; a frozen-base checkpoint keeps its base frozen).
            posterior_refinement_steps, posterior_refinement_step_size (*optional*):
                Override how the loaded backbone encodes responses (see [`PrefAlignConfig`]).
        """
        overrides = {name: kwargs.pop(name) for name in _INFERENCE_OPTIONS if name in kwargs}
        torch_dtype = kwargs.pop("torch_dtype", None)  # the pre-5.0 name of `dtype`
        dtype = dtype if dtype is not None else torch_dtype
        for name, harmless in _HARMLESS_LOAD_OPTIONS.items():
            if name in kwargs and harmless(kwargs[name]):
                kwargs.pop(name)
        if kwargs:
            logger.warning(f"PrefAlignForCausalLM.from_pretrained ignores {sorted(kwargs)}.")
        if model_args:
            raise TypeError(f"Unexpected positional arguments {model_args}.")
        device = _device_from_map(device_map)
        directory = _resolve_checkpoint_dir(
            pretrained_model_name_or_path,
            subfolder=subfolder,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
        )
        if config is None or subfolder:  # the config `AutoModel` passes was read from the same folder
            config = _load_config(directory)
        if overrides:
            config = PrefAlignConfig.from_dict({**config.to_dict(), **overrides})  # validates the new values

        if base_model is None:
            if config.base_included:
                base_model = AutoModelForCausalLM.from_pretrained(
                    directory / BASE_MODEL_SUBFOLDER,
                    dtype=dtype if dtype == "auto" else resolve_dtype(dtype, device or "cpu"),
                )
            elif config.base_model_name_or_path is None:
                raise OSError(
                    f"The backbone at {directory} was saved without its base model and records no base reference. "
                    "Pass the base with `base_model=...`."
                )
            else:
                try:
                    base_model = load_base_model(
                        config.base_model_name_or_path,
                        revision=config.base_model_revision,
                        dtype=dtype,
                        device=device or "cpu",  # bf16 is kept where it is native on the device it goes to
                        token=token,
                        cache_dir=cache_dir,
                        force_download=force_download,
                        local_files_only=local_files_only,
                    )
                except (OSError, ImportError) as err:
                    raise OSError(
                        f"The backbone at {directory} references the base model "
                        f"{config.base_model_name_or_path!r}, which could not be loaded: {err}"
                    ) from err
        elif dtype not in (None, "auto"):
            # A base passed in is cast to `dtype`; the loaders above already loaded it so.
            base_model.to(resolve_dtype(dtype, device or "cpu"))
        _check_base_matches(config.text_config, base_model.config, where=f"loaded for {directory}")
        config.text_config = base_model.config
        model = cls(config, base_model=base_model)
        model.name_or_path = str(pretrained_model_name_or_path)  # what later artefacts record as their backbone
        if subfolder:
            model.name_or_path = f"{model.name_or_path}/{subfolder}"
        model.load_latent_weights(directory / WEIGHTS_NAME)
        if not is_trainable:
            model.requires_grad_(False)
        elif not config.base_included:
            model.freeze_base()
        if (directory / GENERATION_CONFIG_NAME).is_file():
            model.generation_config = GenerationConfig.from_pretrained(directory)
        model.training_summary = _read_training_summary(directory)
        if device is not None:
            model.to(device)
        model.train(is_trainable)
        return model


# Options transformers' auto classes and `pipeline` pass to every `from_pretrained`, which mean nothing here when they
# hold these values (a value that would mean something is reported as ignored).
_HARMLESS_LOAD_OPTIONS: dict[str, Callable[[Any], bool]] = {
    "adapter_kwargs": lambda value: not value or all(v is None for v in value.values()),  # PEFT adapters only
    "trust_remote_code": lambda value: True,  # the backbone is registered code, never remote code
    "use_safetensors": lambda value: value in (None, True),  # safetensors is all we read
    "low_cpu_mem_usage": lambda value: True,
    "proxies": lambda value: value is None,
    "_from_auto": lambda value: True,
    "_from_pipeline": lambda value: True,
    "_commit_hash": lambda value: True,
}


def _device_from_map(device_map: str | int | torch.device | dict[str, Any] | None) -> torch.device | None:
    """The single device a `device_map` names; `None` leaves the model where its loader put it (the CPU)."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError(
                f"device_map={device_map!r} spreads the backbone over several devices; PrefAlignForCausalLM keeps "
                "the whole model on one (its latent modules hook into the base's layers). Pass one device, e.g. "
                "`device_map='cuda:0'`."
            )
        return _device_from_map(devices.pop())
    if device_map == "auto":
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        return torch.device(accelerator.type, torch.accelerator.current_device_index()) if accelerator else None
    if isinstance(device_map, str) and device_map in ("balanced", "balanced_low_0", "sequential"):
        raise ValueError(
            f"device_map={device_map!r} spreads the backbone over several devices; PrefAlignForCausalLM keeps the "
            "whole model on one. Pass one device, e.g. `device_map='cuda:0'`."
        )
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        if accelerator is None:
            raise ValueError(f"device_map={device_map} names an accelerator, but none is available.")
        return torch.device(accelerator.type, device_map)
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device_map={device_map!r} is not a device; pass 'cpu', 'cuda:0', an index, or 'auto'."
        ) from err


def _check_strength(strength: float) -> float:
    if (
        isinstance(strength, bool)
        or not isinstance(strength, (int, float))
        or not strength >= 0
        or strength == float("inf")
    ):
        raise ValueError(f"`preference_strength` must be a finite number >= 0, got {strength!r}.")
    return float(strength)


def _sink_token_id(text_config: Any) -> int:
    """The token whose position-0 state seeds the prefix slots: BOS when the base has one in its vocabulary."""
    for attr in ("bos_token_id", "eos_token_id"):
        token_id = getattr(text_config, attr, None)
        if isinstance(token_id, list):
            token_id = token_id[0] if token_id else None
        if isinstance(token_id, int) and 0 <= token_id < text_config.vocab_size:
            return token_id
    return 0


def _resolve_checkpoint_dir(
    name_or_path: str | os.PathLike,
    subfolder: str | None,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike | None,
    force_download: bool,
    local_files_only: bool,
) -> Path:
    """A local checkpoint directory, downloading a Hub repo snapshot when needed (cache only when offline)."""
    return pull_folder(
        str(name_or_path),
        subfolder=subfolder or None,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        force_download=force_download,
        local_files_only=local_files_only,
        what="PrefAlign backbone",
    )


def _load_config(directory: Path) -> PrefAlignConfig:
    config_file = directory / CONFIG_NAME
    if not config_file.is_file():
        raise OSError(f"No {CONFIG_NAME} in {directory}: this is not a saved PrefAlign backbone.")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise OSError(f"{config_file} is not valid JSON ({err}); the checkpoint is corrupt.") from err
    if raw.get("model_type") != PrefAlignConfig.model_type:
        raise ValueError(
            f"{directory} holds a {raw.get('model_type')!r} model, not a PrefAlign backbone (model_type 'prefalign'). "
            "To wrap a plain causal LM, use `PrefAlignForCausalLM.from_base(...)`."
        )
    return PrefAlignConfig.from_dict(raw)


def _read_training_summary(directory: Path) -> dict[str, Any] | None:
    """The backbone's `training_summary.json`, or the `training_summary` key of a config written before it existed."""
    path = directory / TRAINING_SUMMARY_NAME
    try:
        if path.is_file():
            summary = json.loads(path.read_text(encoding="utf-8"))
        else:
            summary = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8")).get("training_summary")
    except json.JSONDecodeError as err:
        raise OSError(f"{path} is not valid JSON ({err}); the checkpoint is corrupt.") from err
    if summary is not None and not isinstance(summary, dict):
        raise OSError(f"{path} must hold a JSON object, got {type(summary).__name__}; the checkpoint is corrupt.")
    return summary


def load_default_backbone(**latent_options: Any) -> tuple[PrefAlignForCausalLM, PreTrainedTokenizerBase]:
    """A fresh backbone around the embedded default model (SmolLM2-135M-Instruct) and its tokenizer."""
    base, tokenizer = load_default_base()
    return PrefAlignForCausalLM.from_base(base, tokenizer=tokenizer, **latent_options), tokenizer


__all__ = ["LATENT_MODULES_PATTERN", "PrefAlignForCausalLM", "PrefAlignPreTrainedModel", "load_default_backbone"]
