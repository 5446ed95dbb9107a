"""Many users in one run: the batched loss, the stacked priors, per-user equality with training alone, the bank
they are written to, and online updates of one saved user."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import re
import runpy
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from helpers import LATENT_DIM, make_tiny_pool, random_words, run_in_forked_child
from transformers import get_scheduler

from hf_prefalign import (
    LatentCache,
    LatentDPOConfig,
    LatentDPOTrainer,
    MultiUserLatentDPOTrainer,
    PrefAlignForCausalLM,
    PreferenceBank,
    PreferenceEmbedding,
    PreferenceEmbeddingConfig,
    StackedPreferenceEmbedding,
    align_users,
    update_user,
)
from hf_prefalign.distributions import DiagonalGaussian
from hf_prefalign.models.prefalign.latent_metric import quadratic_kl
from hf_prefalign.preference.personalisation import pairs_mean_difference, set_constant_prior
from hf_prefalign.testing import make_tiny_base, make_tiny_tokenizer
from hf_prefalign.trainer.departure import scale_to_target_kl
from hf_prefalign.trainer.latent_dpo_loss import kept_latent_pairs, latent_dpo_loss, prior_margin_weights
from hf_prefalign.trainer.many_users import latent_seed, table_pair_keys, user_seed
from hf_prefalign.utils.sharding import shard_of


torch.set_num_threads(1)

FEATURES, LATENT = 12, 4


# ----------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------
def _table(rows: int = 40, seed: int = 0) -> dict[str, torch.Tensor]:
    """Latent columns of `rows` pairs whose chosen posteriors sit apart from the rejected ones."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=generator)

    return {
        "features": normal(rows, FEATURES),
        "chosen_mean": normal(rows, LATENT) + 1.0,
        "chosen_logvar": normal(rows, LATENT, scale=0.3) - 1.0,
        "rejected_mean": normal(rows, LATENT) - 1.0,
        "rejected_logvar": normal(rows, LATENT, scale=0.3) - 1.0,
    }


EMBEDDING_CONFIG = PreferenceEmbeddingConfig(latent_dim=LATENT, feature_dim=FEATURES, backbone_fingerprint="f" * 64)
# Different pair counts: 1, 2 and 3 batches per epoch, the last one partial; rows shared between users.
USERS = {"carol": list(range(5)), "alice": list(range(3, 15)), "bob": list(range(10, 31))}


def _config(tmp_path, **overrides) -> LatentDPOConfig:
    defaults = {
        "output_dir": str(tmp_path / "many"),
        "disable_tqdm": True,
        "report_to": [],
        "use_cpu": True,
        "latent_cache_dir": "none",
        "per_device_train_batch_size": 8,
        "num_train_epochs": 2.5,
        "num_latent_samples": 4,
        "learning_rate": 0.05,
        "seed": 3,
    }
    return LatentDPOConfig(**{**defaults, **overrides})


def _train_alone(args: LatentDPOConfig, table, user_id: str, rows: list[int]) -> PreferenceEmbedding:
    """One user trained the way the Trainer trains it, from standard pieces (a PreferenceEmbedding, torch's AdamW
    with the Trainer's no-decay rule for `bias`, clip_grad_norm_, transformers' schedule, the unbatched loss), with
    the random streams that many-user training documents."""
    torch.manual_seed(args.seed)
    embedding = PreferenceEmbedding(dataclasses.replace(EMBEDDING_CONFIG, rank=args.prior_rank))
    index = torch.tensor(rows)
    if args.prior_init == "pairs":
        chosen = DiagonalGaussian(table["chosen_mean"][index], table["chosen_logvar"][index])
        rejected = DiagonalGaussian(table["rejected_mean"][index], table["rejected_logvar"][index])
        set_constant_prior(embedding, *pairs_mean_difference(chosen, rejected))
    for parameter in (embedding.down, embedding.up):
        parameter.requires_grad_(args.prompt_dependent_prior)
    decayed = [p for name, p in embedding.named_parameters() if p.requires_grad and name != "bias"]
    groups = [{"params": [embedding.bias], "weight_decay": 0.0}]
    groups += [{"params": decayed, "weight_decay": args.weight_decay}] if decayed else []
    optimizer = torch.optim.AdamW(
        groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, foreach=False
    )
    batch = args.per_device_train_batch_size
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * math.ceil(len(rows) / batch))
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(total), num_training_steps=total
    )
    shuffle = torch.Generator().manual_seed(user_seed(args.seed, user_id, "shuffle"))
    keys = table_pair_keys(table)
    samples, step, epoch = args.num_latent_samples, 0, 0
    epochs = math.ceil(total / math.ceil(len(rows) / batch))
    permutations = torch.rand((epochs, len(rows)), generator=shuffle).argsort(dim=-1, stable=True)
    while step < total:
        order = index[permutations[epoch]]
        for start in range(0, len(rows), batch):
            if step == total:
                break
            pairs = order[start : start + batch]
            chosen = DiagonalGaussian(table["chosen_mean"][pairs], table["chosen_logvar"][pairs])
            rejected = DiagonalGaussian(table["rejected_mean"][pairs], table["rejected_logvar"][pairs])
            # Each pair's latents from its own stream for this epoch, shared by every user who meets it then.
            draws = torch.stack(
                [
                    torch.randn(
                        (3, samples, LATENT),
                        generator=torch.Generator().manual_seed(latent_seed(args.seed, keys[int(row)], epoch)),
                    )
                    for row in pairs
                ],
                dim=2,
            )  # (3, M, B, Z)
            latents = torch.cat(
                [draws[0], chosen.mean + chosen.std * draws[1], rejected.mean + rejected.std * draws[2]]
            )
            loss, _ = latent_dpo_loss(
                embedding(table["features"][pairs]),
                chosen,
                rejected,
                beta=args.beta,
                gap_quantile=args.gap_quantile,
                latents=latents,
            )
            loss.backward()
            if args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(
                    [p for p in embedding.parameters() if p.requires_grad], args.max_grad_norm
                )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
        epoch += 1
    return embedding


def _assert_same_embedding(found: PreferenceEmbedding, expected: PreferenceEmbedding, name: str = "") -> None:
    for key in ("bias", "down", "up"):
        torch.testing.assert_close(
            getattr(found, key).detach(), getattr(expected, key).detach(), rtol=1e-4, atol=2e-6, msg=f"{name}.{key}"
        )


def _backbone(noise_seed: int = 0) -> PrefAlignForCausalLM:
    """A tiny Qwen2 backbone whose latent modules are perturbed, so responses get different posteriors."""
    model = PrefAlignForCausalLM.from_base(make_tiny_base("qwen2"), latent_dim=LATENT_DIM).eval()
    generator = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for p in model.latent_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def _text_pairs(num: int, seed: int, swap: bool = False) -> list[dict[str, str]]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num):
        prompt = random_words(generator)
        good, bad = "w10 w11 w12 " + random_words(generator), "w50 w51 " + random_words(generator)
        rows.append({"prompt": prompt, "chosen": bad if swap else good, "rejected": good if swap else bad})
    return rows


def _user_datasets() -> dict[str, Dataset]:
    shared = _text_pairs(6, seed=1)
    return {
        "alice": Dataset.from_list(shared + _text_pairs(10, seed=2)),
        "bob": Dataset.from_list(_text_pairs(7, seed=3, swap=True)),
        "carol.v2": Dataset.from_list(shared),  # only pairs alice has too
    }


def _count_calls(modules, skip=()) -> tuple[list[int], list]:
    calls: list[int] = []
    handles = [
        sub.register_forward_hook(lambda *_: calls.append(1))
        for module in modules
        for sub in module.modules()
        if not any(sub is s for s in skip)
    ]
    return calls, handles


@pytest.fixture(scope="module")
def world():
    """A backbone, its tokenizer and a latent cache holding every pair of `_user_datasets()`."""
    model, tokenizer = _backbone(), make_tiny_tokenizer()
    cache = LatentCache(model, tokenizer)
    for dataset in _user_datasets().values():
        cache.encode_pairs(dataset)
    return model, tokenizer, cache


# ----------------------------------------------------------------------
# The loss over a leading user dimension
# ----------------------------------------------------------------------
def _random_problem(users: int, pairs: int, samples: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def gaussian(scale: float = 0.3) -> DiagonalGaussian:
        shape = (users, pairs, LATENT)
        return DiagonalGaussian(
            torch.randn(shape, generator=generator), scale * torch.randn(shape, generator=generator)
        )

    chosen, rejected = gaussian(), gaussian()
    mean = torch.randn(users, pairs, LATENT, generator=generator).requires_grad_()
    logvar = (0.2 * torch.randn(users, pairs, LATENT, generator=generator)).requires_grad_()
    latents = torch.randn(3 * samples, users, pairs, LATENT, generator=generator)
    return chosen, rejected, mean, logvar, latents


def _ordered_pair_loss(prior, chosen, rejected, beta, latents, quantile):
    """The Latent DPO loss as first written: every ordered latent pair and `torch.quantile` over all of them."""
    reward = torch.sigmoid(chosen.log_prob(latents) - rejected.log_prob(latents))  # (3M, B)
    gaps = reward.unsqueeze(1) - reward.unsqueeze(0)
    off_diagonal = ~torch.eye(latents.shape[0], dtype=torch.bool)
    threshold = torch.quantile(gaps[off_diagonal], quantile, dim=0)
    keep = ((gaps >= threshold) & (gaps > 0) & off_diagonal.unsqueeze(-1)).float()
    reference = DiagonalGaussian.standard_normal(tuple(prior.mean.shape))
    rho = prior.log_prob(latents) - reference.log_prob(latents)
    margins = rho.unsqueeze(1) - rho.unsqueeze(0)
    count = keep.sum().clamp(min=1.0)
    loss = (-F.logsigmoid(beta * margins) * keep).sum() / count
    return loss, keep.sum() / chosen.mean.shape[0], ((margins > 0).float() * keep).sum() / count


@pytest.mark.parametrize("samples", [4, 5])  # 3M even and odd: both enumerations of the unordered latent pairs
@pytest.mark.parametrize("quantile", [0.0, 0.5, 0.75, 0.9])
def test_loss_matches_the_ordered_pair_formulation(samples, quantile):
    chosen, rejected, mean, logvar, latents = _random_problem(1, 6, samples)
    squeeze = lambda g: DiagonalGaussian(g.mean[0], g.logvar[0])  # noqa: E731
    loss, metrics = latent_dpo_loss(
        DiagonalGaussian(mean[0], logvar[0]), squeeze(chosen), squeeze(rejected), beta=0.7,
        gap_quantile=quantile, latents=latents[:, 0],
    )  # fmt: skip
    expected, kept, accuracy = _ordered_pair_loss(
        DiagonalGaussian(mean[0], logvar[0]), squeeze(chosen), squeeze(rejected), 0.7, latents[:, 0], quantile
    )
    assert metrics["pairs/kept"].item() == kept.item() > 0, "the same latent pairs must be kept"
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["rewards/accuracy"], accuracy)
    found_grads = torch.autograd.grad(loss, [mean, logvar])
    expected_grads = torch.autograd.grad(expected, [mean, logvar])
    for found, wanted in zip(found_grads, expected_grads, strict=True):
        torch.testing.assert_close(found, wanted, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("samples", [4, 5])
@pytest.mark.parametrize("quantile", [0.0, 0.75])
def test_kept_latent_pairs_give_the_loss_as_one_product(samples, quantile):
    """The kept pairs' margin features times a prior's weights are the loss's margins: same loss, kept count, grads."""
    chosen, rejected, mean, logvar, latents = _random_problem(1, 6, samples)
    squeeze = lambda g: DiagonalGaussian(g.mean[0], g.logvar[0])  # noqa: E731
    prior = DiagonalGaussian(mean[0], logvar[0])
    loss, metrics = latent_dpo_loss(
        prior, squeeze(chosen), squeeze(rejected), beta=0.7, gap_quantile=quantile, latents=latents[:, 0]
    )
    kept = kept_latent_pairs(
        latents[:, 0].movedim(0, 1), squeeze(chosen), squeeze(rejected), beta=0.7, gap_quantile=quantile
    )
    assert int(kept.count.sum()) == int(kept.mask.sum()) == round(metrics["pairs/kept"].item() * 6) > 0
    margins = (kept.features() * prior_margin_weights(prior).unsqueeze(1)).sum(-1)  # (B, k)
    found = (F.softplus(margins) * kept.mask).sum() / kept.count.sum()
    torch.testing.assert_close(found, loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(
        torch.autograd.grad(found, [mean, logvar]), torch.autograd.grad(loss, [mean, logvar]), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 300.0], ids=["moderate", "underflowing"])
@pytest.mark.parametrize("features_from", [1, 10**9], ids=["pair-features", "gathered-rho"])
def test_grouped_loss_is_the_softplus_of_every_margin(monkeypatch, scale, features_from):
    """The batched loss (softplus from the slopes' logs, four slopes to a log) and its written-out gradient equal
    softplus and autograd in float64, also for margins far below -88, where a slope underflows to 0."""
    import hf_prefalign.trainer.many_users as many_users

    monkeypatch.setattr(many_users, "_FEATURES_FROM", features_from)
    monkeypatch.setattr(many_users, "_CHUNK_ELEMENTS", 64)  # several chunks, groups of different widths in each
    chosen, rejected, _, _, latents = _random_problem(1, 6, 5, seed=3)
    squeeze = lambda g: DiagonalGaussian(g.mean[0], g.logvar[0])  # noqa: E731
    kept = kept_latent_pairs(latents[:, 0].movedim(0, 1), squeeze(chosen), squeeze(rejected), beta=0.7)
    group = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5])  # entries per group: 2, 1, 3, 1, 1, 2
    slot = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    weights = scale * torch.randn(len(group), 2 * LATENT, generator=torch.Generator().manual_seed(4))
    loss, metrics, gradient = many_users._grouped_loss(kept, weights, group, slot, 3, beta=0.7)

    reference_weights = weights.double().requires_grad_()
    margins = (kept.features().double()[group] * reference_weights.unsqueeze(1)).sum(-1)  # (E, k)
    mask = kept.mask[group]
    count = torch.zeros(3, dtype=torch.float64).index_add_(0, slot, kept.count[group].double())
    expected = torch.zeros(3, dtype=torch.float64).index_add(0, slot, (F.softplus(margins) * mask).sum(-1)) / count
    expected.sum().backward()
    if scale > 1:
        assert float(margins.detach()[mask].min()) < -100, "the case must reach margins where sigmoid underflows"
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gradient.double(), reference_weights.grad, rtol=1e-4, atol=1e-6)
    negatives = torch.zeros(3, dtype=torch.float64).index_add(0, slot, ((margins < 0) & mask).sum(-1).double())
    torch.testing.assert_close(metrics["rewards/accuracy"].double(), negatives / count)


def test_loss_over_users_equals_each_users_loss_alone():
    users, pairs, samples = 3, 5, 4
    chosen, rejected, mean, logvar, latents = _random_problem(users, pairs, samples, seed=1)
    mask = torch.ones(users, pairs, dtype=torch.bool)
    mask[0, 3:] = False  # user 0 has 3 pairs, user 1 has 4: the rest is padding
    mask[1, 4:] = False
    loss, metrics = latent_dpo_loss(
        DiagonalGaussian(mean, logvar), chosen, rejected, beta=0.5, latents=latents, pair_mask=mask
    )
    assert loss.shape == metrics["rewards/accuracy"].shape == (users,)
    loss.sum().backward()
    for user in range(users):
        real = int(mask[user].sum())
        own_mean = mean.detach()[user, :real].clone().requires_grad_()
        alone, alone_metrics = latent_dpo_loss(
            DiagonalGaussian(own_mean, logvar.detach()[user, :real]),
            DiagonalGaussian(chosen.mean[user, :real], chosen.logvar[user, :real]),
            DiagonalGaussian(rejected.mean[user, :real], rejected.logvar[user, :real]),
            beta=0.5,
            latents=latents[:, user, :real],
        )
        alone.backward()
        torch.testing.assert_close(loss[user], alone)
        for key, value in alone_metrics.items():
            torch.testing.assert_close(metrics[key][user], value, msg=key)
        torch.testing.assert_close(mean.grad[user, :real], own_mean.grad, msg=f"user {user}'s gradient")
        assert (mean.grad[user, real:] == 0).all(), "padding pairs must not move a user"


def test_stacked_priors_compute_each_users_own_prior():
    embeddings = []
    for seed in range(3):
        torch.manual_seed(seed)
        embedding = PreferenceEmbedding(EMBEDDING_CONFIG)
        with torch.no_grad():
            embedding.bias.normal_()
            embedding.up.normal_()
        embeddings.append(embedding)
    stack = StackedPreferenceEmbedding.from_embeddings(embeddings)
    assert len(stack) == 3 and stack.down.shape == (3, FEATURES, EMBEDDING_CONFIG.rank)
    features = torch.randn(3, 5, FEATURES)
    prior = stack(features)
    for user, embedding in enumerate(embeddings):
        own = embedding(features[user])
        torch.testing.assert_close(prior.mean[user], own.mean)
        torch.testing.assert_close(prior.logvar[user], own.logvar)
        _assert_same_embedding(stack.embedding(user), embedding)
    other = PreferenceEmbedding(dataclasses.replace(EMBEDDING_CONFIG, rank=2))
    with pytest.raises(ValueError, match="same shape"):
        StackedPreferenceEmbedding.from_embeddings([embeddings[0], other])


# ----------------------------------------------------------------------
# Each user trained as it would be alone
# ----------------------------------------------------------------------
SETTINGS = {
    "linear-warmup-decay-clip": {"warmup_steps": 2, "weight_decay": 0.1, "max_grad_norm": 0.05},
    "pairs-constant-cosine": {
        "prior_init": "pairs",
        "prompt_dependent_prior": False,
        "lr_scheduler_type": "cosine",
        "max_steps": 4,
        "beta": 0.5,
    },
    "constant-with-warmup": {"lr_scheduler_type": "constant_with_warmup", "warmup_steps": 0.5, "gap_quantile": 0.5},
}


@pytest.mark.parametrize("users_per_batch", [3, 2])
@pytest.mark.parametrize("settings", list(SETTINGS), ids=list(SETTINGS))
def test_batched_training_equals_training_each_user_alone(tmp_path, settings, users_per_batch):
    args = _config(tmp_path, **SETTINGS[settings])
    table = _table()
    trainer = MultiUserLatentDPOTrainer(args, table, USERS, EMBEDDING_CONFIG, users_per_batch=users_per_batch)
    bank = trainer.train()
    assert bank.ids() == sorted(USERS)
    steps = {user: bank.get(user).config.training["steps"] for user in USERS}
    if args.max_steps > 0:
        assert set(steps.values()) == {args.max_steps}
    else:  # per-user epochs: ceil(2.5 * batches per epoch)
        assert steps == {"carol": 3, "alice": 5, "bob": 8}
    untrained = _config(tmp_path, **{**SETTINGS[settings], "learning_rate": 0.0})
    for user, rows in USERS.items():
        alone = _train_alone(args, table, user, rows)
        trained = bank.get(user)
        _assert_same_embedding(trained, alone, user)
        start = _train_alone(untrained, table, user, rows)
        assert (trained.bias - start.bias).abs().max() > 1e-2, f"{user} did not train"
    if not args.prompt_dependent_prior:
        for user in USERS:
            assert torch.count_nonzero(bank.get(user).up) == 0


@pytest.mark.parametrize("chunk_elements", [1, 1 << 18], ids=["group-per-chunk", "one-chunk"])
@pytest.mark.parametrize("features_from", [1, 10**9], ids=["pair-features", "gathered-rho"])
def test_both_margin_paths_train_each_user_as_alone(tmp_path, monkeypatch, features_from, chunk_elements):
    """Groups with many entries take their margins from per-pair features, groups with few from each latent's rho,
    a chunk of groups at a time: every way gives every user its training alone."""
    import hf_prefalign.trainer.many_users as many_users

    monkeypatch.setattr(many_users, "_FEATURES_FROM", features_from)
    monkeypatch.setattr(many_users, "_CHUNK_ELEMENTS", chunk_elements)
    args, table = _config(tmp_path, **SETTINGS["linear-warmup-decay-clip"]), _table()
    bank = MultiUserLatentDPOTrainer(args, table, USERS, EMBEDDING_CONFIG).train()
    for user, rows in USERS.items():
        _assert_same_embedding(bank.get(user), _train_alone(args, table, user, rows), user)


@pytest.mark.parametrize("prompt_dependent", [False, True])
def test_target_kl_scales_every_user_as_alone(tmp_path, prompt_dependent):
    """With `target_kl` and a latent metric, each user's mean is the untargeted one scaled to that departure, as
    LatentDPOTrainer scales a user trained alone (trainer/departure.py)."""
    table = _table()
    root = torch.randn(LATENT, LATENT, generator=torch.Generator().manual_seed(7))
    fisher = root @ root.T / LATENT  # any positive definite metric
    free_args = _config(tmp_path, prompt_dependent_prior=prompt_dependent)
    args = _config(tmp_path, prompt_dependent_prior=prompt_dependent, target_kl=0.02)
    free = MultiUserLatentDPOTrainer(free_args, table, USERS, EMBEDDING_CONFIG).train()
    scaled = MultiUserLatentDPOTrainer(args, table, USERS, EMBEDDING_CONFIG, latent_fisher=fisher).train()
    for user, rows in USERS.items():
        alone = _train_alone(free_args, table, user, rows)
        record = scale_to_target_kl(alone, fisher, 0.02, table["features"][rows])
        _assert_same_embedding(scaled.get(user), alone, user)
        training = scaled.get(user).config.training
        assert training["departure_scale"] == pytest.approx(record["departure_scale"], rel=1e-4)
        assert training["target_kl"] == 0.02 and record["departure_scale"] != pytest.approx(1.0)
        with torch.no_grad():
            means = scaled.get(user)(table["features"][rows]).mean
        assert float(quadratic_kl(means, fisher).mean()) == pytest.approx(0.02, rel=1e-4)
        torch.testing.assert_close(
            means,
            record["departure_scale"] * free.get(user)(table["features"][rows]).mean.detach(),
            rtol=1e-4,
            atol=1e-6,
        )
    with pytest.raises(ValueError, match="latent_fisher"):
        MultiUserLatentDPOTrainer(args, table, USERS, EMBEDDING_CONFIG, latent_fisher=torch.eye(LATENT + 1))


def test_a_users_embedding_does_not_depend_on_the_other_users(tmp_path):
    args, table = _config(tmp_path), _table()
    together = MultiUserLatentDPOTrainer(args, table, USERS, EMBEDDING_CONFIG).train()
    alone = MultiUserLatentDPOTrainer(args, table, {"bob": USERS["bob"]}, EMBEDDING_CONFIG).train()
    _assert_same_embedding(together.get("bob"), alone.get("bob"), "bob")
    renamed = MultiUserLatentDPOTrainer(args, table, {"robert": USERS["bob"]}, EMBEDDING_CONFIG).train()
    assert not torch.equal(renamed.get("robert").bias, alone.get("bob").bias), "the shuffle is seeded by the user id"


def test_continued_users_start_from_their_embedding(tmp_path):
    args, table = _config(tmp_path, max_steps=1, learning_rate=0.0), _table()
    start = PreferenceEmbedding(EMBEDDING_CONFIG)
    with torch.no_grad():
        start.bias.fill_(0.25)
    bank = MultiUserLatentDPOTrainer(
        args, table, {"alice": USERS["alice"], "bob": USERS["bob"]}, EMBEDDING_CONFIG,
        preference_embeddings={"alice": start},
    ).train()  # fmt: skip
    _assert_same_embedding(bank.get("alice"), start)  # a learning rate of 0 leaves the start where it is
    assert bank.get("alice").config.training["warm_start"] is True
    assert "warm_start" not in bank.get("bob").config.training
    stranger = PreferenceEmbedding(dataclasses.replace(EMBEDDING_CONFIG, backbone_fingerprint="0" * 64))
    with pytest.raises(ValueError, match="another backbone"):
        MultiUserLatentDPOTrainer(args, table, USERS, EMBEDDING_CONFIG, preference_embeddings={"bob": stranger})
    with pytest.raises(ValueError, match="without pairs"):
        MultiUserLatentDPOTrainer(args, table, USERS, EMBEDDING_CONFIG, preference_embeddings={"dave": start})


# ----------------------------------------------------------------------
# From text: align_users
# ----------------------------------------------------------------------
def test_align_users_never_runs_the_lm_and_writes_a_bank(tmp_path, world):
    model, tokenizer, cache = world
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    lm_calls, lm_handles = _count_calls(
        [model.get_base_model(), model.latent_adapter], skip=[model.get_input_embeddings()]
    )
    encoder_calls, encoder_handles = _count_calls([model.latent_encoder])
    encoded_before = cache.encoder_sequences
    try:
        bank = align_users(model, _user_datasets(), _config(tmp_path), processing_class=tokenizer, latent_cache=cache)
    finally:
        for handle in lm_handles + encoder_handles:
            handle.remove()
    assert len(lm_calls) == 0, "the LM or the adapter ran during many-user Latent DPO"
    assert len(encoder_calls) == 0 and cache.encoder_sequences == encoded_before, "cached pairs were encoded again"
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"backbone tensor {name} changed"

    assert bank.ids() == ["alice", "bob", "carol.v2"]
    assert bank.fingerprint == model.fingerprint()
    records = {user: bank.get(user).config.training for user in bank.ids()}
    assert {user: record["pairs"] for user, record in records.items()} == {"alice": 16, "bob": 7, "carol.v2": 6}
    for record in records.values():
        assert record["method"] == "latent-dpo" and record["users_in_run"] == 3
        assert record["steps"] == math.ceil(2.5 * math.ceil(record["pairs"] / 8))
        assert record["posterior_separation"] > 0 and math.isfinite(record["final_loss"])
        assert 0 <= record["rewards_accuracy_last_log"] <= 1
    # alice prefers the w10 side, bob the w50 side: their constant parts move apart
    alice, bob = bank.get("alice").bias[:LATENT_DIM], bank.get("bob").bias[:LATENT_DIM]
    assert (alice - bob).norm() > 0.1

    bank.save(tmp_path / "bank")
    index = json.loads((tmp_path / "bank" / "bank.json").read_text())
    assert index["preference_ids"] == ["alice", "bob", "carol.v2"]
    loaded = PreferenceBank(model.fingerprint(), LATENT_DIM, model.config.text_config.hidden_size)
    assert loaded.load(tmp_path / "bank") == ["alice", "bob", "carol.v2"]
    for user in bank.ids():
        _assert_same_embedding(loaded.get(user), bank.get(user), user)
        assert loaded.get(user).config.training == records[user]
    model.preferences.load(tmp_path / "bank")
    ids = tokenizer(["w5 w6 w7"], return_tensors="pt")
    latents = model.preference_latents(ids["input_ids"], ids["attention_mask"], "alice")
    torch.testing.assert_close(latents, bank.get("alice").latents(model.prompt_features(**ids)))


def test_mapping_and_user_id_column_give_the_same_users(tmp_path, world):
    model, _, cache = world
    datasets = _user_datasets()
    by_mapping = align_users(model, datasets, _config(tmp_path), latent_cache=cache)
    # One dataset, the users' rows interleaved (each user's own rows keep their order)
    per_user = [[{**row, "user_id": user} for row in dataset] for user, dataset in datasets.items()]
    interleaved = [row for group in itertools.zip_longest(*per_user) for row in group if row is not None]
    by_column = align_users(model, Dataset.from_list(interleaved), _config(tmp_path), latent_cache=cache)
    assert by_column.ids() == by_mapping.ids()
    for user in datasets:
        _assert_same_embedding(by_column.get(user), by_mapping.get(user), user)
        assert by_column.get(user).config.training["pairs"] == len(datasets[user])


def test_shared_pairs_are_encoded_once(tmp_path):
    model, tokenizer = _backbone(), make_tiny_tokenizer()
    cache = LatentCache(model, tokenizer)
    shared = Dataset.from_list(_text_pairs(5, seed=8))
    align_users(model, {f"user{i}": shared for i in range(4)}, _config(tmp_path, max_steps=1), latent_cache=cache)
    # 5 prompts and 10 responses, whatever the number of users who rank them
    assert cache.encoder_sequences == 15


def test_initial_priors_match_latent_dpo_trainer(tmp_path, world):
    model, tokenizer, cache = world
    datasets = _user_datasets()
    for prior_init in ("zeros", "pairs"):
        config = _config(tmp_path, prior_init=prior_init, learning_rate=0.0, weight_decay=0.0)
        bank = align_users(model, datasets, config, latent_cache=cache)
        for user, dataset in datasets.items():
            single = LatentDPOTrainer(
                model, config, train_dataset=dataset, processing_class=tokenizer, latent_cache=cache
            )
            _assert_same_embedding(bank.get(user), single.model, f"{prior_init}/{user}")


# ----------------------------------------------------------------------
# Bad input and settings that cannot apply
# ----------------------------------------------------------------------
def test_bad_input_is_named(tmp_path, world, caplog):
    model, tokenizer, cache = world
    config = _config(tmp_path, max_steps=1)
    rows = _text_pairs(3, seed=1)
    with pytest.raises(ValueError, match="needs a `user_id` column"):
        align_users(model, Dataset.from_list(rows), config, latent_cache=cache)
    with pytest.raises(ValueError, match="Invalid preference id 'bad id!'"):
        align_users(model, {"bad id!": Dataset.from_list(rows)}, config, latent_cache=cache)
    with pytest.raises(ValueError, match=r"Row 1 of the dataset has `user_id` '\.\./x'"):
        column = Dataset.from_list([{**rows[0], "user_id": "ok"}, {**rows[1], "user_id": "../x"}])
        align_users(model, column, config, latent_cache=cache)
    with pytest.raises(ValueError, match="lacks column"):
        align_users(
            model, {"alice": Dataset.from_list([{"prompt": "w5", "chosen": "w6"}])}, config, latent_cache=cache
        )
    with pytest.raises(ValueError, match="No users given"):
        align_users(model, {}, config, latent_cache=cache)
    with pytest.raises(TypeError, match="mapping"):
        align_users(model, [Dataset.from_list(rows)], config, latent_cache=cache)
    with pytest.raises(ValueError, match="processing_class"):
        align_users(model, {"alice": Dataset.from_list(rows)}, config)
    identical = [{"prompt": "w5 w6", "chosen": "w7 w8", "rejected": "w7 w8"}]
    logging.getLogger("hf_prefalign").propagate = True
    with caplog.at_level(logging.WARNING, logger="hf_prefalign"):
        bank = align_users(
            model,
            {
                "alice": Dataset.from_list(rows),
                "dave": Dataset.from_list(identical),
                "erin": Dataset.from_list(identical),
            },
            config,
            latent_cache=cache,
        )
    assert bank.ids() == ["alice"]
    assert "Skipped 2 row(s)" in caplog.text and "Skipped 2 user(s) with no usable pair: 'dave', 'erin'" in caplog.text
    with pytest.raises(ValueError, match="No user has a usable pair"):
        align_users(model, {"dave": Dataset.from_list(identical)}, config, latent_cache=cache)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
        ({"lr_scheduler_type": "polynomial"}, "lr_scheduler_type"),
        ({"optim": "sgd"}, "optim"),
        ({"save_strategy": "steps"}, "save_strategy"),
        ({"dataloader_drop_last": True}, "dataloader_drop_last"),
    ],
)
def test_settings_that_cannot_apply_are_refused(tmp_path, overrides, named):
    with pytest.raises(ValueError, match=f"`{named}"):
        MultiUserLatentDPOTrainer(_config(tmp_path, **overrides), _table(), USERS, EMBEDDING_CONFIG)


def test_bad_pair_tables_and_rows_are_refused(tmp_path):
    args, table = _config(tmp_path), _table()
    with pytest.raises(ValueError, match="lacks column"):
        MultiUserLatentDPOTrainer(args, {"features": table["features"]}, USERS, EMBEDDING_CONFIG)
    with pytest.raises(ValueError, match="outside the pair table"):
        MultiUserLatentDPOTrainer(args, table, {"alice": [0, 99]}, EMBEDDING_CONFIG)
    with pytest.raises(ValueError, match="another backbone"):
        MultiUserLatentDPOTrainer(args, table, USERS, dataclasses.replace(EMBEDDING_CONFIG, feature_dim=7))
    with pytest.raises(ValueError, match="users_per_batch"):
        MultiUserLatentDPOTrainer(args, table, USERS, EMBEDDING_CONFIG, users_per_batch=0)


# ----------------------------------------------------------------------
# Online update of one saved user
# ----------------------------------------------------------------------
def _files(folder) -> dict[str, tuple[bytes, int, int]]:
    return {
        str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_ino, path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_update_user_changes_only_that_user(tmp_path, world):
    model, tokenizer, cache = world
    bank = align_users(model, _user_datasets(), _config(tmp_path), latent_cache=cache)
    folder = tmp_path / "bank"
    bank.save(folder)
    before = _files(folder)
    start = PreferenceEmbedding.from_pretrained(folder / "bob")

    new_pairs = Dataset.from_list(_text_pairs(4, seed=11, swap=True))
    updated = update_user(
        model, folder, "bob", new_pairs, _config(tmp_path, max_steps=3), processing_class=tokenizer, latent_cache=cache
    )
    after = _files(folder)
    untouched = {name: value for name, value in before.items() if not name.startswith("bob/")}
    assert {name: after[name] for name in untouched} == untouched, "another user's files were touched"
    assert {name for name in after if name.startswith("bob/")} == {name for name in before if name.startswith("bob/")}
    reloaded = PreferenceEmbedding.from_pretrained(folder / "bob")
    _assert_same_embedding(reloaded, updated)
    assert not torch.equal(reloaded.bias, start.bias), "the update did not move bob"
    record = reloaded.config.training
    assert record["warm_start"] is True and record["updates"] == 1 and record["steps"] == 3
    assert record["pairs"] == 4 and record["total_pairs"] == 7 + 4
    again = update_user(model, folder, "bob", new_pairs, _config(tmp_path, max_steps=1), latent_cache=cache)
    assert again.config.training["updates"] == 2 and again.config.training["total_pairs"] == 15
    loaded = PreferenceBank(model.fingerprint(), LATENT_DIM, model.config.text_config.hidden_size)
    assert loaded.load(folder) == ["alice", "bob", "carol.v2"]

    with pytest.raises(KeyError, match="'dave' is not in the bank"):
        update_user(model, folder, "dave", new_pairs, _config(tmp_path, max_steps=1), latent_cache=cache)
    with pytest.raises(ValueError, match="another backbone"):
        update_user(_backbone(1), folder, "bob", new_pairs, _config(tmp_path, max_steps=1), processing_class=tokenizer)


def test_update_user_of_a_sharded_bank_appends_its_row(tmp_path, world):
    model, tokenizer, cache = world
    bank = align_users(model, _user_datasets(), _config(tmp_path), latent_cache=cache)
    folder = tmp_path / "sharded"
    bank.save(folder, layout="sharded")
    shards_before = {p.name: p.read_bytes() for p in folder.glob("shard-*")}
    new_pairs = Dataset.from_list(_text_pairs(4, seed=11, swap=True))
    updated = update_user(model, folder, "bob", new_pairs, _config(tmp_path, max_steps=2), latent_cache=cache)
    assert all((folder / name).read_bytes() == data for name, data in shards_before.items()), "a shard was rewritten"
    loaded = PreferenceBank(model.fingerprint(), LATENT_DIM, model.config.text_config.hidden_size)
    assert sorted(loaded.load(folder)) == ["alice", "bob", "carol.v2"]
    _assert_same_embedding(loaded.get("bob"), updated)
    _assert_same_embedding(loaded.get("alice"), bank.get("alice"))
    assert loaded.get("bob").config.training["updates"] == 1


def test_save_user_adds_a_user_in_place(tmp_path):
    fingerprint = EMBEDDING_CONFIG.backbone_fingerprint
    bank = PreferenceBank(fingerprint, LATENT, FEATURES)
    bank.add("alice", PreferenceEmbedding(EMBEDDING_CONFIG))
    bank.save(tmp_path / "bank")
    before = _files(tmp_path / "bank")
    newcomer = PreferenceBank(fingerprint, LATENT, FEATURES)
    newcomer.add("zoe", PreferenceEmbedding(EMBEDDING_CONFIG))
    newcomer.save_user(tmp_path / "bank", "zoe")
    after = _files(tmp_path / "bank")
    assert all(after[name] == value for name, value in before.items() if name.startswith("alice/"))
    assert json.loads((tmp_path / "bank" / "bank.json").read_text())["preference_ids"] == ["alice", "zoe"]
    stranger = PreferenceBank("0" * 64, LATENT, FEATURES)
    stranger.add("zoe", PreferenceEmbedding(dataclasses.replace(EMBEDDING_CONFIG, backbone_fingerprint="0" * 64)))
    with pytest.raises(ValueError, match="another backbone"):
        stranger.save_user(tmp_path / "bank", "zoe")


def test_benchmark_example_runs_in_quick_mode():
    script = Path(__file__).resolve().parent.parent / "examples" / "many_users_benchmark.py"
    result = runpy.run_path(str(script))["main"](["--quick"])
    assert [run["users"] for run in result["runs"]] == [3, 6]
    for run in result["runs"]:
        assert run["train"]["users_per_s_cpu"] > 0 and run["train"]["peak_rss_mb"] > 0
        assert run["write"]["users_per_s_wall"] > 0
    assert result["one_by_one"]["users"] == 2 and result["update"]["updates"] == 1


# ----------------------------------------------------------------------
# Across processes: a pool encoded in shards, users aligned in shards into one bank
# ----------------------------------------------------------------------


def _entries(cache: LatentCache) -> dict[str, torch.Tensor]:
    return {**cache._prompts, **cache._responses}


def test_a_pool_encoded_in_shards_by_two_processes_equals_one_process(tmp_path):
    model, tokenizer = _backbone(), make_tiny_tokenizer()
    pool = make_tiny_pool(num_prompts=8, num_responses=3)
    alone = LatentCache(model, tokenizer, tmp_path / "one")
    assert alone.encode_pool(pool) == 8 + 24
    shared = tmp_path / "two"
    pids = [
        run_in_forked_child(
            lambda i=i: LatentCache(model, tokenizer, shared).encode_pool(pool, num_shards=2, shard_index=i)
        )
        for i in range(2)
    ]
    reads, codes = 0, {}
    while len(codes) < 2:  # a reader while both shards are written
        LatentCache(model, tokenizer, shared)
        reads += 1
        for pid in set(pids) - set(codes):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = status
    assert list(codes.values()) == [0, 0]
    merged = LatentCache(model, tokenizer, shared)
    assert len(merged.shard_files) == 2 and reads > 0
    assert set(_entries(merged)) == set(_entries(alone))
    for key, value in _entries(alone).items():
        torch.testing.assert_close(_entries(merged)[key], value, atol=1e-5, rtol=1e-5)
    assert merged.encode_pool(pool) == 0  # every text is cached: nothing encoded again

    # Appending a shard leaves the others untouched (the merge is the index, not a rewrite)
    first = merged.directory / merged.shard_files[0]
    before = (first.stat().st_ino, first.stat().st_mtime_ns, first.read_bytes())
    assert merged.encode_pool(make_tiny_pool(num_prompts=2, num_responses=2, seed=5)) == 6
    assert (
        len(merged.shard_files) == 3 and (first.stat().st_ino, first.stat().st_mtime_ns, first.read_bytes()) == before
    )


def test_damaged_or_foreign_caches_and_bad_shard_specs_are_named(tmp_path):
    from hf_prefalign.data.latent_cache import CacheShardLockedError
    from hf_prefalign.preference.bank_shards import writer_lock

    model, tokenizer = _backbone(), make_tiny_tokenizer()
    pool = make_tiny_pool(num_prompts=4, num_responses=2)
    cache = LatentCache(model, tokenizer, tmp_path)
    for spec in [(0, 0), (2, 2), (2, -1), (True, 0), (2, 0.5)]:
        with pytest.raises(ValueError, match="num_shards|shard_index"):
            cache.encode_pool(pool, num_shards=spec[0], shard_index=spec[1])
    cache.directory.mkdir(parents=True)
    with writer_lock(cache.directory, name="encode-00001-of-00002.lock"):  # another process encodes shard 1 of 2
        with pytest.raises(CacheShardLockedError, match=r"encoding shard 1 of 2 .*encode-00001-of-00002\.lock"):
            cache.encode_pool(pool, num_shards=2, shard_index=1)
    for i in range(2):
        cache.encode_pool(pool, num_shards=2, shard_index=i)
    index_file = cache.directory / "index.json"
    good_index = index_file.read_text()
    name = cache.shard_files[1]
    shard = cache.directory / name
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # same size, altered content
    shard.write_bytes(bytes(data))
    with pytest.raises(OSError, match=re.escape(name)):
        LatentCache(model, tokenizer, tmp_path)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"lists {re.escape(name)}, which is missing"):
        LatentCache(model, tokenizer, tmp_path)
    index = json.loads(good_index)
    index["fingerprint"] = "0" * 64
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="another backbone"):
        LatentCache(model, tokenizer, tmp_path)


def _many_users(count: int = 7) -> dict[str, Dataset]:
    return {f"user{i}": Dataset.from_list(_text_pairs(2 + i % 3, seed=20 + i, swap=i % 2 == 1)) for i in range(count)}


def _assert_bank_equals(directory: Path, expected: PreferenceBank) -> None:
    index = json.loads((directory / "bank.json").read_text())
    ids = [pid for shard in index["shards"] for pid in shard["ids"] if pid is not None]
    assert sorted(ids) == expected.ids(), "a user is missing or present twice"
    loaded = PreferenceBank(expected.fingerprint, expected.latent_dim, expected.feature_dim)
    loaded.load(directory)
    for user in expected.ids():
        _assert_same_embedding(loaded.get(user), expected.get(user), user)


@pytest.mark.parametrize("death", ["exception", "kill -9"])
def test_a_fan_out_killed_midway_is_finished_by_a_rerun(tmp_path, world, caplog, death):
    model, _, cache = world
    users, config = _many_users(), _config(tmp_path, max_steps=3)
    reference = align_users(model, users, config, latent_cache=cache)  # one process, in memory
    directory = tmp_path / "bank"

    def run() -> PreferenceBank:
        return align_users(
            model, users, config, latent_cache=cache, users_per_batch=2, bank_directory=directory, users_per_shard=2
        )

    def dies_at_the_third_stack() -> None:
        real, calls = MultiUserLatentDPOTrainer._train_group, []

        def train_group(self, *args):
            calls.append(1)
            if len(calls) == 3:
                if death == "kill -9":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError("killed")
            return real(self, *args)

        MultiUserLatentDPOTrainer._train_group = train_group  # in the child only
        run()

    status = os.waitpid(run_in_forked_child(dies_at_the_third_stack), 0)[1]
    assert os.WIFSIGNALED(status) if death == "kill -9" else os.WEXITSTATUS(status) == 1
    first = PreferenceBank(model.fingerprint(), LATENT_DIM, model.config.text_config.hidden_size)
    assert len(first.load(directory)) == 4  # the two stacks finished before the crash
    claims = list(directory.glob("align-*.lock"))
    assert len(claims) == (1 if death == "kill -9" else 0)  # a kill -9 leaves its claim: the rerun takes it over
    with caplog.at_level(logging.WARNING, logger="hf_prefalign"):
        rest = run()
    assert "Skipped 4 user(s) already in the bank" in caplog.text
    assert ("Removing the stale writer lock" in caplog.text) == bool(claims)
    assert len(rest) == 3 and not set(rest.ids()) & set(first.ids())
    _assert_bank_equals(directory, reference)
    assert len(align_users(model, users, config, latent_cache=cache, bank_directory=directory)) == 0  # all done
    assert not list(directory.glob("*.lock")) and not list(directory.glob(".prefalign-*"))


def test_two_processes_align_their_shards_into_one_bank(tmp_path, world):
    model, tokenizer, _ = world
    users, config = _many_users(), _config(tmp_path, max_steps=3)
    reference = align_users(model, users, config, processing_class=tokenizer)
    directory = tmp_path / "bank"

    def launched(rank: int):
        def work() -> None:  # as `torchrun --nproc-per-node 2` starts it: the shard comes from RANK / WORLD_SIZE
            os.environ.update(WORLD_SIZE="2", RANK=str(rank))
            shared = LatentCache(model, tokenizer, tmp_path / "cache")  # one on-disk cache for both
            mine = align_users(model, users, config, latent_cache=shared, bank_directory=directory, users_per_shard=2)
            assert mine.ids() and all(shard_of(u, 2) == rank for u in mine.ids())

        return work

    pids = [run_in_forked_child(launched(rank)) for rank in range(2)]
    assert [os.waitpid(pid, 0)[1] for pid in pids] == [0, 0]
    _assert_bank_equals(directory, reference)


def test_fan_out_bad_input_is_named(tmp_path, world, monkeypatch):
    from hf_prefalign.preference.bank_shards import BankLockedError
    from hf_prefalign.trainer.many_users import _claim_shard

    model, _, cache = world
    users, config = _many_users(3), _config(tmp_path, max_steps=1)
    directory = tmp_path / "bank"

    def run(**kwargs):
        return align_users(model, users, config, latent_cache=cache, **{"bank_directory": directory, **kwargs})

    with _claim_shard(directory, 2, 0):  # another process aligns shard 0 of 2 into this bank
        with pytest.raises(BankLockedError, match=r"aligning shard 0 of 2 .*align-00000-of-00002\.lock"):
            run(num_shards=2, shard_index=0)
        with pytest.raises(ValueError, match="must split the users the same way"):
            run(num_shards=3, shard_index=0)
    for spec, match in [
        ({"num_shards": 2}, "Give both"),
        ({"num_shards": 0, "shard_index": 0}, "at least 1"),
        ({"num_shards": 2, "shard_index": 2}, r"in 0 \.\. 1"),
        ({"num_shards": 2, "shard_index": 0, "users_per_shard": 0}, "users_per_shard"),
    ]:
        with pytest.raises(ValueError, match=match):
            run(**spec)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="WORLD_SIZE='2' / RANK='5'"):
        run()
    monkeypatch.delenv("RANK")
    with pytest.raises(ValueError, match="WORLD_SIZE='2' / RANK=None .*sets both"):
        run()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")

    run(users_per_shard=1)
    shard = directory / json.loads((directory / "bank.json").read_text())["shards"][0]["file"]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(shard.name)):
        run()
    stranger = PreferenceBank("0" * 64, LATENT_DIM, model.config.text_config.hidden_size)
    stranger.add(
        "zoe",
        PreferenceEmbedding(
            dataclasses.replace(
                EMBEDDING_CONFIG,
                backbone_fingerprint="0" * 64,
                latent_dim=LATENT_DIM,
                feature_dim=model.config.text_config.hidden_size,
            )
        ),
    )
    stranger.save(tmp_path / "foreign", layout="sharded")
    with pytest.raises(ValueError, match="another backbone"):
        run(bank_directory=tmp_path / "foreign")
    stranger.save(tmp_path / "folders")
    with pytest.raises(ValueError, match="'folders' layout"):
        run(bank_directory=tmp_path / "folders")


def test_parallel_cache_benchmark_runs_in_quick_mode(tmp_path):
    script = Path(__file__).resolve().parent.parent / "examples" / "parallel_cache_benchmark.py"
    module = runpy.run_path(str(script))
    result = module["main"](["--quick"])
    module["write_docs"](result, tmp_path / "run.json", tmp_path / "run.md")
    assert json.loads((tmp_path / "run.json").read_text()) == result
    assert "| 2 | 1 | 24 (" in (tmp_path / "run.md").read_text()
    one, two = result["runs"]
    assert (one["processes"], two["processes"]) == (1, 2) and one["texts_encoded"] == two["texts_encoded"] == 6 + 18
    assert sum(two["per_process"]) == 24 and min(two["per_process"]) > 0
    check = result["merged_vs_one_process"]
    assert check["same_keys"] and check["shard_files"] == 2 and check["max_abs_diff"] < 1e-4


def test_a_format_1_cache_is_read_and_appended_to_without_a_rewrite(tmp_path):
    from hf_prefalign.utils.serialization import save_tensors_atomic, sha256_file, write_json_atomic

    model, tokenizer = _backbone(), make_tiny_tokenizer()
    pool = make_tiny_pool(num_prompts=3, num_responses=2)
    fresh = LatentCache(model, tokenizer)
    fresh.encode_pool(pool)
    folder = tmp_path / model.fingerprint()[:24]  # a cache as format 1 wrote it: one tensors file, keys in the index
    tensors = {
        "prompt_features": torch.stack(list(fresh._prompts.values())),
        "response_posteriors": torch.stack(list(fresh._responses.values())),
    }
    save_tensors_atomic(tensors, folder / "latents.safetensors")
    index = {"fingerprint": model.fingerprint(), "key_format": "sha256-json-v2", "prompts": list(fresh._prompts)}
    index.update(responses=list(fresh._responses), latents_sha256=sha256_file(folder / "latents.safetensors"))
    write_json_atomic(index, folder / "index.json")
    before = (folder / "latents.safetensors").read_bytes()
    cache = LatentCache(model, tokenizer, tmp_path)
    assert cache.encode_pool(pool) == 0 and set(_entries(cache)) == set(_entries(fresh))
    assert cache.encode_pool(make_tiny_pool(num_prompts=1, num_responses=1, seed=9)) == 2
    assert cache.shard_files[0] == "latents.safetensors" and len(cache.shard_files) == 2
    assert (folder / "latents.safetensors").read_bytes() == before
    assert len(_entries(LatentCache(model, tokenizer, tmp_path))) == len(_entries(fresh)) + 2


def test_the_cli_stack_size_default_is_the_library_default():
    from hf_prefalign.cli.commands.align import AlignArguments
    from hf_prefalign.trainer.many_users import DEFAULT_USERS_PER_BATCH

    assert AlignArguments.__dataclass_fields__["users_per_batch"].default == DEFAULT_USERS_PER_BATCH
