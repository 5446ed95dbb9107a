"""PreferenceEmbedding: one user's prior p_user(z|x), a kilobyte-sized artefact trained by Latent DPO."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..distributions import DiagonalGaussian
from ..hub.model_card import looks_like_repo_id, preference_card, write_card
from ..hub.transfer import pull_folder, push_folder
from ..utils.constants import CONFIG_NAME, DEFAULT_TARGET_KL, README_NAME, WEIGHTS_NAME
from ..utils.paths import validate_relative_path
from ..utils.serialization import (
    IntegrityError,
    atomic_directory,
    read_consistent,
    read_tensors,
    resolve_directory,
    save_tensors_atomic,
    sha256_file,
    write_json_atomic,
)
from ..version import __version__


if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from ..data.latent_cache import LatentCache
    from ..models.prefalign.modeling_prefalign import PrefAlignForCausalLM


PREFERENCE_TYPE = "prefalign-preference-embedding"
WEIGHTS_CHECKSUM_KEY = "weights_sha256"
_OWNED_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME, README_NAME})


@dataclass
class PreferenceEmbeddingConfig:
    r"""
    Configuration of a [`PreferenceEmbedding`].

    Args:
        latent_dim (`int`): size of z (must match the backbone's).
        feature_dim (`int`): size of the prompt features the frozen encoder gives (the base's hidden size).
        rank (`int`, *optional*, defaults to 8): rank of the prompt-dependent part of the prior.
        logvar_min, logvar_max (`float`, *optional*, defaults to -5.0 and 2.0): soft bounds of the log-variance, which
            keep the prior's variance from collapsing under the DPO objective.
        backbone_fingerprint (`str`): [`PrefAlignForCausalLM.fingerprint`] of the backbone it was trained against.
        base_model (`str`, *optional*): the backbone's base model reference (informational).
        backbone (`str`, *optional*): the backbone's name or Hub repo, linked from the model card.
        training (`dict`): how it was trained (pairs, steps, beta, ... as recorded by [`LatentDPOTrainer`]).
    """

    latent_dim: int
    feature_dim: int
    backbone_fingerprint: str
    rank: int = 8
    logvar_min: float = -5.0
    logvar_max: float = 2.0
    base_model: str | None = None
    backbone: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    hf_prefalign_version: str = __version__
    artefact_type: str = PREFERENCE_TYPE

    def __post_init__(self) -> None:
        for name in ("latent_dim", "feature_dim", "rank"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}.")
        if not self.logvar_min < 0 < self.logvar_max:
            raise ValueError(f"Need logvar_min < 0 < logvar_max, got {self.logvar_min} and {self.logvar_max}.")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> PreferenceEmbeddingConfig:
        if raw.get("artefact_type") != PREFERENCE_TYPE:
            raise ValueError(
                f"{source} is not a PrefAlign preference embedding (artefact_type={raw.get('artefact_type')!r}, "
                f"model_type={raw.get('model_type')!r})."
            )
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})


def prior_from_parameters(params: torch.Tensor, config: PreferenceEmbeddingConfig) -> DiagonalGaussian:
    """The prior N(mean, exp(logvar)) from its raw parameters `[mean, raw_logvar]` `(..., 2Z)`: `(..., Z)` each.

    logvar = lo + (hi - lo) * sigmoid(raw + shift), the shift chosen so that raw = 0 gives logvar = 0. Shared by
    [`PreferenceEmbedding`] and the stacked priors of many-user training, so both compute the same prior.
    """
    mean, raw_logvar = params.chunk(2, dim=-1)  # 2 x (..., Z)
    span = config.logvar_max - config.logvar_min
    shift = math.log(-config.logvar_min / config.logvar_max)
    logvar = config.logvar_min + span * torch.sigmoid(raw_logvar + shift)
    return DiagonalGaussian(mean, logvar)


class PreferenceEmbedding(nn.Module):
    """One user's prior p_user(z | x) = N(mean(x), diag(exp(logvar(x)))).

    It reads the frozen encoder's prompt features f(x) `(B, F)` (see [`PrefAlignForCausalLM.prompt_features`]):
    `[mean, raw_logvar] = bias + up(down(f(x)))`, a constant preference plus a rank-r prompt-dependent part. `up`
    and `bias` start at zero, so a new embedding is exactly N(0, I), the reference every user starts from. About
    5k parameters (20 KB) for SmolLM2-135M at rank 8.

    Example:

    ```python
    >>> emb = PreferenceEmbedding(PreferenceEmbeddingConfig(latent_dim=4, feature_dim=6, backbone_fingerprint="x"))
    >>> prior = emb(torch.randn(2, 6))
    >>> prior.mean.abs().max().item(), prior.logvar.abs().max().item()
    (0.0, 0.0)
    ```
    """

    def __init__(self, config: PreferenceEmbeddingConfig):
        super().__init__()
        self.config = config
        out = 2 * config.latent_dim
        self.bias = nn.Parameter(torch.zeros(out))
        self.down = nn.Parameter(torch.randn(config.feature_dim, config.rank) / math.sqrt(config.feature_dim))
        self.up = nn.Parameter(torch.zeros(config.rank, out))

    @classmethod
    def _from_tensors(
        cls, config: PreferenceEmbeddingConfig, tensors: dict[str, torch.Tensor], training: bool = True
    ) -> PreferenceEmbedding:
        # An embedding holding the given `bias`, `down`, `up` (taken as they are, not copied), built without the
        # constructor's random draw: no RNG consumed, and cheap enough to make thousands (many-user training). On a
        # fresh module, attributes and parameters are written where `nn.Module.__setattr__` would put them, without
        # its type checks (~15 us each, most of the cost of 10,000 users).
        embedding = cls.__new__(cls)
        nn.Module.__init__(embedding)
        vars(embedding).update(config=config, training=training)
        out = 2 * config.latent_dim
        shapes = {"bias": (out,), "down": (config.feature_dim, config.rank), "up": (config.rank, out)}
        for name, shape in shapes.items():
            tensor = tensors[name]
            if tuple(tensor.shape) != shape:
                raise ValueError(f"`{name}` must have shape {shape} for this config, got {tuple(tensor.shape)}.")
            embedding._parameters[name] = nn.Parameter(tensor.float())
        return embedding

    def forward(self, features: torch.Tensor) -> DiagonalGaussian:
        """p_user(z | x) for prompt features `(B, F)`; mean and logvar `(B, Z)` in fp32."""
        features = features.float()
        params = self.bias + (features @ self.down) @ self.up  # (B, 2Z)
        return prior_from_parameters(params, self.config)

    def latents(self, features: torch.Tensor, sample: bool = False, temperature: float = 1.0) -> torch.Tensor:
        """z for generation: the prior's mean, or a sample with its standard deviation scaled by `temperature`."""
        prior = self(features)
        if not sample:
            return prior.mean
        return prior.mean + temperature * prior.std * torch.randn_like(prior.mean)

    # ------------------------------------------------------------------
    # Users without training
    # ------------------------------------------------------------------
    @classmethod
    def from_examples(
        cls,
        model: PrefAlignForCausalLM,
        tokenizer: PreTrainedTokenizerBase,
        examples: Dataset | Sequence[Mapping[str, Any]],
        disliked: Dataset | Sequence[Mapping[str, Any]] | None = None,
        *,
        disliked_weight: float = 1.0,
        variance: float | None = None,
        rank: int = 8,
        latent_cache: LatentCache | None = None,
        target_kl: float | None = DEFAULT_TARGET_KL,
    ) -> PreferenceEmbedding:
        r"""
        A user from a few responses they liked (and optionally some they disliked), with no gradient step.

        The backbone's frozen encoder already says where a response sits in z: q(z|x,y). A user who liked k
        responses is put where those responses are: the prior's mean is the precision-weighted mean of the liked
        examples' posterior means, minus `disliked_weight` times that of the disliked ones, the same for every
        prompt (the prompt-dependent rank-r part is zero). Its variance is that of the moment-matched mixture of the
        liked posteriors, so sampling covers the liked examples. Only the encoder runs (once per example, through a
        [`LatentCache`]); the result saves, loads, banks and serves like a trained embedding, and can be refined with
        [`LatentDPOTrainer`] (`preference_embedding=`). Its `config.training` records
        `{"method": "from_examples", "liked": k, "disliked": k', ...}`.

        Args:
            model (`PrefAlignForCausalLM`): the (CLaP-trained) backbone the user belongs to.
            tokenizer (`PreTrainedTokenizerBase`): its tokenizer.
            examples (`datasets.Dataset` or `list[dict]`): rows with `prompt` (text or chat messages, as TRL) and
                `response` (text or a TRL conversational completion). A row with `liked` false counts as disliked
                (TRL's unpaired format, `prompt` / `completion` / `label`, works too). At least one liked row.
            disliked (`datasets.Dataset` or `list[dict]`, *optional*): more rows, all disliked.
            disliked_weight (`float`, *optional*, defaults to 1.0): how far the disliked mean pushes the user away.
            variance (`float`, *optional*): a fixed variance of the prior instead of the moment-matched one.
            rank (`int`, *optional*, defaults to 8): rank of the (zero) prompt-dependent part, for later training.
            latent_cache (`LatentCache`, *optional*): a cache of this backbone to read and fill (e.g. a trainer's).
            target_kl (`float`, *optional*, defaults to 0.11): put the user's mean at this departure from the base,
                in nats per response token under the backbone's latent metric, as `LatentDPOConfig.target_kl` does
                for a trained user: the examples give the direction, this number the distance. `None` keeps the
                length of the examples' mean difference, which depends on k and on how alike the examples are (on
                the validation split, 5 of 12 users at that length stayed within +15% perplexity, 9 of 12 at 0.14:
                docs/personalisation.md). A backbone without a measured metric warns and keeps the length.

        Returns:
            `PreferenceEmbedding`: in eval mode, on the CPU.

        Example:

        ```python
        >>> liked = [{"prompt": "Describe a rainy Monday.", "response": "Rain! Wonderful, cozy rain!"}]
        >>> user = PreferenceEmbedding.from_examples(model, tokenizer, liked)
        >>> model.load_preference(user, preference_id="carol")
        ```
        """
        from .personalisation import embedding_from_examples

        return embedding_from_examples(
            model,
            tokenizer,
            examples,
            disliked,
            disliked_weight=disliked_weight,
            variance=variance,
            rank=rank,
            latent_cache=latent_cache,
            target_kl=target_kl,
        )

    @classmethod
    def mix(
        cls,
        embeddings: Mapping[PreferenceEmbedding, float] | Sequence[PreferenceEmbedding],
        weights: Sequence[float] | None = None,
    ) -> PreferenceEmbedding:
        r"""
        A new user whose z is the convex combination of the given users' z, for every prompt.

        Weights are normalised to sum to 1 (equal weights when none are given). The mixture's prior mean is exactly
        `sum_i w_i mean_i(x)`: the members' prompt-dependent parts are stacked, so its rank is the sum of theirs
        (members without one add nothing). The log-variance parameters are combined the same way, before the
        bounding sigmoid. Every member must belong to the same backbone.

        Args:
            embeddings (`dict[PreferenceEmbedding, float]` or `list[PreferenceEmbedding]`): the users, with their
                weights as the mapping's values, or as `weights`.
            weights (`list[float]`, *optional*): finite, non-negative, not all zero.

        Returns:
            `PreferenceEmbedding`: its `config.training` records `{"method": "mix", "weights": [...], ...}`.

        Example:

        ```python
        >>> config = PreferenceEmbeddingConfig(latent_dim=2, feature_dim=3, backbone_fingerprint="x")
        >>> a, b = PreferenceEmbedding(config), PreferenceEmbedding(config)
        >>> with torch.no_grad():
        ...     _ = a.bias[:2].fill_(1.0)
        >>> PreferenceEmbedding.mix({a: 3, b: 1})(torch.randn(1, 3)).mean
        tensor([[0.7500, 0.7500]])
        ```
        """
        from .personalisation import mix_embeddings

        return mix_embeddings(embeddings, weights)

    # ------------------------------------------------------------------
    # Saving and loading
    # ------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, repo_id: str | None = None) -> None:
        """Write `model.safetensors`, `README.md` (a generated card) and `config.json` (with the weights' sha256).

        The folder is replaced whole ([`atomic_directory`]): a reader, even after a kill -9, sees the old embedding
        or the new one, never new weights under an old config. Other files in the folder are kept.
        """
        save_directory = Path(save_directory)
        if save_directory.is_file():
            raise ValueError(f"save_directory ({save_directory}) must be a directory, not a file.")
        with atomic_directory(save_directory, carry=lambda name: name not in _OWNED_FILES) as tmp:
            self._write_files(tmp, existing_card=save_directory / README_NAME, repo_id=repo_id)

    def _write_files(self, folder: Path, existing_card: Path | None = None, repo_id: str | None = None) -> None:
        # The files of a save, written into a private folder that the caller makes visible whole: `save_pretrained`
        # (one embedding) and `PreferenceBank.save` (thousands of them in one staged bank folder).
        folder.mkdir(parents=True, exist_ok=True)
        metadata = {"format": "pt", "backbone_fingerprint": self.config.backbone_fingerprint}
        save_tensors_atomic({name: p.detach() for name, p in self.named_parameters()}, folder / WEIGHTS_NAME, metadata)
        size = (folder / WEIGHTS_NAME).stat().st_size
        write_card(
            preference_card, folder / README_NAME, self, existing=existing_card, repo_id=repo_id, size_bytes=size
        )
        config = {**asdict(self.config), WEIGHTS_CHECKSUM_KEY: sha256_file(folder / WEIGHTS_NAME)}
        write_json_atomic(config, folder / CONFIG_NAME)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        path_in_repo: str | None = None,
        commit_message: str = "Upload preference embedding",
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
    ) -> str:
        """Upload this embedding (config, weights, card) to a Hub repo, or to `path_in_repo` inside it."""
        return push_folder(
            lambda folder: self.save_pretrained(folder, repo_id=repo_id),
            repo_id,
            path_in_repo=path_in_repo,
            token=token,
            private=private,
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ) -> PreferenceEmbedding:
        """Load a preference embedding from a local directory or a Hub repo (only `subfolder` is downloaded when
        given; `HF_HUB_OFFLINE` reads the cache only).

        Verified before use: the weights' sha256 recorded in the config, their content checksum, finite values, and
        that weights and config name the same backbone. `subfolder` must be a relative path inside `path`.
        """
        if subfolder is not None:
            subfolder = validate_relative_path(subfolder, "subfolder")
        local = Path(path) / subfolder if subfolder else Path(path)
        if resolve_directory(local).is_dir() or Path(path).exists() or not looks_like_repo_id(str(path)):
            return read_consistent(local, cls._load_local)
        folder = pull_folder(
            str(path),
            subfolder=subfolder,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            what="preference embedding",
        )
        return cls._load_local(folder)

    @classmethod
    def _load_local(cls, path: Path) -> PreferenceEmbedding:
        if not path.is_dir():
            raise FileNotFoundError(f"No preference embedding at {path}: no such directory (nor a Hub repo id).")
        config_file = path / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"No preference embedding at {path}: {CONFIG_NAME} is missing.")
        try:
            raw = json.loads(config_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise OSError(f"{config_file} is not valid JSON ({err}); the preference embedding is corrupt.") from err
        if not isinstance(raw, dict):
            raise OSError(f"{config_file} does not hold a JSON object; the preference embedding is corrupt.")
        config = PreferenceEmbeddingConfig.from_dict(raw, source=str(path))
        weights = path / WEIGHTS_NAME
        expected = raw.get(WEIGHTS_CHECKSUM_KEY)
        if expected is not None and weights.is_file() and sha256_file(weights) != expected:
            raise IntegrityError(
                f"{weights} does not match the sha256 recorded in {config_file} ({str(expected)[:12]}...): the "
                "weights were altered, damaged or come from another save. Save or download the embedding again."
            )
        tensors, metadata = read_tensors(weights)
        recorded = metadata.get("backbone_fingerprint")
        if recorded is not None and recorded != config.backbone_fingerprint:
            raise IntegrityError(
                f"{weights} was saved for backbone {recorded[:12]} but {config_file} names "
                f"{config.backbone_fingerprint[:12]}: the folder mixes two saves. Save the embedding again."
            )
        embedding = cls(config)
        own = dict(embedding.named_parameters())
        if set(tensors) != set(own) or any(tensors[k].shape != own[k].shape for k in own):
            raise OSError(
                f"{weights} does not match its config (found {sorted(tensors)} with shapes "
                f"{[tuple(t.shape) for t in tensors.values()]}); the preference embedding is corrupt."
            )
        embedding.load_state_dict(tensors)
        return embedding

    def check_compatible(self, fingerprint: str, latent_dim: int, feature_dim: int, name: str = "") -> None:
        """Raise a `ValueError` if this embedding was trained against another backbone."""
        label = f"The preference embedding {name!r}" if name else "The preference embedding"
        if (self.config.latent_dim, self.config.feature_dim) != (latent_dim, feature_dim):
            raise ValueError(
                f"{label} has latent_dim={self.config.latent_dim}, feature_dim={self.config.feature_dim}, but the "
                f"model expects {latent_dim} and {feature_dim}. Align it against this model."
            )
        if self.config.backbone_fingerprint != fingerprint:
            raise ValueError(
                f"{label} was trained against another backbone (fingerprint {self.config.backbone_fingerprint[:12]}, "
                f"this model's is {fingerprint[:12]}). Align the user again against this backbone."
            )


__all__ = ["PreferenceEmbedding", "PreferenceEmbeddingConfig", "prior_from_parameters"]
