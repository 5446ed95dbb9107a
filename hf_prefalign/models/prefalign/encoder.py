"""The latent encoder q(z|x,y): a few transformer blocks of the base LM reading its own (shared) token embeddings."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.utils import logging

from ...distributions import DiagonalGaussian
from .configuration_prefalign import PrefAlignConfig
from .hidden_state_encoder import batch_mean


logger = logging.get_logger(__name__)


def _truncated_text_config(text_config: PreTrainedConfig, num_layers: int) -> PreTrainedConfig:
    """The base config cut to its first `num_layers` blocks, with a 1-token vocabulary.

    The encoder never looks tokens up itself (it receives the base's embeddings), so its own table is a single row
    that is deleted right after construction.
    """
    config = copy.deepcopy(text_config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types[:num_layers])
    config.vocab_size = 1
    for token_attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if hasattr(config, token_attr):
            setattr(config, token_attr, None)
    config.use_cache = False
    return config


class LatentEncoder(nn.Module):
    """Encodes token sequences into a diagonal Gaussian over z.

    Reads `inputs_embeds` (the base LM's token embeddings, looked up by the caller from the shared, frozen table),
    appends `num_encoder_queries` learned query vectors, runs `num_encoder_layers` transformer blocks of the base's own
    architecture, and maps the query outputs through a LayerNorm and a linear layer to a mean and log-variance. The
    linear layer starts at zero, so an untrained encoder returns exactly N(0, I).

    The same encoder reads prompt + response (posterior q(z|x,y)) or a prompt alone (features for a user's prior).
    For a posterior the queries read the response tokens only (`query_mask`), which have seen the prompt through the
    blocks' causal attention: read over the whole sequence, the queries mostly see the prompt (shared by all of its
    responses) and the attention-sink token, and the posterior hardly tells a prompt's responses apart.

    The query outputs are centred by a running mean (`feature_mean`, updated in training mode from the batches of all
    processes, a saved buffer) before the LayerNorm. Hidden states of pretrained LMs share a large constant component
    (massive activations): measured on SmolLM2-135M it is >99% of the features' squared norm, leaving what tells a
    prompt's responses apart at 0.2%. A linear head on such inputs learns the shared part first and the
    response-specific part hardly at all; centred, the within-prompt share is ~40% and the posterior learns to
    separate responses.
    """

    feature_mean_momentum = 0.01

    def __init__(self, config: PrefAlignConfig):
        super().__init__()
        text_config = config.text_config
        hidden_size = text_config.hidden_size
        self.blocks: PreTrainedModel = AutoModel.from_config(
            _truncated_text_config(text_config, config.num_encoder_layers)
        )
        # Drop the placeholder token table: embeddings always come from the base LM.
        embedding_name = next(
            name for name, child in self.blocks.named_children() if child is self.blocks.get_input_embeddings()
        )
        setattr(self.blocks, embedding_name, None)

        self.queries = nn.Parameter(torch.zeros(config.num_encoder_queries, hidden_size))
        self.output_norm = nn.LayerNorm(hidden_size)
        self.to_gaussian = nn.Linear(config.num_encoder_queries * hidden_size, 2 * config.latent_dim)
        self.num_queries = config.num_encoder_queries
        self.register_buffer("feature_mean", torch.zeros(config.num_encoder_queries, hidden_size))  # (Q, hidden)
        self.register_buffer("feature_mean_updates", torch.zeros((), dtype=torch.long))

    def init_from_base(self, base_model: PreTrainedModel) -> list[str]:
        """Copy the base LM's first blocks (and any position/norm weights the encoder shares with it).

        Returns the names of the copied tensors.
        """
        source = base_model.base_model.state_dict()
        target = self.blocks.state_dict()
        copied = {
            name: tensor for name, tensor in source.items() if name in target and target[name].shape == tensor.shape
        }
        self.blocks.load_state_dict(copied, strict=False)
        missing = sorted(set(target) - set(copied))
        if missing:
            logger.warning(
                f"Latent encoder: {len(missing)} tensors were not found in the base model and stay "
                f"randomly initialised: {missing[:5]}{'...' if len(missing) > 5 else ''}"
            )
        return sorted(copied)

    def features(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, query_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Outputs of the learned queries.

        Args:
            inputs_embeds (`torch.Tensor` of shape `(B, T, hidden)`): token embeddings of the base LM.
            attention_mask (`torch.Tensor` of shape `(B, T)`): 1 for real tokens, 0 for padding (either side).
            query_mask (`torch.Tensor` of shape `(B, T)`, *optional*): the tokens the queries read (e.g. the response
                of prompt + response); the tokens themselves still attend causally to everything before them. `None`:
                the queries read every real token.

        Returns:
            `torch.Tensor` of shape `(B, Q, hidden)`.
        """
        batch, length = attention_mask.shape
        queries = self.queries.to(inputs_embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # (B, Q, hidden)
        hidden = torch.cat([inputs_embeds, queries], dim=1)  # (B, T+Q, hidden)
        mask = torch.cat(
            [attention_mask.to(torch.long), attention_mask.new_ones(batch, self.num_queries, dtype=torch.long)], dim=1
        )
        # Queries sit right after the last real token, wherever the padding is.
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T+Q)
        if query_mask is not None:
            mask = self._query_attention_mask(attention_mask.bool(), query_mask.bool() & attention_mask.bool())
        outputs = self.blocks(inputs_embeds=hidden, attention_mask=mask, position_ids=position_ids, use_cache=False)
        return outputs.last_hidden_state[:, -self.num_queries :]  # (B, Q, hidden)

    def _query_attention_mask(self, attention_mask: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        """`(B, 1, T+Q, T+Q)` boolean mask: tokens attend causally to real tokens, queries to `query_mask` tokens and
        to the queries up to themselves; every row sees itself (a padding row must not be empty)."""
        batch, length = attention_mask.shape
        size = length + self.num_queries
        device = attention_mask.device
        keys = torch.cat([attention_mask, attention_mask.new_ones(batch, self.num_queries)], dim=1)  # (B, T+Q)
        causal = torch.ones(size, size, dtype=torch.bool, device=device).tril()
        mask = causal.unsqueeze(0) & keys.unsqueeze(1)  # (B, T+Q, T+Q)
        query_keys = torch.cat([query_mask, query_mask.new_ones(batch, self.num_queries)], dim=1)  # (B, T+Q)
        mask[:, length:] &= query_keys.unsqueeze(1)
        mask |= torch.eye(size, dtype=torch.bool, device=device).unsqueeze(0)
        return mask.unsqueeze(1)

    def normalized_features(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, query_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Query outputs centred by the running feature mean, then LayerNorm-ed: `(B, Q, hidden)`."""
        features = self.features(inputs_embeds, attention_mask, query_mask)
        if self.training and torch.is_grad_enabled():
            self._update_feature_mean(features)
        return self.output_norm(features - self.feature_mean.to(features.dtype))

    @torch.no_grad()
    def _update_feature_mean(self, features: torch.Tensor) -> None:
        # A cumulative mean over the first 1/momentum batches, an exponential moving average after.
        weight = max(1.0 / float(self.feature_mean_updates + 1), self.feature_mean_momentum)
        self.feature_mean.lerp_(batch_mean(features).to(self.feature_mean.dtype), weight)
        self.feature_mean_updates += 1

    def forward(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, query_mask: torch.Tensor | None = None
    ) -> DiagonalGaussian:
        """q(z | tokens) for `(B, T, hidden)` embeddings; returns a Gaussian with mean and log-variance `(B, Z)`."""
        features = self.normalized_features(inputs_embeds, attention_mask, query_mask)  # (B, Q, hidden)
        params = self.to_gaussian(features.flatten(1))  # (B, Q*hidden) -> (B, 2Z)
        mean, logvar = params.float().chunk(2, dim=-1)  # 2 x (B, Z)
        return DiagonalGaussian(mean, logvar)


__all__ = ["LatentEncoder"]
