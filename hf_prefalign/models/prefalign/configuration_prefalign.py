"""Configuration of a PrefAlign backbone: a base causal LM plus a latent encoder and a latent adapter."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import logging


logger = logging.get_logger(__name__)

ENCODER_TYPES = ("hidden_states", "blocks")
ADAPTER_TYPES = ("residual", "prefix")


class PrefAlignConfig(PreTrainedConfig):
    r"""
    Configuration of a [`PrefAlignForCausalLM`] backbone.

    The backbone is a conditional VAE around any causal LM: a latent encoder q(z|x,y) reads a prompt and response and
    returns a diagonal Gaussian over a small latent z; a latent adapter turns z into a few key/value slots prepended to
    every attention layer of the (usually frozen) base LM.

    Two designs of each part are available. The defaults read the base's own mid-layer residual stream
    (`encoder_type="hidden_states"`) and act there (`adapter_type="residual"`): z is a point in the space where
    steering vectors live, and z = 0 adds nothing, so the neutral model is the base model. The paper's design, a
    small transformer over token embeddings and a key/value prefix in every layer, is `encoder_type="blocks"`,
    `adapter_type="prefix"`.

    Args:
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Configuration of the base causal LM. Named `text_config` like the language part of transformers'
            composite models, so `config.get_text_config()` and caches built from this config see the base LM.
        base_model_name_or_path (`str`, *optional*):
            Where the base LM's weights live (Hub id, local path, or the embedded default's reference). A backbone
            saved with a frozen base stores only its latent modules and reloads the base from here.
        base_model_revision (`str`, *optional*):
            Hub revision of the base LM.
        latent_dim (`int`, *optional*, defaults to 32):
            Size of the latent variable z.
        encoder_type (`str`, *optional*, defaults to `"hidden_states"`):
            `"hidden_states"`: a linear head over the mean residual stream of the response at `encoder_layer`, read
            from one no-grad pass of the base ([`HiddenStateEncoder`]); `"blocks"`: the paper's encoder, blocks
            copied from the base's first layers reading token embeddings and learned queries ([`LatentEncoder`]).
        encoder_layer (`int`, *optional*):
            Decoder layer whose input the hidden-state encoder reads; defaults to the middle layer.
        adapter_type (`str`, *optional*, defaults to `"residual"`):
            `"residual"`: z adds `W_l z` to the residual stream entering each of `steering_layers` (no bias: z = 0 is
            the base model exactly); `"prefix"`: the paper's key/value prefix of `num_prefix_slots` slots per layer.
        steering_layers (`list[int]` or `"auto"`, *optional*, defaults to `"auto"`):
            Decoder layers the residual adapter acts on. `"auto"`: the encoder layer and a quarter of the base's depth
            on either side (layers 8, 15 and 22 of a 30-layer base), resolved to the list when the base is known;
            at the same perplexity under the base, users move further than with the encoder layer alone
            (docs/preference_space.md). `None` is `[encoder_layer]`, the default of backbones saved before
            `"auto"` was (their configs hold `null`), which keep loading as they were saved.
        num_prefix_slots (`int`, *optional*, defaults to 4):
            Key/value slots per attention layer produced by the prefix adapter.
        num_encoder_layers (`int`, *optional*, defaults to 2):
            Transformer blocks of the `"blocks"` encoder, initialised from the base LM's first blocks.
        num_encoder_queries (`int`, *optional*, defaults to 4):
            Learned query vectors of the `"blocks"` encoder; their outputs parameterise q(z|x,y).
        adapter_init_std (`float`, *optional*, defaults to 0.02):
            Standard deviation of the latent adapter's initial weights.
        posterior_init_logvar (`float`, *optional*, defaults to 0.0):
            Initial log-variance of the untrained posterior q(z|x,y) (its mean starts at 0). 0 gives exactly N(0, I);
            a negative value (e.g. -4) starts CLaP with near-deterministic latents, so the NLL and contrastive
            gradients reach the encoder through z rather than through prior noise; the aggregated-posterior KL then
            spreads a prompt's latents over the prior. The prior of a user (`PreferenceEmbedding`) is always N(0, I).
        posterior_refinement_steps (`int`, *optional*, defaults to 0):
            Semi-amortised inference (Kim et al., 2018): after the encoder, move the posterior mean this many times by
            `posterior_refinement_step_size` along the normalised gradient of log p(y|x,z) with respect to z. Each
            step runs the base LM forward and backward once per response, so encoding costs about one LM training
            pass per step; it needs the response (`response_mask`). 0 is the paper's encoder alone. Measured on
            SmolLM2-135M (docs/clap.md): one step of length 3 lifts held-out contrastive accuracy from 0.22 to 1.0.
        posterior_refinement_step_size (`float`, *optional*, defaults to 3.0):
            Length of each refinement step, in units of z (a prior sample has norm ~sqrt(latent_dim)). The gradient is
            normalised because its norm grows with the response's length.
        gradient_skip_path (`bool`, *optional*, defaults to `False`):
            Add a gradient-only path z -> final hidden state (zero in the forward pass) that helps the encoder learn
            while the base LM is frozen. Active only in training mode.
        base_included (`bool`, *optional*, defaults to `False`):
            Whether the checkpoint holds the full base LM (a trained base, or one merged from a `PeftModel`) or only a
            reference to it (frozen base). Set by `save_pretrained` (and by `from_base` for a merged `PeftModel`); a
            backbone loaded from such a checkpoint saves its base whole again.

    Example:

    ```python
    >>> from transformers import LlamaConfig
    >>> from hf_prefalign import PrefAlignConfig
    >>> base = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    ...                    num_key_value_heads=2, vocab_size=128)
    >>> config = PrefAlignConfig(text_config=base, latent_dim=8)
    >>> config.get_text_config().model_type
    'llama'
    ```
    """

    model_type = "prefalign"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", optional=True)}

    text_config: dict | PreTrainedConfig | None = None
    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    latent_dim: int = 32
    encoder_type: str = "hidden_states"
    encoder_layer: int | None = None
    adapter_type: str = "residual"
    steering_layers: list[int] | str | None = "auto"
    num_prefix_slots: int = 4
    num_encoder_layers: int = 2
    num_encoder_queries: int = 4
    adapter_init_std: float = 0.02
    posterior_init_logvar: float = 0.0
    posterior_refinement_steps: int = 0
    posterior_refinement_step_size: float = 3.0
    gradient_skip_path: bool = False
    base_included: bool = False

    def __post_init__(self, **kwargs):
        # Training provenance is the model's (`training_summary.json`), not the architecture's; configs written by
        # earlier versions carry it here, and `from_pretrained` moves it to the model.
        kwargs.pop("training_summary", None)
        super().__post_init__(**kwargs)
        for name in ("latent_dim", "num_prefix_slots", "num_encoder_layers", "num_encoder_queries"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        steps = self.posterior_refinement_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"`posterior_refinement_steps` must be a non-negative integer, got {steps!r}.")
        if not self.posterior_refinement_step_size > 0:
            raise ValueError(
                f"`posterior_refinement_step_size` must be positive, got {self.posterior_refinement_step_size!r}."
            )
        if self.encoder_type not in ENCODER_TYPES:
            raise ValueError(f"`encoder_type` must be one of {ENCODER_TYPES}, got {self.encoder_type!r}.")
        if self.adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"`adapter_type` must be one of {ADAPTER_TYPES}, got {self.adapter_type!r}.")
        if isinstance(self.steering_layers, str):
            if self.steering_layers != "auto":
                raise ValueError(
                    f"`steering_layers` must be a list of layer indices, 'auto' or None, got {self.steering_layers!r}."
                )
            if self.text_config is not None:  # saved as the explicit list: the file says what was built
                self.steering_layers = self.resolved_steering_layers
        elif self.steering_layers is not None:
            if isinstance(self.steering_layers, int) and not isinstance(self.steering_layers, bool):
                self.steering_layers = [self.steering_layers]
            if not self.steering_layers or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.steering_layers
            ):
                raise ValueError(
                    f"`steering_layers` must be a non-empty list of layer indices, got {self.steering_layers!r}."
                )
            self.steering_layers = list(self.steering_layers)
        if self.text_config is not None:
            base_layers = self.text_config.num_hidden_layers
            for name, layers in (
                ("encoder_layer", [self.resolved_encoder_layer]),
                ("steering_layers", self.resolved_steering_layers),
            ):
                bad = [i for i in layers if not isinstance(i, int) or isinstance(i, bool) or not 0 < i < base_layers]
                if bad:
                    raise ValueError(
                        f"`{name}` must name decoder layers between 1 and {base_layers - 1} (the base has "
                        f"{base_layers} layers), got {getattr(self, name)!r}."
                    )
            if len(set(self.resolved_steering_layers)) != len(self.resolved_steering_layers):
                raise ValueError(f"`steering_layers` lists a layer twice: {self.steering_layers!r}.")
            if self.encoder_type == "blocks" and self.num_encoder_layers > base_layers:
                raise ValueError(
                    f"`num_encoder_layers={self.num_encoder_layers}` exceeds the base model's "
                    f"num_hidden_layers={base_layers}: the encoder is initialised from the base's first blocks."
                )

    @property
    def resolved_encoder_layer(self) -> int:
        """The decoder layer whose input the hidden-state encoder reads (the base's middle layer by default)."""
        if self.encoder_layer is not None:
            return self.encoder_layer
        return max(1, self.text_config.num_hidden_layers // 2)

    @property
    def resolved_steering_layers(self) -> list[int]:
        """The decoder layers the residual adapter acts on (see `steering_layers`)."""
        if self.steering_layers is None:
            return [self.resolved_encoder_layer]
        if self.steering_layers == "auto":
            return default_steering_layers(self.text_config.num_hidden_layers, self.resolved_encoder_layer)
        return list(self.steering_layers)


def default_steering_layers(num_layers: int, encoder_layer: int) -> list[int]:
    """The encoder layer and the layers a quarter of the depth below and above it, within 1 .. num_layers - 1.

    `default_steering_layers(30, 15) == [8, 15, 22]`; a base of 3 layers or fewer gets `[encoder_layer]`.
    """
    step = num_layers // 4
    candidates = (encoder_layer - step, encoder_layer, encoder_layer + step)
    return sorted({layer for layer in candidates if 0 < layer < num_layers})


__all__ = ["ADAPTER_TYPES", "ENCODER_TYPES", "PrefAlignConfig"]
