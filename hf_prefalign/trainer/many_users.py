"""Latent DPO for many users in one run: one shared latent cache, the users' priors stacked and trained together.

Aligning users one [`LatentDPOTrainer`] at a time spends most of its time outside the math: a `Trainer`, a
dataloader, an optimizer and a cache lookup of every text, per user, for a prior of a few thousand parameters. Here
the users' pairs are encoded once (a pair shared by many users is encoded and stored once), U users' priors are one
[`StackedPreferenceEmbedding`] (`bias` `(U, 2Z)`, `down` `(U, F, r)`, `up` `(U, r, 2Z)`), and the Latent DPO loss
runs over them together ([`kept_latent_pairs`], one matrix product per pair), so one step updates every user at once.

Each user is trained exactly as it would be alone, so its embedding does not depend on which other users share the
run, in which order, or on `users_per_batch`:

- **Data.** Per-user epochs over the user's own pairs: each epoch is a fresh permutation cut into batches of
  `per_device_train_batch_size` (the last one smaller), so users with different numbers of pairs take different
  numbers of steps (`ceil(num_train_epochs * ceil(pairs / batch))`, or `max_steps`, as the `Trainer` counts them).
  The batches of one step are padded to the largest and the padding is masked out of the loss; users whose steps are
  done sit out the remaining steps of their group (users are grouped by pair count, so that is rare).
- **Randomness.** User u's permutations come from a `torch.Generator` seeded with `user_seed(data_seed or seed, u,
  "shuffle")`. The latents are common random numbers: at its e-th pass over a pair (epoch e, from 0), a user meets
  `torch.randn((3, M, Z))` (N(0, I), chosen, rejected noise, in that order) from a generator seeded with
  `latent_seed(seed, key, e)`, where `key` names the pair by its content (its texts in [`align_users`], its
  posteriors' bytes for a bare table, `table_pair_keys`). Every user who visits that pair in the same epoch meets
  the same latents, so a step draws them, and sorts their reward gaps, once per distinct (pair, epoch) instead of
  once per user ([`kept_latent_pairs`]); each user's margins are then one matrix product per pair. `down` starts as
  in [`LatentDPOTrainer`] (`torch.manual_seed(seed)`), so every new user shares it.
- **Optimizer.** AdamW with `adam_beta1`, `adam_beta2`, `adam_epsilon`, per-user step counts and learning-rate
  schedules (`linear`, `constant`, `constant_with_warmup`, `cosine`, with `warmup_steps`), elementwise on the stacked
  parameters, hence exact per user; `weight_decay` on `down` and `up` but not `bias` (the `Trainer` exempts
  parameters named "bias"); `max_grad_norm` clips each user's gradient norm, not the stack's.

Across processes, `align_users(..., bank_directory=..., num_shards=n, shard_index=i)` trains the users whose id
hashes to shard i (`hf_prefalign.utils.sharding.shard_of`) and appends them to one sharded bank as they finish;
users already in the bank are skipped, so a rerun after a crash finishes only what is missing, and since a user's
training does not depend on the others, the bank equals a one-process run's.

No LM or encoder runs during training. Settings of [`LatentDPOConfig`] that cannot apply here
(gradient accumulation, evaluation, checkpoints, other optimizers or schedules, mixed precision, `report_to`) are
refused with a `ValueError` naming them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import os
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..data.latent_cache import PAIR_COLUMNS, LatentCache, read_preference_pairs
from ..distributions import DiagonalGaussian
from ..integrations import default_cache_dir
from ..models.prefalign.latent_metric import departure_record, departure_scale, quadratic_kl
from ..preference.bank import BANK_INDEX, PreferenceBank, read_bank_index
from ..preference.bank_shards import (
    DEFAULT_USERS_PER_SHARD,
    BankLockedError,
    check_shard_files,
    is_sharded_index,
    writer_lock,
)
from ..preference.embedding import PreferenceEmbedding, PreferenceEmbeddingConfig, prior_from_parameters
from ..preference.personalisation import constant_prior_bias
from ..utils.locking import lock_is_live
from ..utils.paths import validate_preference_id
from ..utils.serialization import resolve_directory
from ..utils.sharding import resolve_shard_spec, shard_of, shard_tag
from .latent_dpo_config import LatentDPOConfig
from .latent_dpo_loss import KeptLatentPairs, kept_latent_pairs, prior_margin_weights


if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..models.prefalign.modeling_prefalign import PrefAlignForCausalLM


logger = logging.get_logger(__name__)

USER_ID_COLUMN = "user_id"
SUPPORTED_SCHEDULERS = ("linear", "constant", "constant_with_warmup", "cosine")
DEFAULT_USERS_PER_BATCH = 4096
_SUPPORTED_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")
_LISTED = 5  # user ids named in a warning
_CLAIM = re.compile(r"align-(\d{5,})-of-(\d{5,})\.lock")  # one process's claim on its shard of a fan-out
BANK_WAIT_S = 300.0  # how long a fan-out process waits for another one's append to the bank


def user_seed(seed: int, user_id: str, stream: str) -> int:
    """The seed of one user's random stream (`"shuffle"` or `"noise"`): a hash of `(seed, user_id, stream)`.

    Seeding by the id, not by a position, makes a user's training independent of who else is in the run.
    """
    digest = hashlib.sha256(json.dumps([int(seed), user_id, stream]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def table_pair_keys(table: Mapping[str, torch.Tensor]) -> list[str]:
    """A content key of each row of a pair table: a hash of its chosen and rejected posteriors (fp32 bytes).

    Keyed by content, not by row number, so that a pair's latents do not depend on which other pairs share the table.
    """
    columns = torch.cat([table[name].float() for name in PAIR_COLUMNS if name != "features"], dim=1).contiguous()
    return [hashlib.sha256(row.tobytes()).hexdigest()[:16] for row in columns.numpy()]


def latent_seed(seed: int, pair_key: str, epoch: int) -> int:
    """The seed of the latents drawn for a pair (named by `pair_key`: `table_pair_keys`, or the trainer's `pair_keys`)
    in a user's epoch `epoch` (from 0)."""
    return user_seed(seed, f"{pair_key}/{int(epoch)}", "latents")


def _check_config(args: LatentDPOConfig) -> None:
    """Refuse the settings that a `Trainer` would honour but that have nothing to act on in a batched run."""
    if not isinstance(args, LatentDPOConfig):
        raise TypeError(f"`args` must be a LatentDPOConfig, got {type(args).__name__}.")
    refused = []
    if args.gradient_accumulation_steps != 1:
        refused.append(f"`gradient_accumulation_steps={args.gradient_accumulation_steps}` (use a larger batch)")
    scheduler = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    if scheduler not in SUPPORTED_SCHEDULERS:
        refused.append(f"`lr_scheduler_type={scheduler!r}` (supported: {', '.join(SUPPORTED_SCHEDULERS)})")
    if args.lr_scheduler_kwargs:
        refused.append(f"`lr_scheduler_kwargs={args.lr_scheduler_kwargs!r}`")
    optimizer = str(getattr(args.optim, "value", args.optim))
    if optimizer not in _SUPPORTED_OPTIMIZERS:
        refused.append(f"`optim={optimizer!r}` (supported: AdamW, {' / '.join(_SUPPORTED_OPTIMIZERS)})")
    for name, default in (("eval_strategy", "no"), ("save_strategy", "no")):
        value = str(getattr(getattr(args, name), "value", getattr(args, name)))
        if value != default:
            refused.append(f"`{name}={value!r}` (no evaluation set or checkpoints: the bank is the output)")
    if args.resume_from_checkpoint:
        refused.append("`resume_from_checkpoint` (no checkpoints are written)")
    if args.dataloader_drop_last:
        refused.append("`dataloader_drop_last=True` (every pair of a user counts)")
    if args.fp16 or args.bf16:
        refused.append("`fp16` / `bf16` (latent densities are computed in fp32)")
    if args.report_to and args.report_to != ["none"]:
        refused.append(f"`report_to={args.report_to!r}` (progress is logged through the `transformers` logger)")
    if refused:
        raise ValueError(
            f"Many-user Latent DPO cannot apply {', '.join(refused)}. Leave "
            + ("it at its default." if len(refused) == 1 else "them at their defaults.")
        )


def _lr_factor(scheduler: str, step: torch.Tensor, warmup: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """The learning-rate multiplier of each user's update number `step` (0-based), as transformers' schedules compute
    it for a run of `total` steps with `warmup` warmup steps; all `(U,)` float64."""
    ramp = step / warmup.clamp(min=1.0)
    if scheduler == "constant":
        return torch.ones_like(step)
    if scheduler == "constant_with_warmup":
        after = torch.ones_like(step)
    elif scheduler == "linear":
        after = ((total - step) / (total - warmup).clamp(min=1.0)).clamp(min=0.0)
    else:  # cosine, half a cycle (transformers' default)
        progress = (step - warmup) / (total - warmup).clamp(min=1.0)
        after = (0.5 * (1.0 + torch.cos(math.pi * 0.5 * 2.0 * progress))).clamp(min=0.0)
    return torch.where(step < warmup, ramp, after)


class StackedPreferenceEmbedding(nn.Module):
    """U users' priors as one module: `bias` `(U, 2Z)`, `down` `(U, F, r)`, `up` `(U, r, 2Z)`.

    User u's slice computes exactly what its own [`PreferenceEmbedding`] computes: `[mean, raw_logvar] = bias[u] +
    (f(x) @ down[u]) @ up[u]`, bounded the same way. Every user shares one config (sizes, rank, log-variance
    bounds). It is how [`MultiUserLatentDPOTrainer`] holds a group of users; `embedding(u)` gives one user back.

    Args:
        config (`PreferenceEmbeddingConfig`): the users' shared config.
        num_users (`int`): U; parameters start at zero (use `from_embeddings` to stack existing users).
    """

    def __init__(self, config: PreferenceEmbeddingConfig, num_users: int):
        super().__init__()
        self.config = config
        out = 2 * config.latent_dim
        self.bias = nn.Parameter(torch.zeros(num_users, out))
        self.down = nn.Parameter(torch.zeros(num_users, config.feature_dim, config.rank))
        self.up = nn.Parameter(torch.zeros(num_users, config.rank, out))

    def __len__(self) -> int:
        return self.bias.shape[0]

    @classmethod
    def from_embeddings(cls, embeddings: Sequence[PreferenceEmbedding]) -> StackedPreferenceEmbedding:
        """Stack users that share sizes, rank and bounds (their `training` records are not kept)."""
        if not embeddings:
            raise ValueError("Nothing to stack: give at least one PreferenceEmbedding.")
        first = embeddings[0].config
        shape = (first.latent_dim, first.feature_dim, first.rank, first.logvar_min, first.logvar_max)
        for index, embedding in enumerate(embeddings):
            config = embedding.config
            found = (config.latent_dim, config.feature_dim, config.rank, config.logvar_min, config.logvar_max)
            if found != shape:
                raise ValueError(
                    f"Embedding {index} has (latent_dim, feature_dim, rank, logvar_min, logvar_max)={found}, "
                    f"embedding 0 has {shape}: only embeddings of the same shape and bounds can be stacked."
                )
        stack = cls(dataclasses.replace(first, training={}), len(embeddings))
        with torch.no_grad():
            for name in ("bias", "down", "up"):
                getattr(stack, name).copy_(torch.stack([getattr(e, name).detach().float() for e in embeddings]))
        return stack

    def forward(self, features: torch.Tensor) -> DiagonalGaussian:
        """Each user's prior for its own prompt features `(U, B, F)`: mean and logvar `(U, B, Z)`, fp32."""
        return stacked_prior(self.bias, self.down, self.up, features.float(), self.config)

    def embedding(self, index: int, training: dict[str, Any] | None = None, copy: bool = True) -> PreferenceEmbedding:
        """User `index` as its own [`PreferenceEmbedding`] with `training` as its `config.training`: a copy, or with
        `copy=False` a view of this stack's rows (no other user's parameters share them)."""
        config = dataclasses.replace(self.config, training=dict(training or {}))
        tensors = {name: getattr(self, name).detach()[index] for name in ("bias", "down", "up")}
        if copy:
            tensors = {name: tensor.clone() for name, tensor in tensors.items()}
        return PreferenceEmbedding._from_tensors(config, tensors, training=False)


def stacked_prior(
    bias: torch.Tensor,
    down: torch.Tensor | None,
    up: torch.Tensor | None,
    features: torch.Tensor | None,
    config: PreferenceEmbeddingConfig,
) -> DiagonalGaussian:
    """The priors of U users from stacked parameters, for their prompt features `(U, B, F)`: `(U, B, Z)` each.

    `down` / `up` / `features` may be `None` when every `up` is zero (no prompt-dependent part), which skips the
    matrix products: `bias + 0` is `bias` exactly.
    """
    params = bias.unsqueeze(1)  # (U, 1, 2Z)
    if features is not None and down is not None and up is not None:
        params = params + torch.bmm(torch.bmm(features, down), up)  # (U, B, 2Z)
    return prior_from_parameters(params, config)


# ----------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------
# Margins computed at once in `_grouped_loss`: 2 MB of fp32, so that the passes over them stay in the CPU's cache
# and a step takes tens of chunks, not hundreds (each chunk costs ~0.2 ms of Python)
_CHUNK_ELEMENTS = 1 << 19
_FEATURES_FROM = 32  # entries per group from which building the kept pairs' features beats gathering from rho


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a block that makes many objects and no cycles: its passes over a
    growing heap cost as much as making 10,000 users' embeddings."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _chunks(members: list[int], width: int) -> list[tuple[int, int]]:
    """Ranges `[start, end)` of groups (in order of their number of entries `members`) with at most
    `_CHUNK_ELEMENTS` margins each, at least one group: a chunk's groups are padded to its largest."""
    chunks: list[tuple[int, int]] = []
    start = 0
    for end in range(1, len(members) + 1):
        if end - start > 1 and (end - start) * width * members[end - 1] > _CHUNK_ELEMENTS:
            chunks.append((start, end - 1))
            start = end - 1
    return chunks + [(start, len(members))] if members else chunks


def _fold_products(values: torch.Tensor) -> torch.Tensor:
    """The products of the two halves of the last dimension, `(..., k)` -> `(..., k // 2)` (an odd last entry
    multiplied into the first product): the same product of all entries, in half as many factors."""
    half = values.shape[-1] // 2
    if half == 0:
        return values
    folded = values[..., :half] * values[..., half : 2 * half]
    if values.shape[-1] % 2:
        folded[..., :1] *= values[..., -1:]
    return folded


def _grouped_loss(
    kept: KeptLatentPairs, weights: torch.Tensor, group: torch.Tensor, slot: torch.Tensor, num_users: int, beta: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Each user's Latent DPO loss from its entries (user slot, pair group) of one step, and its gradient.

    Entries that visit the same group share its kept latent pairs: the group's margins for all of them are one matrix
    product `(n, 2Z) @ (2Z, k)` with the pairs' features (or, for small n, gathered from each latent's rho), batched
    over consecutive groups (given in order of their number of entries, so that padding stays small), a chunk at a
    time so that the passes stay in cache (`_chunks`). The gradient is written out (d softplus = sigmoid), so no chunk
    keeps a graph.

    Args:
        kept (`KeptLatentPairs`): the step's G groups.
        weights (`torch.Tensor` of shape `(E, 2Z)`): each entry's prior as `prior_margin_weights`.
        group, slot (`torch.Tensor` of shape `(E,)`): each entry's group and user.
        num_users (`int`): A, the users of the step.

    Returns:
        `(loss, metrics, gradient)`: `loss` and the metrics `(A,)` each, as [`latent_dpo_loss`] over each user's own
        pairs (the metrics' `pairs/kept` is the user's count of kept latent pairs: divide by its pairs), and the
        gradient of `loss.sum()` with respect to `weights`.
    """
    weights = weights.detach()
    device, dtype = weights.device, weights.dtype
    num_groups, width = len(kept.count), kept.width
    count = kept.count.to(dtype)
    user_count = weights.new_zeros(num_users).index_add_(0, slot, count[group])
    denominator = user_count.clamp(min=1.0)
    coefficient = 1.0 / denominator[slot]  # (E,): d loss_user / d (an entry's sum of softplus)
    members = torch.bincount(group, minlength=num_groups)  # entries per group
    # Entries in order of their group: a chunk of consecutive groups is a slice of them
    by_group = torch.sort(group, stable=True).indices
    sorted_group = group[by_group]
    bounds = [0, *members.cumsum(0).tolist()]
    column = torch.arange(len(group), device=device) - torch.tensor(bounds[:-1], device=device)[sorted_group]
    sorted_weights, sorted_coefficient = weights[by_group], coefficient[by_group]
    sums, margin_sums, right = (weights.new_zeros(len(group)) for _ in range(3))
    sorted_gradient = torch.zeros_like(weights)
    buffers = [weights.new_empty(0) for _ in range(3)]

    def scratch(shape: torch.Size, index: int) -> torch.Tensor:
        # Margin-sized buffers reused by every chunk: fresh ones of a few MB would be new pages every chunk.
        size = math.prod(shape)
        if buffers[index].numel() < size:
            buffers[index] = weights.new_empty(size)
        return buffers[index][:size].view(shape)

    for first, last in _chunks(members.tolist(), width):
        entries = slice(bounds[first], bounds[last])
        widest = int(members[last - 1])  # groups are in order of size
        place = (sorted_group[entries] - first) * widest + column[entries]  # each entry's (group, column), flat
        laid_out = weights.new_zeros((last - first) * widest, weights.shape[-1])
        laid_out = laid_out.index_copy_(0, place, sorted_weights[entries]).view(last - first, widest, -1)  # (g, n, 2Z)
        if laid_out.shape[1] >= _FEATURES_FROM:  # many entries per group: per-pair features, shared by them
            features = kept.features(first, last)  # (g, k, 2Z)
            shape = torch.Size((*laid_out.shape[:2], width))
            margins = torch.bmm(laid_out, features.transpose(1, 2), out=scratch(shape, 2))  # -beta * rho gap
        else:  # few: each latent's rho, then the kept pairs' differences (no (k, 2Z) features to build)
            terms = kept.terms[first:last]  # (g, 3M, 2Z)
            rho = torch.bmm(laid_out, terms.transpose(1, 2))  # (g, n, 3M)
            shape = (-1, laid_out.shape[1], -1)
            index_a = kept.first[first:last].unsqueeze(1).expand(*shape)  # (g, n, k)
            index_b = kept.second[first:last].unsqueeze(1).expand(*shape)
            pair_scale = kept.scale[first:last].unsqueeze(1)  # (g, 1, k)
            margins = (rho.gather(-1, index_a) - rho.gather(-1, index_b)).mul_(pair_scale)
        # Padded kept pairs have margin 0 (zero scale): they add log 2 each to the softplus sums (subtracted), nothing
        # to the other sums, and nothing to the gradient (zero features, zero pair scale).
        # Every pass over the margins counts, and on the CPU a sigmoid costs a fraction of an exp, a log or a log1p:
        # the slopes d softplus / d m = sigmoid(m) are needed anyway, and softplus(m) = m - log(sigmoid(m)), whose
        # logs are summed as the logs of products of four slopes (a quarter of the logs). The count of m < 0 is
        # -sum(min(sign(m), 0)) (comparisons into bool are slower still).
        padding = (width - count[first:last]).mul_(math.log(2.0)).unsqueeze(-1)  # (g, 1)
        margin_sum = margins.sum(-1)  # (g, n)
        negatives = torch.sign(margins, out=scratch(margins.shape, 0)).clamp_(max=0.0).sum(-1).neg_()
        slopes = torch.sigmoid(margins, out=scratch(margins.shape, 1))  # d softplus / d margin
        log_sum = torch.log(_fold_products(_fold_products(slopes))).sum(-1)
        softplus_sum = margin_sum - log_sum
        if not bool(torch.isfinite(log_sum).all()):  # a product that underflowed to 0: those rows the stable way
            rows = ~torch.isfinite(log_sum)
            softplus_sum[rows] = F.softplus(margins[rows]).sum(-1)
        sums[entries] = (softplus_sum - padding).flatten()[place]
        margin_sums[entries] = margin_sum.flatten()[place]
        right[entries] = negatives.flatten()[place]
        # (g, n, 1): each real entry's coefficient, 0 on padding; applied after the products, on (g, n, 2Z)
        scale = weights.new_zeros(laid_out.shape[0] * widest).index_copy_(0, place, sorted_coefficient[entries])
        scale = scale.view(*laid_out.shape[:2], 1)
        if laid_out.shape[1] >= _FEATURES_FROM:
            grad_laid_out = torch.bmm(slopes, features).mul_(scale)
        else:
            slopes.mul_(pair_scale)  # d / d rho_a, and minus d / d rho_b
            grad_rho = torch.zeros_like(rho).scatter_add_(-1, index_a, slopes).scatter_add_(-1, index_b, slopes.neg_())
            grad_laid_out = torch.bmm(grad_rho, terms).mul_(scale)
        sorted_gradient[entries] = grad_laid_out.flatten(0, 1).index_select(0, place)  # (e, 2Z)
    gradient = torch.empty_like(sorted_gradient)
    gradient[by_group] = sorted_gradient
    slot = slot[by_group]  # the sums are in group order too
    totals = weights.new_zeros(num_users)
    loss = totals.index_add(0, slot, sums) / denominator
    metrics = {
        "pairs/kept": user_count,
        "rewards/margin": totals.index_add(0, slot, margin_sums) / (-beta * denominator),
        "rewards/accuracy": totals.index_add(0, slot, right) / denominator,
    }
    return loss, metrics, gradient


def _pick(tensor: torch.Tensor, selected: torch.Tensor | None) -> torch.Tensor:
    """The rows of the users taking part in a step (all of them when `selected` is None)."""
    return tensor if selected is None else tensor[selected.to(tensor.device)]


@dataclass
class _User:
    user_id: str
    rows: torch.Tensor  # (n,) rows of the shared pair table
    start: PreferenceEmbedding | None  # a warm start, or None for a new user

    @property
    def num_pairs(self) -> int:
        return self.rows.shape[0]  # not len(): Tensor.__len__ is a Python call, ~30x slower, x users x stacks


def _stacked_rows(users: list[_User]) -> tuple[torch.Tensor, torch.Tensor]:
    """All users' rows of the pair table end to end, `(R,)`, and the index of the user each belongs to, `(R,)`: the
    segments for per-user sums (`index_add_`)."""
    owner = torch.repeat_interleave(torch.arange(len(users)), torch.tensor([user.num_pairs for user in users]))
    return owner, torch.cat([user.rows for user in users])


def _pair_table(pairs: Dataset | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The latent columns as fp32 tensors, checked for presence and matching lengths."""
    if isinstance(pairs, Dataset):
        missing = [name for name in PAIR_COLUMNS if name not in pairs.column_names]
        found = pairs.column_names
        table = pairs.with_format("torch")[:] if not missing else {}
    elif isinstance(pairs, Mapping):
        missing = [name for name in PAIR_COLUMNS if name not in pairs]
        found = sorted(pairs)
        table = pairs
    else:
        raise TypeError(f"`pairs` must be a Dataset or a mapping of tensors, got {type(pairs).__name__}.")
    if missing:
        raise ValueError(
            f"The pair table lacks column(s) {missing}; found {found}. Expected the latent columns of "
            f"LatentCache.encode_pairs: {list(PAIR_COLUMNS)}."
        )
    columns = {name: torch.as_tensor(table[name]).float() for name in PAIR_COLUMNS}
    shapes = {name: tuple(tensor.shape) for name, tensor in columns.items()}
    posterior_shapes = {shape for name, shape in shapes.items() if name != "features"}
    if (
        len(shapes["features"]) != 2
        or len(posterior_shapes) != 1
        or len(next(iter(posterior_shapes))) != 2
        or next(iter(posterior_shapes))[0] != shapes["features"][0]
    ):
        raise ValueError(
            f"The pair table's columns must be `features` (N, F) and four posterior columns (N, Z); got {shapes}."
        )
    return columns


class MultiUserLatentDPOTrainer:
    r"""
    Trains many users' [`PreferenceEmbedding`]s at once with Latent DPO, on one table of latent pairs they share.

    Users are grouped by rank and pair count into stacks of `users_per_batch` ([`StackedPreferenceEmbedding`]),
    each trained in one loop of batched steps. Every user gets the training it would get alone (see the module
    docstring for the exact contract: per-user epochs, random streams, AdamW state, schedule and gradient clipping),
    and its embedding records `config.training` like [`LatentDPOTrainer`]'s (`method`, `pairs`, `steps`, settings,
    `final_loss`, `posterior_separation`, reward accuracy of the first and last `logging_steps` steps), plus
    `users_in_run` and, for users continued from an embedding, `warm_start: true`. Use [`align_users`] to start from
    text; this class starts from latents.

    Args:
        args (`LatentDPOConfig`): the settings of every user.
        pairs (`datasets.Dataset` or `dict[str, torch.Tensor]`): the shared table of latent pairs, `PAIR_COLUMNS`
            (as [`LatentCache.encode_pairs`] / [`LatentCache.pair_latents`] give them): `features` `(N, F)` and the
            chosen / rejected posteriors' `*_mean`, `*_logvar` `(N, Z)`.
        users (`dict[str, Sequence[int]]`): each user's rows of `pairs` (a row may belong to any number of users).
            A user without rows is skipped with a counted warning.
        embedding_config (`PreferenceEmbeddingConfig`): what every new user's config copies (sizes, backbone
            fingerprint and references); its `rank` is replaced by `args.prior_rank`, its `training` by the record.
        preference_embeddings (`dict[str, PreferenceEmbedding]`, *optional*): users to continue instead of starting
            them at `prior_init` (a warm start: weights only, fresh optimizer state).
        users_per_batch (`int`, *optional*, defaults to 4096): users per stack. A step draws the latents of each
            distinct (pair, epoch) once for its whole stack, so larger stacks are faster where users share pairs (the
            many-users benchmark at U = 10,000, one core: 118 users/s at 256, 312 at 1,000, 434 at 4,096); memory grows
            with it by the stack's parameters (`down` alone is `F * r` floats per user, ~18 KB at SmolLM2's size).
        pair_keys (`Sequence[str]`, *optional*): a name of each row of `pairs` that seeds its latents (see the
            module docstring); defaults to a hash of the row's posteriors. [`align_users`] passes a hash of the
            pair's texts, which every process of a fan-out computes alike.
        latent_fisher (`torch.Tensor` of shape `(Z, Z)`, *optional*): the backbone's latent metric
            ([`PrefAlignForCausalLM.latent_fisher`]), which `args.target_kl` needs; each user's mean is then scaled
            as [`LatentDPOTrainer`] scales it ([`align_users`] passes the backbone's).

    Example:

    ```python
    >>> trainer = MultiUserLatentDPOTrainer(config, pairs, {"alice": [0, 1, 2], "bob": [2, 3]}, embedding_config)
    >>> bank = trainer.train()
    >>> bank.ids()
    ['alice', 'bob']
    ```
    """

    def __init__(
        self,
        args: LatentDPOConfig,
        pairs: Dataset | Mapping[str, torch.Tensor],
        users: Mapping[str, Sequence[int] | torch.Tensor],
        embedding_config: PreferenceEmbeddingConfig,
        *,
        preference_embeddings: Mapping[str, PreferenceEmbedding] | None = None,
        users_per_batch: int = DEFAULT_USERS_PER_BATCH,
        pair_keys: Sequence[str] | None = None,
        latent_fisher: torch.Tensor | None = None,
    ):
        _check_config(args)
        if not isinstance(users_per_batch, int) or isinstance(users_per_batch, bool) or users_per_batch < 1:
            raise ValueError(f"`users_per_batch` must be a positive integer, got {users_per_batch!r}.")
        if not isinstance(users, Mapping):
            raise TypeError(f"`users` must map user ids to rows of `pairs`, got {type(users).__name__}.")
        self.args = args
        self.users_per_batch = users_per_batch
        self.device = torch.device("cpu") if args.use_cpu else args.device
        self.table = _pair_table(pairs)
        num_rows = len(self.table["features"])
        feature_dim, latent_dim = self.table["features"].shape[1], self.table["chosen_mean"].shape[1]
        if (feature_dim, latent_dim) != (embedding_config.feature_dim, embedding_config.latent_dim):
            raise ValueError(
                f"The pair table has feature_dim={feature_dim}, latent_dim={latent_dim}, but the embeddings "
                f"expect {embedding_config.feature_dim} and {embedding_config.latent_dim}: the latents come from "
                "another backbone."
            )
        self.embedding_config = dataclasses.replace(embedding_config, rank=args.prior_rank, training={})
        starts = dict(preference_embeddings or {})
        unknown = sorted(set(starts) - set(users))
        if unknown:
            raise ValueError(
                f"`preference_embeddings` names {len(unknown)} user(s) without pairs: {unknown[:_LISTED]}. Give each "
                "continued user its new pairs in `users`."
            )
        self.users: list[_User] = []
        skipped = []
        for user_id, rows in users.items():
            validate_preference_id(user_id)
            rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
            if len(rows) == 0:
                skipped.append(user_id)
                continue
            if int(rows.min()) < 0 or int(rows.max()) >= num_rows:
                raise ValueError(
                    f"User {user_id!r} names rows outside the pair table of {num_rows} rows "
                    f"(found {int(rows.min())} .. {int(rows.max())})."
                )
            start = starts.get(user_id)
            if start is not None:
                config = self.embedding_config
                start.check_compatible(config.backbone_fingerprint, config.latent_dim, config.feature_dim, user_id)
            self.users.append(_User(user_id, rows, start))
        self.skipped_users = skipped
        if skipped:
            logger.warning(
                f"Skipped {len(skipped)} user(s) with no usable pair: {', '.join(map(repr, skipped[:_LISTED]))}"
                + (f" and {len(skipped) - _LISTED} more." if len(skipped) > _LISTED else ".")
            )
        if not self.users:
            raise ValueError(f"No user has a usable pair ({len(skipped)} skipped): nothing to align.")
        # Mean chosen/rejected separation of each row, in posterior standard deviations (see LatentDPOTrainer).
        gap = self.table["chosen_mean"] - self.table["rejected_mean"]
        spread = 0.5 * (self.table["chosen_logvar"].exp() + self.table["rejected_logvar"].exp())
        self._row_separation = (gap.pow(2) / spread.clamp(min=1e-12)).sum(-1).sqrt()  # (N,)
        if pair_keys is None:
            pair_keys = table_pair_keys(self.table)
        elif len(pair_keys) != num_rows or not all(isinstance(key, str) for key in pair_keys):
            raise ValueError(f"`pair_keys` must give one string per row of the pair table ({num_rows} rows).")
        self._pair_keys = list(pair_keys)
        self._epoch_span = max(self._total_steps(user.num_pairs) for user in self.users) + 1  # > any epoch index
        self._latent_seeds: dict[tuple[int, int], int] = {}
        self.log_history: list[dict[str, float]] = []
        self.embeddings: dict[str, PreferenceEmbedding] = {}
        if latent_fisher is not None and tuple(latent_fisher.shape) != (latent_dim, latent_dim):
            raise ValueError(
                f"`latent_fisher` must have shape ({latent_dim}, {latent_dim}), got {tuple(latent_fisher.shape)}."
            )
        self.latent_fisher = latent_fisher
        if args.target_kl is not None and latent_fisher is None:
            logger.warning(
                f"target_kl={args.target_kl} is not applied: no latent metric was given (the backbone's was never "
                "measured; see hf_prefalign.trainer.estimate_latent_metric), so users keep the scale training left."
            )

    # ------------------------------------------------------------------
    # Planning
    # ------------------------------------------------------------------
    def _groups(self) -> list[tuple[PreferenceEmbeddingConfig, list[_User]]]:
        """Stacks of at most `users_per_batch` users sharing a config shape, users of similar pair counts together."""
        by_shape: dict[tuple, list[_User]] = defaultdict(list)
        for user in self.users:
            config = user.start.config if user.start is not None else self.embedding_config
            by_shape[(config.rank, config.logvar_min, config.logvar_max)].append(user)
        groups = []
        for (rank, low, high), members in by_shape.items():
            config = dataclasses.replace(self.embedding_config, rank=rank, logvar_min=low, logvar_max=high)
            members.sort(key=lambda user: (user.num_pairs, user.user_id))
            for start in range(0, len(members), self.users_per_batch):
                groups.append((config, members[start : start + self.users_per_batch]))
        return groups

    def _total_steps(self, num_pairs: int) -> int:
        per_epoch = math.ceil(num_pairs / self.args.per_device_train_batch_size)
        if self.args.max_steps > 0:
            return self.args.max_steps
        return math.ceil(self.args.num_train_epochs * per_epoch)

    def _latent_seed(self, row: int, epoch: int) -> int:
        # Kept: every stack that meets a (pair, epoch) draws the same latents for it
        if (row, epoch) not in self._latent_seeds:
            self._latent_seeds[row, epoch] = latent_seed(self.args.seed, self._pair_keys[row], epoch)
        return self._latent_seeds[row, epoch]

    def _batches(
        self, users: list[_User], width: int, steps: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows of the pair table for every user and step, `(C, T, width)`, the mask of real (unpadded) ones, and the
        epoch each user's step belongs to, `(C, T)`.

        User u's step t is batch `t % per_epoch` of epoch `t // per_epoch` of its own shuffle: one permutation per
        epoch, the ranks of uniform draws from the user's generator (`torch.rand((epochs, n)).argsort(-1, stable=True)`).
        Only the draws are per user; the ranks and the batches are computed for the whole stack at once.
        """
        batch = self.args.per_device_train_batch_size
        shuffle_seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        num, most_steps = len(users), max(steps, default=0)
        if most_steps == 0:
            return (
                torch.zeros(num, 0, width, dtype=torch.long),
                torch.zeros(num, 0, width, dtype=torch.bool),
                torch.zeros(num, 0, dtype=torch.long),
            )
        counts = torch.tensor([user.num_pairs for user in users])
        total = torch.tensor(steps)
        per_epoch = (counts + batch - 1).div(batch, rounding_mode="floor").clamp(min=1)
        epochs = (total + per_epoch - 1).div(per_epoch, rounding_mode="floor")
        # Each user's draws, padded past its pairs and epochs with 2 (above any draw): its own ranks come first
        draws = torch.full((num, int(epochs.max()), int(counts.max())), 2.0)
        own_rows = torch.zeros(num, draws.shape[-1], dtype=torch.long)
        for index, (user, count, num_epochs) in enumerate(zip(users, counts.tolist(), epochs.tolist(), strict=True)):
            own_rows[index, :count] = user.rows
            if num_epochs:
                generator = torch.Generator().manual_seed(user_seed(shuffle_seed, user.user_id, "shuffle"))
                draws[index, :num_epochs, :count] = torch.rand((num_epochs, count), generator=generator)
        order = draws.argsort(dim=-1, stable=True)  # (C, E, n): each epoch's permutation, then the padding
        step = torch.arange(most_steps).unsqueeze(0)  # (1, T)
        taken = step < total.unsqueeze(1)  # (C, T)
        epoch_of_step = torch.where(taken, step // per_epoch.unsqueeze(1), 0)
        position = (step % per_epoch.unsqueeze(1)).unsqueeze(-1) * batch + torch.arange(width)  # (C, T, width)
        mask = (position < counts.view(-1, 1, 1)) & taken.unsqueeze(-1)
        position = torch.where(mask, position, 0)
        ranks = order[torch.arange(num).view(-1, 1, 1), epoch_of_step.unsqueeze(-1), position]  # (C, T, width)
        rows = torch.where(mask, own_rows.gather(1, ranks.flatten(1)).view_as(ranks), 0)
        return rows, mask, epoch_of_step

    def _initial_parameters(self, config: PreferenceEmbeddingConfig, users: list[_User]) -> StackedPreferenceEmbedding:
        stack = StackedPreferenceEmbedding(config, len(users))
        generator = torch.Generator().manual_seed(self.args.seed)
        # What LatentDPOTrainer's `torch.manual_seed(seed); PreferenceEmbedding(...)` draws for `down`.
        down = torch.randn(config.feature_dim, config.rank, generator=generator) / math.sqrt(config.feature_dim)
        new = [index for index, user in enumerate(users) if user.start is None]
        with torch.no_grad():
            for index, user in enumerate(users):
                if user.start is not None:
                    for name in ("bias", "down", "up"):
                        getattr(stack, name)[index] = getattr(user.start, name).detach().float()
            if len(new) == len(users):  # a copy of one matrix into every row, no index
                stack.down.copy_(down.expand_as(stack.down))
            elif new:
                stack.down[new] = down
            if new and self.args.prior_init == "pairs":
                stack.bias[new] = constant_prior_bias(*self._pairs_mean_difference([users[i] for i in new]), config)
        return stack

    def _pairs_mean_difference(self, users: list[_User]) -> tuple[torch.Tensor, torch.Tensor]:
        """`pairs_mean_difference` of each user's pairs at once: `(U, Z)`, `(U, Z)` (segment sums over the rows)."""
        owner, rows = _stacked_rows(users)

        def precision_weighted(side: str) -> tuple[torch.Tensor, torch.Tensor]:
            mean, logvar = self.table[f"{side}_mean"][rows], self.table[f"{side}_logvar"][rows]  # (R, Z)
            precision = torch.exp(-logvar)
            total = torch.zeros(len(users), mean.shape[1]).index_add_(0, owner, precision)
            weights = precision / total[owner]
            user_mean = torch.zeros_like(total).index_add_(0, owner, weights * mean)
            spread = (mean - user_mean[owner]).pow(2)
            variance = torch.zeros_like(total).index_add_(0, owner, weights * (torch.exp(logvar) + spread))
            return user_mean, variance

        mean, variance = precision_weighted("chosen")
        return mean - precision_weighted("rejected")[0], variance

    # ------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------
    def train(self, on_stack_end: Callable[[dict[str, PreferenceEmbedding]], None] | None = None) -> PreferenceBank:
        """Train every user; returns a [`PreferenceBank`] holding them (also in `self.embeddings`).

        Args:
            on_stack_end (`Callable`, *optional*): called with each stack's finished users `{id: embedding}` before
                the next stack starts: how [`align_users`] writes users to a bank as they finish, so that a process
                that dies loses only the users it had not written yet.
        """
        start = time.perf_counter()
        groups = self._groups()
        total_pairs = sum(user.num_pairs for user in self.users)
        logger.info(
            f"Latent DPO for {len(self.users)} users ({total_pairs} user pairs over {len(self.table['features'])} "
            f"distinct pairs) in {len(groups)} stack(s) of up to {self.users_per_batch} users."
        )
        config = self.embedding_config
        bank = PreferenceBank(config.backbone_fingerprint, config.latent_dim, config.feature_dim)
        no_signal = 0
        with tqdm(
            total=len(self.users), desc="Latent DPO (many users)", unit="user", disable=bool(self.args.disable_tqdm)
        ) as progress:
            for group_config, users in groups:
                finished = dict(self._train_group(group_config, users))
                for user_id, embedding in finished.items():
                    no_signal += embedding.config.training["posterior_separation"] < 1e-3
                    self.embeddings[user_id] = embedding
                if on_stack_end is not None:
                    on_stack_end(finished)
                progress.update(len(users))
                progress.set_postfix(loss=f"{self.log_history[-1].get('loss', float('nan')):.4f}")
        for user_id in sorted(self.embeddings):
            bank.add(user_id, self.embeddings[user_id])
        if no_signal:
            logger.warning(
                f"Latent DPO finds no signal for {no_signal} user(s): the chosen and rejected responses of their pairs "
                "have the same posterior, so their priors will not move. The backbone's encoder looks untrained "
                "(train it with CLaPTrainer first), or those pairs' responses do not differ."
            )
        seconds = time.perf_counter() - start
        self.train_seconds = seconds
        logger.info(
            f"Aligned {len(self.users)} users in {seconds:.1f}s ({len(self.users) / max(seconds, 1e-9):.1f} users/s)."
        )
        return bank

    def _train_group(
        self, config: PreferenceEmbeddingConfig, users: list[_User]
    ) -> list[tuple[str, PreferenceEmbedding]]:
        args, device = self.args, self.device
        start = time.perf_counter()
        num = len(users)
        counts = [user.num_pairs for user in users]
        steps = [self._total_steps(count) for count in counts]
        width = min(args.per_device_train_batch_size, max(counts))
        rows, mask, epochs = self._batches(users, width, steps)
        total_steps = max(steps)
        stack = self._initial_parameters(config, users).to(device)
        table = {name: tensor.to(device) for name, tensor in self.table.items()}
        samples, latent_dim = args.num_latent_samples, config.latent_dim

        # Trainable parameters, each with AdamW's moments; `down` and `up` are fixed without a prompt-dependent part.
        trainable = ["bias"] + (["down", "up"] if args.prompt_dependent_prior else [])
        parameters = {name: getattr(stack, name) for name in ("bias", "down", "up")}
        for name, parameter in parameters.items():
            parameter.requires_grad_(name in trainable)
        moments = {
            name: (torch.zeros_like(parameters[name]), torch.zeros_like(parameters[name])) for name in trainable
        }
        # A prior whose `up` is zero and fixed has no prompt-dependent part: its matrix products are skipped.
        prompt_part = args.prompt_dependent_prior or bool(stack.up.detach().ne(0).any())
        scheduler = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
        total = torch.tensor(steps, dtype=torch.float64)
        warmup = torch.tensor([args.get_warmup_steps(s) for s in steps], dtype=torch.float64)
        updates = torch.zeros(num, dtype=torch.float64)  # AdamW step count of each user
        history = {
            key: torch.full((num, total_steps), float("nan"))
            for key in ("loss", "rewards/accuracy", "rewards/margin", "pairs/kept")
        }
        for step in range(total_steps):
            active = torch.tensor([step < s for s in steps])
            # Users whose steps are done sit out: the step runs on the A active ones
            selected = None if bool(active.all()) else active.nonzero().squeeze(1)
            batch_rows, batch_mask = _pick(rows[:, step], selected), _pick(mask[:, step], selected)  # (A, width)
            batch_epochs = _pick(epochs[:, step], selected)  # (A,)
            # The step's entries (user slot, position) and the distinct (pair, epoch) groups they visit: the latents
            # and kept latent pairs of a group are computed once, for every user who meets them.
            slot, position = batch_mask.nonzero(as_tuple=True)  # (E,) each
            visits = batch_rows[slot, position] * self._epoch_span + batch_epochs[slot]
            keys, group = torch.unique(visits, return_inverse=True)  # (G,), (E,)
            # Groups in order of their number of entries, so that `_grouped_loss` pads similar sizes together
            by_size = torch.sort(torch.bincount(group, minlength=len(keys)), stable=True).indices
            keys, group = keys[by_size], torch.argsort(by_size)[group]
            group_rows, group_epochs = keys // self._epoch_span, keys % self._epoch_span
            noise = torch.stack(
                [
                    torch.randn(
                        (3, samples, latent_dim),
                        generator=torch.Generator().manual_seed(self._latent_seed(int(row), int(epoch))),
                    )
                    for row, epoch in zip(group_rows.tolist(), group_epochs.tolist(), strict=True)
                ]
            ).to(device)  # (G, 3, M, Z)
            group_rows = group_rows.to(device)
            chosen = DiagonalGaussian(table["chosen_mean"][group_rows], table["chosen_logvar"][group_rows])
            rejected = DiagonalGaussian(table["rejected_mean"][group_rows], table["rejected_logvar"][group_rows])
            latents = torch.cat(
                [
                    noise[:, 0],
                    chosen.mean.unsqueeze(1) + chosen.std.unsqueeze(1) * noise[:, 1],
                    rejected.mean.unsqueeze(1) + rejected.std.unsqueeze(1) * noise[:, 2],
                ],
                dim=1,
            )  # (G, 3M, Z), as DiagonalGaussian.rsample draws them
            kept = kept_latent_pairs(latents, chosen, rejected, beta=args.beta, gap_quantile=args.gap_quantile)
            features = table["features"][batch_rows.to(device)] if prompt_part else None  # (A, width, F)
            prior = stacked_prior(
                *(_pick(parameters[name], selected) for name in ("bias", "down", "up")), features, config
            )  # (A, width or 1, Z)
            weights = prior_margin_weights(prior)  # (A, width or 1, 2Z)
            slot, group = slot.to(device), group.to(device)
            entry_weights = weights[slot, position.to(device) if prompt_part else 0]  # (E, 2Z)
            loss, metrics, gradient = _grouped_loss(kept, entry_weights, group, slot, len(batch_rows), args.beta)
            metrics["pairs/kept"] = metrics["pairs/kept"] / batch_mask.sum(-1).to(device).clamp(min=1)
            entry_weights.backward(gradient)  # each user's loss reaches only its own slice
            self._optimizer_step(parameters, moments, trainable, active.to(device), updates, scheduler, warmup, total)
            index = torch.arange(num) if selected is None else selected
            history["loss"][index, step] = loss.detach().float().cpu()
            for key in ("rewards/accuracy", "rewards/margin", "pairs/kept"):
                history[key][index, step] = metrics[key].float().cpu()

        seconds = time.perf_counter() - start
        summaries = self._summaries(users, steps, history)
        # The users' parameters are views of the trained stack (disjoint rows, so each is its own), not copies:
        # thousands of small copies cost more than the training steps of a stack.
        stack = stack.cpu().requires_grad_(False)
        departures = self._scale_to_target_kl(stack, users)
        finished = []
        with _cyclic_gc_paused():  # thousands of new objects and no cycles among them
            for index, user in enumerate(users):
                record: dict[str, Any] = {
                    "method": "latent-dpo",
                    "pairs": counts[index],
                    "steps": steps[index],
                    "epochs": args.num_train_epochs,
                    "beta": args.beta,
                    "learning_rate": args.learning_rate,
                    "num_latent_samples": args.num_latent_samples,
                    "gap_quantile": args.gap_quantile,
                    "prior_init": args.prior_init,
                    "prompt_dependent_prior": args.prompt_dependent_prior,
                    "train_seconds": round(seconds / num, 4),
                    "users_in_run": len(self.users),
                    **summaries[index],
                }
                if user.start is not None:
                    record["warm_start"] = True
                if departures is not None:
                    record.update(departures[index])
                finished.append((user.user_id, stack.embedding(index, record, copy=False)))
        ran = ~torch.isnan(history["loss"])
        self.log_history.append(
            {
                "users": num,
                "steps": total_steps,
                "seconds": round(seconds, 3),
                **{
                    key: float(values[ran].mean()) if bool(ran.any()) else float("nan")
                    for key, values in history.items()
                },
            }
        )
        logger.info(
            f"Stack of {num} users ({min(counts)}-{max(counts)} pairs, {total_steps} steps) in {seconds:.2f}s: "
            + ", ".join(
                f"{key} {value:.4f}" for key, value in self.log_history[-1].items() if "/" in key or key == "loss"
            )
        )
        return finished

    @torch.no_grad()
    def _scale_to_target_kl(self, stack: StackedPreferenceEmbedding, users: list[_User]) -> list[dict] | None:
        """`args.target_kl`: every user's mean scaled in place, as `LatentDPOTrainer` scales it (trainer/departure.py);
        returns each user's record, or `None` when there is nothing to apply."""
        target_kl, fisher = self.args.target_kl, self.latent_fisher
        if target_kl is None or fisher is None:
            return None
        latent_dim = stack.config.latent_dim
        if bool(stack.up.ne(0).any()):  # a prompt-dependent part: each user's mean over its own training prompts
            departure = torch.stack(
                [
                    quadratic_kl(stack.embedding(i, copy=False)(self.table["features"][user.rows]).mean, fisher).mean()
                    for i, user in enumerate(users)
                ]
            )
        else:  # the same z for every prompt
            departure = quadratic_kl(stack.bias[:, :latent_dim], fisher)  # (U,)
        scale = departure_scale(departure, target_kl)  # (U,), float64
        stack.bias[:, :latent_dim] *= scale.unsqueeze(1).to(stack.bias.dtype)
        stack.up[..., :latent_dim] *= scale.view(-1, 1, 1).to(stack.up.dtype)
        return [departure_record(target_kl, d, f) for d, f in zip(departure.tolist(), scale.tolist(), strict=True)]

    def _summaries(
        self, users: list[_User], steps: list[int], history: dict[str, torch.Tensor]
    ) -> list[dict[str, float]]:
        """Each user's `posterior_separation`, `final_loss` (mean loss over its steps) and `rewards/accuracy` over its
        first and last logging windows, computed for the whole stack at once (float64)."""
        num, width = history["loss"].shape
        total = torch.tensor(steps, dtype=torch.float64).unsqueeze(1)  # (U, 1)
        position = torch.arange(width, dtype=torch.float64).unsqueeze(0)  # (1, T)
        log_every = self.args.logging_steps
        window = (total * log_every).ceil() if log_every < 1 else torch.full_like(total, int(log_every))
        window = window.clamp(min=1).minimum(total)

        def mean_over(values: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> list[float]:
            # where, not a product: a NaN outside the mask (a step the user did not take) must not spread
            return (torch.where(mask, values.double(), 0.0).sum(1, keepdim=True) / count).squeeze(1).tolist()

        ran = position < total
        final_loss = mean_over(history["loss"], ran, total)
        accuracy = history["rewards/accuracy"]
        first = mean_over(accuracy, position < window, window)
        last = mean_over(accuracy, ran & (position >= total - window), window)
        owner, rows = _stacked_rows(users)
        separation = self._row_separation[rows].double()
        pairs = torch.tensor([user.num_pairs for user in users], dtype=torch.float64).clamp(min=1)
        separation = (torch.zeros(num, dtype=torch.float64).index_add_(0, owner, separation) / pairs).tolist()
        summaries = []
        for index in range(num):
            summary = {"posterior_separation": round(separation[index], 4)}
            if steps[index]:
                summary["final_loss"] = final_loss[index]
                summary["rewards_accuracy_first_log"] = round(first[index], 4)
                summary["rewards_accuracy_last_log"] = round(last[index], 4)
            summaries.append(summary)
        return summaries

    def _optimizer_step(
        self,
        parameters: dict[str, nn.Parameter],
        moments: dict[str, tuple[torch.Tensor, torch.Tensor]],
        trainable: list[str],
        active: torch.Tensor,
        updates: torch.Tensor,
        scheduler: str,
        warmup: torch.Tensor,
        total: torch.Tensor,
    ) -> None:
        """One AdamW step of every active user, with its own clipping, step count and learning rate (as
        `torch.optim.AdamW`, `clip_grad_norm_` and the `Trainer`'s schedule do it for one user)."""
        args = self.args
        with torch.no_grad():
            grads = {name: parameters[name].grad for name in trainable}
            if args.max_grad_norm is not None and args.max_grad_norm > 0:
                # clip_grad_norm_: the norm of the per-parameter norms, then a factor min(1, max / (norm + 1e-6)).
                norms = torch.stack([grads[name].flatten(1).norm(dim=1) for name in trainable], dim=1).norm(dim=1)
                factor = (args.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # (C,)
                for grad in grads.values():
                    grad.mul_(factor.view(-1, *[1] * (grad.dim() - 1)))
            active_cpu = active.cpu()
            lr = args.learning_rate * _lr_factor(scheduler, updates, warmup, total)  # (C,) float64
            updates += active_cpu.double()
            correction1 = 1 - args.adam_beta1 ** updates.clamp(min=1)
            correction2_sqrt = (1 - args.adam_beta2 ** updates.clamp(min=1)).sqrt()
            step_size = torch.where(active_cpu, lr / correction1, torch.zeros_like(lr))
            decay = torch.where(active_cpu, 1 - lr * args.weight_decay, torch.ones_like(lr))
            for name in trainable:
                parameter, grad = parameters[name], grads[name]
                exp_avg, exp_avg_sq = moments[name]
                shape = (-1, *[1] * (parameter.dim() - 1))
                on = active.view(shape)
                if args.weight_decay and name != "bias":  # the Trainer exempts parameters named "bias"
                    parameter.mul_(decay.to(parameter).view(shape))
                exp_avg.copy_(torch.where(on, exp_avg.lerp(grad, 1 - args.adam_beta1), exp_avg))
                updated_sq = torch.addcmul(exp_avg_sq * args.adam_beta2, grad, grad, value=1 - args.adam_beta2)
                exp_avg_sq.copy_(torch.where(on, updated_sq, exp_avg_sq))
                denom = (exp_avg_sq.sqrt() / correction2_sqrt.to(parameter).view(shape)).add_(args.adam_epsilon)
                parameter.sub_(step_size.to(parameter).view(shape) * exp_avg / denom)
                parameter.grad = None


# ----------------------------------------------------------------------
# From text
# ----------------------------------------------------------------------
def _read_users(datasets: Mapping[str, Dataset] | Dataset) -> tuple[dict[str, list[tuple[Any, str, str]]], int]:
    """Each user's usable pairs (identical chosen / rejected rows dropped) and the number of rows dropped."""
    pairs_by_user: dict[str, list[tuple[Any, str, str]]] = {}
    identical = 0
    if isinstance(datasets, Dataset):
        if USER_ID_COLUMN not in datasets.column_names:
            raise ValueError(
                f"A many-user preference dataset needs a `{USER_ID_COLUMN}` column naming each row's user; found "
                f"{datasets.column_names}. Add one, or pass a mapping {{user_id: dataset}} (one user: LatentDPOTrainer)."
            )
        ids = datasets.select_columns([USER_ID_COLUMN]).with_format(None)[:][USER_ID_COLUMN]  # a list, read at once
        for user_id in dict.fromkeys(ids):
            try:
                validate_preference_id(user_id)
            except ValueError as err:
                row = ids.index(user_id)
                raise ValueError(f"Row {row} of the dataset has `{USER_ID_COLUMN}` {user_id!r}: {err}") from None
            pairs_by_user[user_id] = []
        for user_id, pair in zip(ids, read_preference_pairs(datasets, "many-user"), strict=True):
            if pair is None:
                identical += 1
            else:
                pairs_by_user[user_id].append(pair)
    elif isinstance(datasets, Mapping):
        if not datasets:
            raise ValueError("No users given: pass {user_id: preference dataset} with at least one user.")
        for user_id, dataset in datasets.items():
            validate_preference_id(user_id)
            if not isinstance(dataset, Dataset):
                raise TypeError(
                    f"The pairs of user {user_id!r} must be a datasets.Dataset, got {type(dataset).__name__}."
                )
            pairs = read_preference_pairs(dataset, f"user {user_id!r}") if len(dataset) else []
            identical += sum(pair is None for pair in pairs)
            pairs_by_user[user_id] = [pair for pair in pairs if pair is not None]
    else:
        raise TypeError(
            "`datasets` must be a mapping {user_id: preference dataset} or one dataset with a "
            f"`{USER_ID_COLUMN}` column, got {type(datasets).__name__}."
        )
    return pairs_by_user, identical


def _encode_users(
    pairs_by_user: Mapping[str, list[tuple[Any, str, str]]], latent_cache: LatentCache
) -> tuple[dict[str, torch.Tensor], dict[str, list[int]], list[str]]:
    """The latent table of the distinct pairs (each encoded and stored once), every user's rows of it, and each
    row's key: a hash of its texts, which every process of a fan-out computes alike (the posteriors themselves may
    differ in their last bits between encoding batches)."""
    index: dict[tuple[str, str, str], int] = {}
    unique: list[tuple[Any, str, str]] = []
    rows: dict[str, list[int]] = {}
    for user_id, pairs in pairs_by_user.items():
        own = []
        for pair in pairs:
            prompt, good, bad = pair
            # Text prompts are keys as they are; chat prompts (lists of messages) through canonical JSON.
            key = pair if isinstance(prompt, str) else (json.dumps(prompt, sort_keys=True, default=str), good, bad)
            if key not in index:
                index[key] = len(unique)
                unique.append(pair)
            own.append(index[key])
        rows[user_id] = own
    if not unique:
        return {}, rows, []
    keys = [hashlib.sha256(json.dumps(list(key)).encode()).hexdigest()[:16] for key in index]
    prompts, chosen, rejected = (list(column) for column in zip(*unique, strict=True))
    return latent_cache.pair_latents(prompts, chosen, rejected), rows, keys


def _make_cache(model: PrefAlignForCausalLM, tokenizer: Any, args: LatentDPOConfig, cache: LatentCache | None):
    if cache is None:
        if tokenizer is None:
            raise ValueError("Encoding the pairs needs the backbone's tokenizer: pass `processing_class=tokenizer`.")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        directory = args.latent_cache_dir
        directory = None if directory == "none" else (directory or default_cache_dir() / "latent_cache")
        return LatentCache(model, tokenizer, directory, batch_size=args.encode_batch_size)
    fingerprint = model.fingerprint()
    if cache.fingerprint != fingerprint:
        raise ValueError(
            f"The latent cache was built for another backbone (fingerprint {cache.fingerprint[:12]}, this model's "
            f"is {fingerprint[:12]})."
        )
    return cache


def _embedding_config(model: PrefAlignForCausalLM, fingerprint: str, rank: int) -> PreferenceEmbeddingConfig:
    return PreferenceEmbeddingConfig(
        latent_dim=model.config.latent_dim,
        feature_dim=model.config.text_config.hidden_size,
        rank=rank,
        backbone_fingerprint=fingerprint,
        base_model=model.config.base_model_name_or_path,
        backbone=model.name_or_path or None,
    )


def align_users(
    model: PrefAlignForCausalLM,
    datasets: Mapping[str, Dataset] | Dataset,
    args: LatentDPOConfig | None = None,
    *,
    processing_class: PreTrainedTokenizerBase | None = None,
    latent_cache: LatentCache | None = None,
    preference_embeddings: Mapping[str, PreferenceEmbedding] | None = None,
    users_per_batch: int = DEFAULT_USERS_PER_BATCH,
    bank_directory: str | os.PathLike | None = None,
    num_shards: int | None = None,
    shard_index: int | None = None,
    users_per_shard: int = DEFAULT_USERS_PER_SHARD,
) -> PreferenceBank:
    r"""
    Align many users at once with Latent DPO: one [`PreferenceEmbedding`] per user, returned as a [`PreferenceBank`].

    The frozen encoder reads each distinct (prompt, chosen, rejected) once, through a [`LatentCache`] shared by
    every user; then [`MultiUserLatentDPOTrainer`] trains all users' priors together, each exactly as it would be
    trained alone (per-user epochs, random streams, optimizer state and clipping). The LM never runs.

    Across processes (see docs/preferences.md, "Across processes"): with `num_shards=n, shard_index=i`, this call
    aligns only the users whose id hashes to shard `i` of `n` (a split by id: every rerun splits the same way). With
    `bank_directory`, users are written to that sharded bank as they finish (each flush appends its own shard file
    under the bank's writer lock, so processes never write the same file), users already in the bank are skipped
    (a rerun after a crash finishes only what is missing), and a process launched with `accelerate launch` /
    `torchrun` takes its shard from `RANK` / `WORLD_SIZE` when `num_shards` is not given.

    Args:
        model (`PrefAlignForCausalLM`): the (CLaP-trained) backbone; it is not modified.
        datasets (`dict[str, datasets.Dataset]` or `datasets.Dataset`): TRL preference pairs (`prompt`, `chosen`,
            `rejected`; standard or conversational) per user id, or one dataset whose `user_id` column names each
            row's user. Ids are 1-128 letters, digits, '_', '-' or '.'. Rows whose chosen and rejected are identical
            are dropped; a user left with no pair is skipped, both with a counted warning.
        args (`LatentDPOConfig`, *optional*): the settings of every user (see [`MultiUserLatentDPOTrainer`] for
            those that cannot apply).
        processing_class (`PreTrainedTokenizerBase`, *optional*): the backbone's tokenizer (needed unless
            `latent_cache` is given).
        latent_cache (`LatentCache`, *optional*): a cache of this backbone to read and fill.
        preference_embeddings (`dict[str, PreferenceEmbedding]`, *optional*): users to continue (warm start).
        users_per_batch (`int`, *optional*, defaults to 4096): users trained together in one stack.
        bank_directory (`str` or `Path`, *optional*): a sharded bank (created if missing) to write the users to as
            they finish, and to resume from.
        num_shards (`int`, *optional*), shard_index (`int`, *optional*): this process's share of the users.
        users_per_shard (`int`, *optional*, defaults to 4096): users per bank shard file; a process that dies loses
            at most this many finished users (plus those of the stack it was training).

    Returns:
        `PreferenceBank`: the users this call aligned (with `bank_directory`, already saved there; users it
        skipped are not in it). Without `bank_directory`, `bank.save(directory)` writes them.

    Example:

    ```python
    >>> bank = align_users(model, {"alice": alice_pairs, "bob": bob_pairs}, config, processing_class=tokenizer)
    >>> bank.save("users")
    ```
    """
    from ..models.prefalign.modeling_prefalign import PrefAlignForCausalLM

    if not isinstance(model, PrefAlignForCausalLM):
        raise TypeError(f"align_users needs a trained PrefAlignForCausalLM backbone, got {type(model).__name__}.")
    args = args if args is not None else LatentDPOConfig(output_dir="latent-dpo-users")
    _check_config(args)
    if bank_directory is None:
        num_shards, shard_index = (1, 0) if num_shards is None and shard_index is None else (num_shards, shard_index)
    num_shards, shard_index = resolve_shard_spec(num_shards, shard_index)
    if not isinstance(users_per_shard, int) or isinstance(users_per_shard, bool) or users_per_shard < 1:
        raise ValueError(f"`users_per_shard` must be a positive integer, got {users_per_shard!r}.")
    pairs_by_user, identical = _read_users(datasets)
    if identical:
        logger.warning(f"Skipped {identical} row(s) whose chosen and rejected are identical.")
    if num_shards > 1:
        pairs_by_user = {u: pairs for u, pairs in pairs_by_user.items() if shard_of(u, num_shards) == shard_index}
        logger.info(f"Shard {shard_index} of {num_shards}: {len(pairs_by_user)} user(s).")
    cache = _make_cache(model, processing_class, args, latent_cache)
    if bank_directory is None:
        return _align_encoded(model, pairs_by_user, args, cache, preference_embeddings, users_per_batch)
    directory = Path(bank_directory)
    empty = PreferenceBank(cache.fingerprint, model.config.latent_dim, model.config.text_config.hidden_size)
    with _claim_shard(directory, num_shards, shard_index):
        done = _bank_ids(directory, empty)
        present = [u for u in pairs_by_user if u in done]
        if present:
            logger.warning(
                f"Skipped {len(present)} user(s) already in the bank at {directory} (a rerun aligns only the missing "
                "ones; align users again into another directory, or continue them with update_user)."
            )
        todo = {u: pairs for u, pairs in pairs_by_user.items() if u not in done}
        if not any(todo.values()):
            logger.info(f"Nothing left to align for shard {shard_index} of {num_shards} in {directory}.")
            return empty
        starts = {u: e for u, e in (preference_embeddings or {}).items() if u in todo}
        writer = _BankWriter(directory, empty, users_per_shard)
        bank = _align_encoded(model, todo, args, cache, starts, users_per_batch, on_stack_end=writer.add)
        writer.flush()
    return bank


@contextlib.contextmanager
def _claim_shard(directory: Path, num_shards: int, shard_index: int) -> Iterator[None]:
    """Hold `align-<i>-of-<n>.lock` in the bank folder for the run: one process per shard of one split."""
    if directory.is_file():
        raise ValueError(f"`bank_directory` {directory} must be a directory, not a file.")
    directory.mkdir(parents=True, exist_ok=True)
    for entry in directory.iterdir():
        claim = _CLAIM.fullmatch(entry.name)
        if claim and int(claim.group(2)) != num_shards and lock_is_live(entry):
            raise ValueError(
                f"Another process is aligning shard {int(claim.group(1))} of {int(claim.group(2))} into the bank at "
                f"{directory} ({entry} exists), but this one was given num_shards={num_shards}: every process of a "
                "run must split the users the same way. Use the same num_shards (or WORLD_SIZE) for all of them."
            )
    tag = shard_tag(num_shards, shard_index)
    with writer_lock(
        directory,
        name=f"align-{tag}.lock",
        what=f"Another process is aligning shard {shard_index} of {num_shards} into the bank",
    ):
        yield


def _bank_ids(directory: Path, bank: PreferenceBank) -> set[str]:
    """The users already in the sharded bank at `directory` (none if there is no bank yet), after checking that the
    bank is sharded, of this backbone and sizes, and that every shard it lists is there with its recorded size."""
    if not (directory / BANK_INDEX).is_file():
        return set()
    index = read_bank_index(directory)
    if not is_sharded_index(index):
        raise ValueError(
            f"The bank at {directory} uses the 'folders' layout; align_users writes to a sharded bank (choose another "
            "`bank_directory`, or convert it: `bank.load(old); bank.save(new, layout='sharded')`)."
        )
    bank._check_saved_backbone(directory, index)
    check_shard_files(resolve_directory(directory), index["shards"])
    return set(index["preference_ids"])


class _BankWriter:
    """Buffers finished users and appends them to a sharded bank every `users_per_shard` users."""

    def __init__(self, directory: Path, bank: PreferenceBank, users_per_shard: int):
        self.directory, self.users_per_shard = directory, users_per_shard
        self.fingerprint, self.sizes = bank.fingerprint, (bank.latent_dim, bank.feature_dim)
        self.pending: dict[str, PreferenceEmbedding] = {}
        self.written = 0

    def add(self, users: dict[str, PreferenceEmbedding]) -> None:
        self.pending.update(users)
        while len(self.pending) >= self.users_per_shard:
            ids = list(self.pending)[: self.users_per_shard]
            self._write({u: self.pending.pop(u) for u in ids})

    def flush(self) -> None:
        if self.pending:
            self._write(self.pending)
            self.pending = {}

    def _write(self, users: dict[str, PreferenceEmbedding]) -> None:
        bank = PreferenceBank(self.fingerprint, *self.sizes)
        for user_id in sorted(users):
            bank.add(user_id, users[user_id])
        deadline = time.monotonic() + BANK_WAIT_S
        while True:  # another process of the run may be appending its users: appends are short, wait for it
            try:
                bank.save(self.directory, layout="sharded", users_per_shard=self.users_per_shard)
                break
            except BankLockedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.written += len(users)


def _align_encoded(
    model: PrefAlignForCausalLM,
    pairs_by_user: Mapping[str, list[tuple[Any, str, str]]],
    args: LatentDPOConfig,
    cache: LatentCache,
    preference_embeddings: Mapping[str, PreferenceEmbedding] | None,
    users_per_batch: int,
    on_stack_end: Callable[[dict[str, PreferenceEmbedding]], None] | None = None,
) -> PreferenceBank:
    """Encode the distinct pairs through `cache` (already checked against `model`) and train every user."""
    was_training = model.training
    model.eval()
    try:
        table, rows, keys = _encode_users(pairs_by_user, cache)
    finally:
        model.train(was_training)
    if not table:
        raise ValueError(f"No user has a usable pair ({len(rows)} user(s), all rows empty or chosen == rejected).")
    trainer = MultiUserLatentDPOTrainer(
        args,
        table,
        rows,
        _embedding_config(model, cache.fingerprint, args.prior_rank),
        preference_embeddings=preference_embeddings,
        users_per_batch=users_per_batch,
        pair_keys=keys,
        latent_fisher=model.latent_fisher,
    )
    return trainer.train(on_stack_end=on_stack_end)


# ----------------------------------------------------------------------
# Online update of one user of a saved bank
# ----------------------------------------------------------------------
def update_user(
    model: PrefAlignForCausalLM,
    bank_directory: str | Path,
    preference_id: str,
    pairs: Dataset,
    args: LatentDPOConfig | None = None,
    *,
    processing_class: PreTrainedTokenizerBase | None = None,
    latent_cache: LatentCache | None = None,
) -> PreferenceEmbedding:
    r"""
    Continue one user of a saved bank with new preference pairs, and write it back without touching the others.

    The user's embedding is read from `bank_directory/<preference_id>`, trained for `args` (a warm start: its
    weights, a fresh optimizer state; a few steps, e.g. `max_steps=5`, suit an online update) on `pairs` only, and
    saved in place with [`PreferenceBank.save_user`]: its folder is replaced atomically under the bank's lock, and
    no other user's files are read, rewritten or re-linked. Its `config.training` records the new run plus `updates`
    (how many updates it has had) and `total_pairs` (pairs over its whole history).

    Args:
        model (`PrefAlignForCausalLM`): the backbone the bank belongs to.
        bank_directory (`str` or `Path`): a bank saved with [`PreferenceBank.save`].
        preference_id (`str`): the user to update; it must be in the bank.
        pairs (`datasets.Dataset`): the new TRL preference pairs.
        args (`LatentDPOConfig`, *optional*): the settings (`prior_init` does not apply: the user is continued).
        processing_class, latent_cache: as in [`align_users`].

    Returns:
        `PreferenceEmbedding`: the updated user, as saved.
    """
    validate_preference_id(preference_id)
    bank_directory = Path(bank_directory)
    args = args if args is not None else LatentDPOConfig(output_dir="latent-dpo-update")
    _check_config(args)
    index = read_bank_index(bank_directory)
    known = index.get("preference_ids", [])
    if preference_id not in known:
        raise KeyError(
            f"User {preference_id!r} is not in the bank at {bank_directory} ({len(known)} user(s)); align a new "
            "user with align_users (or add it with PreferenceBank.save_user)."
        )
    cache = _make_cache(model, processing_class, args, latent_cache)
    if index.get("fingerprint") != cache.fingerprint:
        raise ValueError(
            f"The bank at {bank_directory} was built for another backbone (fingerprint "
            f"{str(index.get('fingerprint'))[:12]}, this model's is {cache.fingerprint[:12]})."
        )
    if index.get("layout") == "sharded":  # the user's row of its shard
        reader = PreferenceBank(cache.fingerprint, index["latent_dim"], index["feature_dim"])
        reader.load(bank_directory)
        previous = reader.get(preference_id)
    else:
        previous = PreferenceEmbedding.from_pretrained(bank_directory / preference_id)
    history = dict(previous.config.training)
    pairs_by_user, identical = _read_users({preference_id: pairs})
    if identical:
        logger.warning(f"Skipped {identical} new row(s) whose chosen and rejected are identical.")
    bank = _align_encoded(model, pairs_by_user, args, cache, {preference_id: previous}, users_per_batch=1)
    updated = bank.get(preference_id)
    record = updated.config.training
    record["updates"] = int(history.get("updates", 0)) + 1
    record["total_pairs"] = int(history.get("total_pairs", history.get("pairs", 0))) + record["pairs"]
    bank.save_user(bank_directory, preference_id)
    return updated


__all__ = [
    "MultiUserLatentDPOTrainer",
    "StackedPreferenceEmbedding",
    "align_users",
    "update_user",
    "user_seed",
]
