"""Latent DPO (stage 2): the loss, the trainer, the shared latent cache, and generating for trained users."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from datasets import Dataset
from helpers import LATENT_DIM, random_words
from safetensors.torch import load_file
from transformers import TrainingArguments, pipeline

from hf_prefalign import (
    LatentCache,
    LatentDPOConfig,
    LatentDPOTrainer,
    PrefAlignForCausalLM,
    PreferenceEmbedding,
    PreferenceEmbeddingConfig,
)
from hf_prefalign.data.latent_cache import PAIR_COLUMNS, normalize_preference_dataset
from hf_prefalign.data.prompts import render_prompt
from hf_prefalign.distributions import DiagonalGaussian
from hf_prefalign.testing import make_tiny_base, make_tiny_tokenizer
from hf_prefalign.trainer.latent_dpo_loss import latent_dpo_loss


LOGGED_METRICS = ("loss", "rewards/accuracy", "rewards/margin", "pairs/kept", "prior/mean_norm", "prior/std")
# Prompts of different lengths for the generation tests (the word-level tokenizer adds no special token).
PROMPTS = ["w5 w6 w7 w8 w9", "w10 w11", "w12 w13 w14"]


# ----------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------
def _backbone(noise_seed: int = 0, family: str = "qwen2") -> PrefAlignForCausalLM:
    """A tiny backbone whose latent modules are perturbed, so responses get different posteriors.

    Qwen2 is the default: its untied tiny head makes greedy decoding depend visibly on z.
    """
    model = PrefAlignForCausalLM.from_base(make_tiny_base(family), latent_dim=LATENT_DIM).eval()
    generator = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for p in model.latent_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def _rows(num: int = 24, seed: int = 0, swap: bool = False) -> list[dict[str, str]]:
    """Pairs whose chosen responses start with w10 w11 w12 and rejected with w50 w51 (swapped: the other user)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num):
        prompt = random_words(generator)
        good = "w10 w11 w12 " + random_words(generator)
        bad = "w50 w51 " + random_words(generator)
        rows.append({"prompt": prompt, "chosen": bad if swap else good, "rejected": good if swap else bad})
    return rows


def _pairs(num: int = 24, seed: int = 0, swap: bool = False) -> Dataset:
    return Dataset.from_list(_rows(num, seed, swap))


def _config(tmp_path, name: str = "ldpo", **overrides) -> LatentDPOConfig:
    defaults = {
        "output_dir": str(tmp_path / name),
        "disable_tqdm": True,
        "report_to": [],
        "use_cpu": True,
        "latent_cache_dir": "none",
        "num_train_epochs": 2,
        "per_device_train_batch_size": 16,
        "logging_steps": 1,
        "seed": 0,
    }
    return LatentDPOConfig(**{**defaults, **overrides})


def _trainer(tmp_path, model=None, dataset=None, name: str = "ldpo", **kwargs) -> LatentDPOTrainer:
    trainer_kwargs = {
        k: kwargs.pop(k) for k in ("latent_cache", "preference_embedding", "eval_dataset") if k in kwargs
    }
    return LatentDPOTrainer(
        model if model is not None else _backbone(),
        _config(tmp_path, name, **kwargs),
        train_dataset=dataset if dataset is not None else _pairs(),
        processing_class=make_tiny_tokenizer(),
        **trainer_kwargs,
    )


def _count_calls(modules, skip=()) -> tuple[list[int], list]:
    """Forward hooks counting calls into any of `modules` and their sub-modules (except those in `skip`)."""
    calls: list[int] = []
    handles = [
        sub.register_forward_hook(lambda *_: calls.append(1))
        for module in modules
        for sub in module.modules()
        if not any(sub is s for s in skip)
    ]
    return calls, handles


def _column(dataset: Dataset, name: str) -> torch.Tensor:
    return dataset[:][name]


def _left_padded(tokenizer, prompts=PROMPTS) -> dict[str, torch.Tensor]:
    tokenizer.padding_side = "left"
    return tokenizer(prompts, return_tensors="pt", padding=True)


def _generate(model, **kwargs) -> torch.Tensor:
    settings = {"do_sample": False, "max_new_tokens": 6, "min_new_tokens": 6, "pad_token_id": 0}
    return model.generate(**{**settings, **kwargs})


@pytest.fixture(scope="module")
def users(tmp_path_factory):
    """A backbone with two trained users registered: alice (prefers w10 w11 w12 ...) and bob (the opposite)."""
    root = tmp_path_factory.mktemp("users")
    model = _backbone()
    tokenizer = make_tiny_tokenizer()
    cache = LatentCache(model, tokenizer)
    paths = {}
    for name, swap in (("alice", False), ("bob", True)):
        trainer = LatentDPOTrainer(
            model,
            _config(root, name, num_train_epochs=8, learning_rate=0.05),
            train_dataset=_pairs(swap=swap),
            processing_class=tokenizer,
            latent_cache=cache,
        )
        trainer.train()
        paths[name] = root / f"{name}-embedding"
        trainer.save_preference(paths[name])
        model.load_preference(paths[name], name)
    return model, tokenizer, paths, cache


# ----------------------------------------------------------------------
# The loss on hand-made Gaussians
# ----------------------------------------------------------------------
def _posteriors(batch: int = 4, latent: int = 2) -> tuple[DiagonalGaussian, DiagonalGaussian]:
    """Chosen N(+2, 0.1) and rejected N(-2, 0.1) along dimension 0; identical N(0, 0.1) elsewhere."""
    logvar = torch.full((batch, latent), math.log(0.1))
    chosen_mean, rejected_mean = torch.zeros(batch, latent), torch.zeros(batch, latent)
    chosen_mean[:, 0], rejected_mean[:, 0] = 2.0, -2.0
    return DiagonalGaussian(chosen_mean, logvar), DiagonalGaussian(rejected_mean, logvar.clone())


def _fresh_prior(latent: int = 2, features: int = 5) -> PreferenceEmbedding:
    torch.manual_seed(0)
    return PreferenceEmbedding(
        PreferenceEmbeddingConfig(latent_dim=latent, feature_dim=features, backbone_fingerprint="x")
    )


def test_loss_step_moves_the_prior_toward_the_chosen_posterior():
    chosen, rejected = _posteriors()
    prior_module = _fresh_prior()
    features = torch.randn(4, 5)
    loss, metrics = latent_dpo_loss(
        prior_module(features), chosen, rejected, beta=1.0, generator=torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(loss)
    # rho = 0 for every latent under the N(0, I) prior: each kept pair costs -log sigmoid(0) = log 2.
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-6)
    assert metrics["pairs/kept"] > 0
    assert metrics["rewards/margin"].item() == pytest.approx(0.0, abs=1e-5)
    loss.backward()
    assert prior_module.bias.grad[0] < 0, "the loss must fall as the mean moves toward the chosen posterior"

    optimizer = torch.optim.SGD(prior_module.parameters(), lr=0.5)
    optimizer.step()
    with torch.no_grad():
        moved = prior_module(features)
    assert (moved.mean[:, 0] > 0).all()
    assert (moved.mean[:, 0] > moved.mean[:, 1].abs()).all(), "the move is along the preferred dimension"
    after, after_metrics = latent_dpo_loss(
        prior_module(features), chosen, rejected, beta=1.0, generator=torch.Generator().manual_seed(0)
    )
    assert after < loss
    assert after_metrics["rewards/accuracy"] > 0.5 and after_metrics["rewards/margin"] > 0


def test_a_few_optimizer_steps_put_the_prior_mean_near_the_chosen_side():
    chosen, rejected = _posteriors()
    prior_module = _fresh_prior()
    features = torch.randn(4, 5)
    optimizer = torch.optim.Adam(prior_module.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    for _ in range(30):
        optimizer.zero_grad()
        loss, _ = latent_dpo_loss(prior_module(features), chosen, rejected, beta=1.0, generator=generator)
        loss.backward()
        optimizer.step()
    mean = prior_module(features).mean.detach()
    assert (mean[:, 0] > 0.5).all(), mean


def test_identical_posteriors_keep_no_pair_and_give_zero_loss():
    chosen, _ = _posteriors()
    same = DiagonalGaussian(chosen.mean.clone(), chosen.logvar.clone())
    prior_module = _fresh_prior()
    with torch.no_grad():
        prior_module.bias.normal_()  # any prior: there is nothing to prefer
    loss, metrics = latent_dpo_loss(prior_module(torch.randn(4, 5)), chosen, same, beta=0.1)
    assert metrics["pairs/kept"] == 0
    assert loss.item() == 0.0
    assert all(torch.isfinite(value) for value in (loss, *metrics.values())), metrics
    loss.backward()
    for p in prior_module.parameters():
        assert p.grad is None or (torch.isfinite(p.grad).all() and (p.grad == 0).all())


def test_loss_keeps_the_top_quantile_of_reward_gaps():
    chosen, rejected = _posteriors(batch=2)
    prior = DiagonalGaussian.standard_normal((2, 2))
    kept = {}
    for quantile in (0.0, 0.5, 0.75, 0.9):
        _, metrics = latent_dpo_loss(
            prior, chosen, rejected, num_samples=8, gap_quantile=quantile, generator=torch.Generator().manual_seed(0)
        )
        kept[quantile] = metrics["pairs/kept"].item()
    n = 3 * 8
    assert kept[0.0] <= n * (n - 1) / 2, "only pairs with a positive gap are kept"
    # Gaps are antisymmetric, so quantiles up to the median keep exactly the positive gaps.
    assert kept[0.0] == kept[0.5] > kept[0.75] > kept[0.9] > 0


# ----------------------------------------------------------------------
# Training touches only the user's prior
# ----------------------------------------------------------------------
def test_training_changes_only_the_prior_and_never_runs_the_lm(tmp_path):
    model = _backbone()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    # The encoder reads the base's (shared, frozen) token embeddings: every other base module must stay idle.
    lm_calls, lm_handles = _count_calls(
        [model.get_base_model(), model.latent_adapter], skip=[model.get_input_embeddings()]
    )
    encoder_calls, encoder_handles = _count_calls([model.latent_encoder])

    trainer = _trainer(tmp_path, model=model, prompt_dependent_prior=True)
    assert len(encoder_calls) > 0, "the cache is built at construction"
    # Building the cache is the one-time cost: the hidden-state encoder reads the base's lower layers there.
    lm_calls.clear()
    encoder_calls.clear()
    output = trainer.train()
    for handle in lm_handles + encoder_handles:
        handle.remove()

    assert output.global_step == 4
    assert len(lm_calls) == 0, "the LM or the adapter ran during Latent DPO"
    assert len(encoder_calls) == 0, "the encoder ran during training (outside the cache)"
    after = model.state_dict()
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), f"backbone tensor {name} changed"
    assert {name: p.requires_grad for name, p in model.named_parameters()} == grad_flags
    assert isinstance(trainer.model, PreferenceEmbedding)
    assert trainer.model.bias.abs().max() > 0 and trainer.model.up.abs().max() > 0, "the prior did not train"


def test_trained_prior_prefers_the_chosen_side(users):
    model, tokenizer, _, cache = users
    encoded = cache.encode_pairs(_pairs(), "check")
    alice = model.preferences.get("alice")
    prior = alice(_column(encoded, "features"))
    chosen = DiagonalGaussian(_column(encoded, "chosen_mean"), _column(encoded, "chosen_logvar"))
    rejected = DiagonalGaussian(_column(encoded, "rejected_mean"), _column(encoded, "rejected_logvar"))
    bob = model.preferences.get("bob")(_column(encoded, "features"))

    def preference_for_chosen(z: torch.Tensor) -> torch.Tensor:  # mean log-likelihood ratio, chosen vs rejected
        return (chosen.log_prob(z) - rejected.log_prob(z)).mean()

    # Training moves alice's prior mean towards her chosen posteriors, further than N(0, I)'s mean; bob's away.
    neutral = preference_for_chosen(torch.zeros_like(prior.mean))
    assert preference_for_chosen(prior.mean) > neutral > preference_for_chosen(bob.mean)
    assert (prior.mean - bob.mean).norm(dim=-1).min() > 0.5, "opposite users should have distinct priors"


def test_pairs_init_starts_at_the_examples_mean_difference(tmp_path):
    model = _backbone()
    tokenizer = make_tiny_tokenizer()
    cache = LatentCache(model, tokenizer)
    pairs = _pairs()
    trainer = _trainer(tmp_path, model=model, dataset=pairs, latent_cache=cache, prior_init="pairs")
    # No step taken yet: the prior is what from_examples builds with the chosen responses liked, the rejected disliked.
    liked = [{"prompt": row["prompt"], "response": row["chosen"]} for row in pairs]
    disliked = [{"prompt": row["prompt"], "response": row["rejected"]} for row in pairs]
    examples = PreferenceEmbedding.from_examples(model, tokenizer, liked, disliked, latent_cache=cache)
    torch.testing.assert_close(trainer.model.bias, examples.bias)
    assert trainer.model.bias[: model.config.latent_dim].norm() > 0
    assert torch.count_nonzero(trainer.model.up) == 0
    zeros = _trainer(tmp_path, model=model, dataset=pairs, name="zeros", latent_cache=cache, prior_init="zeros")
    assert torch.count_nonzero(zeros.model.bias) == 0, "prior_init='zeros' starts at N(0, I)"


def test_constant_prior_trains_only_its_constant_part(tmp_path):
    trainer = _trainer(tmp_path, prompt_dependent_prior=False, prior_init="pairs")
    down, start = trainer.model.down.detach().clone(), trainer.model.bias.detach().clone()
    trainer.train()
    embedding = trainer.model
    assert torch.count_nonzero(embedding.up) == 0 and torch.equal(embedding.down, down)
    assert not torch.equal(embedding.bias, start), "the constant part did not train"
    prior = embedding(_column(trainer.train_dataset, "features"))
    assert torch.equal(prior.mean, prior.mean[:1].expand_as(prior.mean)), "the prior depends on the prompt"
    assert embedding.config.training["prompt_dependent_prior"] is False
    assert embedding.config.training["prior_init"] == "pairs"


# ----------------------------------------------------------------------
# The latent cache
# ----------------------------------------------------------------------
def test_cache_is_shared_between_two_users_of_the_same_pool(tmp_path):
    model = _backbone()
    tokenizer = make_tiny_tokenizer()
    cache = LatentCache(model, tokenizer)
    first = _trainer(tmp_path, model=model, dataset=_pairs(), name="a", latent_cache=cache)
    assert first.cache_sequences_encoded == 24 + 2 * 24  # prompts, chosen and rejected responses
    calls, handles = _count_calls([model.latent_encoder])
    second = _trainer(tmp_path, model=model, dataset=_pairs(swap=True), name="b", latent_cache=cache)
    for handle in handles:
        handle.remove()
    assert second.cache_sequences_encoded == 0
    assert calls == [], "the encoder ran for the second user"
    # The second user's latent columns are the first user's, chosen and rejected swapped.
    a, b = first.train_dataset, second.train_dataset
    assert torch.equal(_column(a, "features"), _column(b, "features"))
    assert torch.equal(_column(a, "chosen_mean"), _column(b, "rejected_mean")) and torch.equal(
        _column(a, "rejected_logvar"), _column(b, "chosen_logvar")
    )
    second.train()


def test_cache_entries_match_a_direct_encoding(users):
    model, tokenizer, _, cache = users
    rows = _rows()[:3]
    encoded = cache.encode_pairs(Dataset.from_list(rows))
    assert encoded.column_names == list(PAIR_COLUMNS)
    with torch.no_grad():
        ids = tokenizer([rows[1]["prompt"]], return_tensors="pt")
        torch.testing.assert_close(
            _column(encoded, "features")[1], model.prompt_features(**ids)[0], atol=1e-5, rtol=1e-5
        )
        full = tokenizer([rows[1]["prompt"] + " " + rows[1]["chosen"] + " <eos>"], return_tensors="pt")
        response_mask = torch.ones_like(full["input_ids"])
        response_mask[:, : ids["input_ids"].shape[1]] = 0  # the encoder's queries read the response only
        posterior = model.posterior(**full, response_mask=response_mask)
    torch.testing.assert_close(_column(encoded, "chosen_mean")[1], posterior.mean[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_column(encoded, "chosen_logvar")[1], posterior.logvar[0], atol=1e-5, rtol=1e-5)


def test_cached_prompt_features_match_those_read_at_generation(users):
    # The prior is trained on cached features (right-padded batches) and read from left-padded generation batches.
    model, tokenizer, _, cache = users
    encoded = cache.encode_pairs(
        Dataset.from_list([{"prompt": p, "chosen": "w20", "rejected": "w21"} for p in PROMPTS])
    )
    batch = _left_padded(tokenizer)
    with torch.no_grad():
        features = model.prompt_features(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(_column(encoded, "features"), features, atol=1e-5, rtol=1e-5)


def test_disk_cache_is_reused_by_a_fresh_cache_and_trainer(tmp_path):
    model = _backbone()
    tokenizer = make_tiny_tokenizer()
    cache_dir = tmp_path / "latents"
    first = _trainer(tmp_path, model=model, name="a", latent_cache_dir=str(cache_dir))
    assert first.cache_sequences_encoded == 72
    folder = cache_dir / model.fingerprint()[:24]
    index = json.loads((folder / "index.json").read_text())
    assert index["fingerprint"] == model.fingerprint()
    assert sorted(shard["file"] for shard in index["shards"]) == sorted(p.name for p in folder.glob("latents-*"))
    assert sum(len(shard["prompts"]) for shard in index["shards"]) == 24
    assert sum(len(shard["responses"]) for shard in index["shards"]) == 48

    fresh = LatentCache(model, tokenizer, cache_dir)
    calls, handles = _count_calls([model.latent_encoder])
    encoded = fresh.encode_pairs(_pairs(swap=True))
    assert fresh.encoder_sequences == 0 and calls == []
    assert torch.equal(_column(encoded, "features"), _column(first.train_dataset, "features"))
    assert torch.equal(_column(encoded, "rejected_mean"), _column(first.train_dataset, "chosen_mean"))

    second = _trainer(tmp_path, model=model, dataset=_pairs(swap=True), name="b", latent_cache_dir=str(cache_dir))
    for handle in handles:
        handle.remove()
    assert second.cache_sequences_encoded == 0 and calls == []


def test_disk_cache_of_another_backbone_is_not_reused(tmp_path):
    cache_dir = tmp_path / "latents"
    _trainer(tmp_path, model=_backbone(0), name="a", latent_cache_dir=str(cache_dir))
    other = _trainer(tmp_path, model=_backbone(1), name="b", latent_cache_dir=str(cache_dir))
    assert other.cache_sequences_encoded == 72
    assert len(list(cache_dir.iterdir())) == 2, "one folder per backbone fingerprint"


def test_cache_of_another_backbone_is_refused_by_the_trainer(tmp_path):
    cache = LatentCache(_backbone(0), make_tiny_tokenizer())
    with pytest.raises(ValueError, match="another backbone"):
        _trainer(tmp_path, model=_backbone(1), latent_cache=cache)


# ----------------------------------------------------------------------
# Saving, loading, fingerprints
# ----------------------------------------------------------------------
def test_saved_user_is_small_and_loads_identically(users):
    model, _, paths, _ = users
    path = paths["alice"]
    assert {"config.json", "model.safetensors"} <= {p.name for p in path.iterdir()}
    assert (path / "model.safetensors").stat().st_size < 64 * 1024
    loaded = PreferenceEmbedding.from_pretrained(path)
    registered = model.preferences.get("alice")
    for name, tensor in registered.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert loaded.config.backbone_fingerprint == model.fingerprint()
    assert loaded.config.feature_dim == model.config.text_config.hidden_size
    assert loaded.config.latent_dim == LATENT_DIM


def test_embedding_of_another_backbone_is_refused_and_not_registered(users):
    _, _, paths, _ = users
    other = _backbone(noise_seed=1)
    with pytest.raises(ValueError, match="another backbone"):
        other.load_preference(paths["alice"], "alice")
    assert "alice" not in other.preferences and len(other.preferences) == 0
    other.preferences.add_from_directory("alice", paths["alice"])  # lazily: checked on first use
    with pytest.raises(ValueError, match="another backbone"):
        other.preferences.get("alice")


def test_embedding_of_another_latent_size_is_refused(users):
    model, _, _, _ = users
    wrong = PreferenceEmbedding(
        PreferenceEmbeddingConfig(latent_dim=LATENT_DIM + 1, feature_dim=32, backbone_fingerprint=model.fingerprint())
    )
    with pytest.raises(ValueError, match="latent_dim"):
        model.load_preference(wrong, "wrong")
    assert "wrong" not in model.preferences


@pytest.mark.parametrize("damage", ["truncated", "bad_json"])
def test_corrupt_embedding_is_never_half_registered(users, tmp_path, damage):
    model, _, paths, _ = users
    broken = tmp_path / "broken"
    PreferenceEmbedding.from_pretrained(paths["alice"]).save_pretrained(broken)
    if damage == "truncated":
        weights = broken / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-7])
    else:
        (broken / "config.json").write_text("{ not json")
    with pytest.raises(OSError):
        model.load_preference(broken, "carol")
    assert "carol" not in model.preferences
    assert model.preferences.ids() == ["alice", "bob"]


def test_bank_follows_in_place_changes_of_the_backbone_weights():
    # After the backbone's latent weights change (e.g. more CLaP training of the same object), its fingerprint
    # changes; the bank must check new users against the current fingerprint, not the one it was created with.
    model = _backbone()
    old_fingerprint = model.fingerprint()
    assert len(model.preferences) == 0  # creates the bank
    with torch.no_grad():
        model.latent_adapter.weight.add_(0.5)
    new_fingerprint = model.fingerprint()
    assert new_fingerprint != old_fingerprint
    feature_dim = model.config.text_config.hidden_size

    def embedding(fingerprint: str) -> PreferenceEmbedding:
        config = PreferenceEmbeddingConfig(
            latent_dim=LATENT_DIM, feature_dim=feature_dim, backbone_fingerprint=fingerprint
        )
        return PreferenceEmbedding(config)

    model.load_preference(embedding(new_fingerprint), "current")  # trained against the current weights
    assert "current" in model.preferences
    with pytest.raises(ValueError, match="another backbone"):
        model.load_preference(embedding(old_fingerprint), "stale")


# ----------------------------------------------------------------------
# Generating for users
# ----------------------------------------------------------------------
def test_mixed_user_batch_equals_each_row_generated_alone(users):
    model, tokenizer, _, _ = users
    batch = _left_padded(tokenizer)
    width = batch["input_ids"].shape[1]
    ids = ["alice", None, "bob"]
    mixed = _generate(model, **batch, preference_id=ids)[:, width:]
    assert mixed.shape == (3, 6)
    for row, (prompt, preference_id) in enumerate(zip(PROMPTS, ids, strict=True)):
        alone = tokenizer([prompt], return_tensors="pt")
        single = _generate(model, **alone, preference_id=preference_id)[:, alone["input_ids"].shape[1] :]
        assert mixed[row].tolist() == single[0].tolist(), f"row {row} ({preference_id}) differs"
    neutral = _generate(model, **batch)[:, width:]
    assert torch.equal(mixed[1], neutral[1]), "a None row is the neutral model"
    assert not torch.equal(mixed[0], neutral[0]) and not torch.equal(mixed[2], neutral[2]), (
        "the users' latents should change what this backbone writes"
    )


def test_one_preference_id_applies_to_every_row(users):
    model, tokenizer, _, _ = users
    batch = _left_padded(tokenizer)
    once = _generate(model, **batch, preference_id="alice")
    per_row = _generate(model, **batch, preference_id=["alice"] * 3)
    assert torch.equal(once, per_row)
    latents = model.preference_latents(batch["input_ids"], batch["attention_mask"], "alice")
    assert latents.shape == (3, LATENT_DIM) and latents.norm(dim=-1).min() > 0
    assert torch.equal(_generate(model, **batch, latents=latents), once)


def test_preference_latents_are_each_users_prior_mean(users):
    model, tokenizer, _, _ = users
    batch = _left_padded(tokenizer)
    latents = model.preference_latents(batch["input_ids"], batch["attention_mask"], ["alice", None, "bob"])
    with torch.no_grad():
        features = model.prompt_features(batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(latents[0], model.preferences.get("alice")(features[:1]).mean[0])
        torch.testing.assert_close(latents[2], model.preferences.get("bob")(features[2:]).mean[0])
    assert torch.equal(latents[1], torch.zeros(LATENT_DIM))
    neutral = model.preference_latents(batch["input_ids"], batch["attention_mask"], None)
    assert torch.equal(neutral, torch.zeros(3, LATENT_DIM))


def test_sampling_from_a_users_prior_is_seeded(users):
    model, tokenizer, _, _ = users
    batch = _left_padded(tokenizer)
    outputs = []
    for _ in range(2):
        torch.manual_seed(3)
        outputs.append(_generate(model, **batch, preference_id="alice", preference_sampling="sample"))
    assert torch.equal(outputs[0], outputs[1])
    with pytest.raises(ValueError, match="preference_sampling"):
        _generate(model, **batch, preference_id="alice", preference_sampling="mode")


def test_pipeline_with_a_preference_id_matches_generate(users):
    model, tokenizer, _, _ = users
    tokenizer.padding_side = "left"
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    settings = {"do_sample": False, "max_new_tokens": 5, "min_new_tokens": 5}
    chat = [{"role": "user", "content": "w40 w41"}]
    for prompt, preference_id in (("w5 w6 w7", "alice"), (chat, "bob")):
        result = pipe(prompt, preference_id=preference_id, return_tensors=True, **settings)
        text = render_prompt(tokenizer, prompt)
        ids = tokenizer([text], return_tensors="pt", add_special_tokens=False)
        expected = model.generate(**ids, preference_id=preference_id, pad_token_id=0, **settings)[0].tolist()
        assert result[0]["generated_token_ids"] == expected, f"pipeline differs for {prompt!r}"
        # The user's z must reach the LM: first-step logits differ from the neutral model's (tokens of a tiny
        # random model may not).
        scored = {
            pid: model.generate(
                **ids, preference_id=pid, pad_token_id=0, return_dict_in_generate=True, output_logits=True, **settings
            ).logits[0]
            for pid in (preference_id, None)
        }
        assert (scored[preference_id] - scored[None]).abs().max() > 1e-5, f"{preference_id!r} did not reach generate"
    texts = pipe(chat, preference_id="alice", **settings)
    assert texts[0]["generated_text"][-1]["role"] == "assistant"
    with pytest.raises(KeyError, match="carol"):
        pipe("w5 w6", preference_id="carol", **settings)


def test_unknown_preference_id_lists_the_known_ones(users):
    model, tokenizer, _, _ = users
    batch = _left_padded(tokenizer)
    with pytest.raises(KeyError) as excinfo:
        _generate(model, **batch, preference_id=["alice", "carol", None])
    message = str(excinfo.value)
    assert "'carol'" in message and "'alice'" in message and "'bob'" in message


def test_preference_id_and_latents_together_are_refused(users):
    model, tokenizer, _, _ = users
    batch = _left_padded(tokenizer)
    with pytest.raises(ValueError, match="not both"):
        _generate(model, **batch, preference_id="alice", latents=torch.zeros(3, LATENT_DIM))


def test_preference_ids_must_match_the_batch(users):
    model, tokenizer, _, _ = users
    batch = _left_padded(tokenizer)
    with pytest.raises(ValueError, match="2 preference ids for a batch of 3"):
        _generate(model, **batch, preference_id=["alice", "bob"])


def test_preference_id_needs_token_ids(users):
    model, tokenizer, _, _ = users
    batch = _left_padded(tokenizer)
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with pytest.raises(ValueError, match="token ids"):
        model.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], preference_id="alice")


# ----------------------------------------------------------------------
# Dataset formats and bad input
# ----------------------------------------------------------------------
def _conversational(rows: list[dict[str, str]], implicit: bool = False) -> Dataset:
    out = []
    for row in rows:
        user = [{"role": "user", "content": row["prompt"]}]
        chosen = [{"role": "assistant", "content": row["chosen"]}]
        rejected = [{"role": "assistant", "content": row["rejected"]}]
        if implicit:
            out.append({"chosen": user + chosen, "rejected": user + rejected})
        else:
            out.append({"prompt": user, "chosen": chosen, "rejected": rejected})
    return Dataset.from_list(out)


def test_conversational_and_implicit_prompt_datasets_train_on_the_same_latents(tmp_path):
    model = _backbone()
    rows = _rows(num=12)
    cache = LatentCache(model, make_tiny_tokenizer())
    conversational = _trainer(tmp_path, model=model, dataset=_conversational(rows), name="c", latent_cache=cache)
    assert conversational.cache_sequences_encoded == 36 and len(conversational.train_dataset) == 12
    output = conversational.train()
    assert output.global_step == 2 and math.isfinite(output.training_loss)

    implicit = _trainer(
        tmp_path, model=model, dataset=_conversational(rows, implicit=True), name="i", latent_cache=cache
    )
    assert implicit.cache_sequences_encoded == 0, "the implicit prompt should render like the explicit one"
    for column in PAIR_COLUMNS:
        assert torch.equal(_column(implicit.train_dataset, column), _column(conversational.train_dataset, column)), (
            column
        )
    implicit.train()

    plain = _trainer(tmp_path, model=model, dataset=Dataset.from_list(rows), name="p", latent_cache=cache)
    assert plain.cache_sequences_encoded == 36, "a chat prompt and its plain text are different inputs"


def test_normalize_reads_the_implicit_prompt_format():
    rows = _rows(num=3)
    prompts, chosen, rejected = normalize_preference_dataset(_conversational(rows, implicit=True))
    assert prompts == [[{"role": "user", "content": row["prompt"]}] for row in rows]
    assert chosen == [row["chosen"] for row in rows] and rejected == [row["rejected"] for row in rows]
    prompts, chosen, _ = normalize_preference_dataset(_conversational(rows))
    assert prompts[0] == [{"role": "user", "content": rows[0]["prompt"]}] and chosen[0] == rows[0]["chosen"]


def test_empty_dataset_is_rejected(tmp_path):
    empty = Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    with pytest.raises(ValueError, match="empty"):
        _trainer(tmp_path, dataset=empty)


def test_missing_columns_are_named_with_the_columns_found(tmp_path):
    dataset = Dataset.from_dict({"prompt": ["w5"], "answer": ["w6"], "rejected": ["w7"]})
    with pytest.raises(ValueError) as excinfo:
        _trainer(tmp_path, dataset=dataset)
    message = str(excinfo.value)
    assert "['chosen']" in message and "'answer'" in message and "'prompt'" in message


def test_plain_text_without_a_prompt_column_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="no `prompt` column"):
        _trainer(tmp_path, dataset=Dataset.from_dict({"chosen": ["w5 w6"], "rejected": ["w5 w7"]}))


def test_rows_with_identical_responses_are_skipped_with_a_counted_warning(tmp_path, caplog):
    rows = _rows(num=6)
    rows[1]["rejected"] = rows[1]["chosen"]
    rows[4]["chosen"] = rows[4]["rejected"]
    with caplog.at_level(logging.WARNING):
        trainer = _trainer(tmp_path, dataset=Dataset.from_list(rows))
    assert len(trainer.train_dataset) == 4
    assert any("Skipped 2 row(s)" in record.getMessage() for record in caplog.records), caplog.text
    trainer.train()
    assert trainer.model.config.training["pairs"] == 4


def test_dataset_of_only_identical_responses_is_rejected(tmp_path):
    dataset = Dataset.from_dict({"prompt": ["w5", "w6"], "chosen": ["w7", "w8"], "rejected": ["w7", "w8"]})
    with pytest.raises(ValueError, match="no usable pair"):
        _trainer(tmp_path, dataset=dataset)


@pytest.mark.parametrize(
    "options,name",
    [
        ({"gap_quantile": 1.5}, "gap_quantile"),
        ({"gap_quantile": -0.1}, "gap_quantile"),
        ({"num_latent_samples": 0}, "num_latent_samples"),
        ({"beta": 0.0}, "beta"),
        ({"beta": -1.0}, "beta"),
        ({"prior_rank": 0}, "prior_rank"),
        ({"prior_init": "random"}, "prior_init"),
    ],
)
def test_invalid_config_values_are_rejected(tmp_path, options, name):
    with pytest.raises(ValueError, match=name):
        _config(tmp_path, **options)


def test_config_defaults_and_memory_only_cache():
    config = LatentDPOConfig(output_dir="unused", latent_cache_dir="None", use_cpu=True)
    assert config.latent_cache_dir == "none"
    assert config.learning_rate == 5e-3 and config.per_device_train_batch_size == 64
    assert config.save_strategy == "no" and config.remove_unused_columns is False


def test_non_prefalign_model_is_a_type_error(tmp_path):
    with pytest.raises(TypeError, match="PrefAlignForCausalLM"):
        LatentDPOTrainer(
            make_tiny_base("qwen2"), _config(tmp_path), train_dataset=_pairs(), processing_class=make_tiny_tokenizer()
        )


def test_wrong_arguments_type_and_missing_tokenizer_or_dataset(tmp_path):
    model = _backbone()
    with pytest.raises(TypeError, match="LatentDPOConfig"):
        LatentDPOTrainer(
            model,
            TrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=True, report_to=[]),
            train_dataset=_pairs(),
            processing_class=make_tiny_tokenizer(),
        )
    with pytest.raises(ValueError, match="tokenizer"):
        LatentDPOTrainer(model, _config(tmp_path), train_dataset=_pairs())
    with pytest.raises(ValueError, match="train_dataset"):
        LatentDPOTrainer(model, _config(tmp_path), processing_class=make_tiny_tokenizer())


def test_continuing_an_embedding_of_another_backbone_is_refused(tmp_path, users):
    _, _, paths, _ = users
    with pytest.raises(ValueError, match="another backbone"):
        _trainer(
            tmp_path, model=_backbone(1), preference_embedding=PreferenceEmbedding.from_pretrained(paths["alice"])
        )


# ----------------------------------------------------------------------
# Trainer features
# ----------------------------------------------------------------------
def test_logged_metrics_and_the_training_record(tmp_path):
    trainer = _trainer(tmp_path, num_train_epochs=3, beta=0.2, learning_rate=0.02)
    output = trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == output.global_step == 6
    for entry in logged:
        for key in LOGGED_METRICS:
            assert key in entry, f"{key} missing from {sorted(entry)}"
            assert math.isfinite(entry[key])
        assert entry["pairs/kept"] > 0 and 0 <= entry["rewards/accuracy"] <= 1 and entry["prior/std"] > 0
    assert logged[0]["prior/mean_norm"] < logged[-1]["prior/mean_norm"]

    record = trainer.model.config.training
    assert record["pairs"] == 24 and record["steps"] == 6 and record["beta"] == 0.2
    assert record["method"] == "latent-dpo" and record["learning_rate"] == 0.02
    assert record["final_loss"] == pytest.approx(output.training_loss)
    trainer.save_preference(tmp_path / "user")
    saved = json.loads((tmp_path / "user" / "config.json").read_text())
    assert saved["training"]["pairs"] == 24 and saved["training"]["steps"] == 6


def test_evaluation_reports_the_latent_metrics(tmp_path):
    trainer = _trainer(tmp_path, eval_dataset=_pairs(num=8, seed=5), max_steps=2)
    trainer.train()
    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_rewards/accuracy", "eval_rewards/margin", "eval_pairs/kept"):
        assert key in metrics and math.isfinite(metrics[key]), sorted(metrics)
    again = trainer.evaluate(_pairs(num=4, seed=6))  # a raw preference dataset is encoded on the fly
    assert math.isfinite(again["eval_loss"])


def test_checkpoints_hold_the_embedding_and_resuming_continues_identically(tmp_path):
    settings = {
        "max_steps": 6,
        "save_strategy": "steps",
        "save_steps": 3,
        "per_device_train_batch_size": 5,  # 5 steps per epoch: the checkpoint falls mid-epoch
        "learning_rate": 0.02,
        "seed": 7,
    }
    model = _backbone()
    uninterrupted = _trainer(tmp_path, model=model, name="a", **settings)
    uninterrupted.train()
    checkpoint = tmp_path / "a" / "checkpoint-3"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "config.json").is_file()
    assert (tmp_path / "a" / "checkpoint-6" / "model.safetensors").is_file()
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert set(saved) == {"bias", "down", "up"}
    assert not torch.equal(saved["bias"], uninterrupted.model.bias.detach()), "checkpoint-3 is not the final state"

    resumed = _trainer(tmp_path, model=model, name="b", **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6
    expected, found = uninterrupted.model.state_dict(), resumed.model.state_dict()
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], rtol=0, atol=1e-6, msg=f"{name} differs")


def test_continuing_a_saved_embedding_starts_from_its_weights(tmp_path, users):
    model, _, paths, cache = users
    start = PreferenceEmbedding.from_pretrained(paths["alice"])
    trainer = _trainer(tmp_path, model=model, preference_embedding=start, latent_cache=cache, max_steps=1)
    assert trainer.model is start
    trainer.train()
    first = next(entry for entry in trainer.state.log_history if "loss" in entry)
    # A fresh N(0, I) prior logs a zero mean norm at its first step; a continued one starts where alice ended.
    assert first["prior/mean_norm"] > 0.5


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"loss_type": ["ipo"]}, "loss_type"),
        ({"loss_type": "ipo"}, "loss_type"),
        ({"label_smoothing": 0.3}, "label_smoothing"),
        ({"max_length": 4}, "max_length"),
        ({"precompute_ref_log_probs": True}, "precompute_ref_log_probs"),
        ({"padding_free": True}, "padding_free"),
        ({"activation_checkpointing": True}, "activation_checkpointing"),
    ],
)
def test_dpo_fields_that_cannot_act_are_refused(tmp_path, overrides, named):
    with pytest.raises(ValueError, match=f"`{named}"):
        _config(tmp_path, **overrides)


def test_defaults_of_inert_fields_and_no_warnings_of_our_making(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the gradient_checkpointing FutureWarning, pin_memory, ...
        config = _config(tmp_path, loss_type="sigmoid", max_length=1024)  # the defaults, spelled out, are fine
    assert config.activation_checkpointing is False and config.dataloader_pin_memory is False


def test_trl_positional_order_and_refused_trl_options(tmp_path):
    model, tokenizer = _backbone(), make_tiny_tokenizer()
    # DPOTrainer's order: (model, ref_model, args, data_collator, train_dataset, eval_dataset, processing_class)
    trainer = LatentDPOTrainer(model, None, _config(tmp_path), None, _pairs(), None, tokenizer)
    assert isinstance(trainer.args, LatentDPOConfig) and trainer.num_pairs == 24
    with pytest.raises(ValueError, match="`ref_model`"):
        LatentDPOTrainer(model, model, _config(tmp_path), train_dataset=_pairs(), processing_class=tokenizer)
    with pytest.raises(ValueError, match="`peft_config`"):
        LatentDPOTrainer(model, args=_config(tmp_path), train_dataset=_pairs(), peft_config=object())
    with pytest.raises(TypeError, match="given twice"):
        LatentDPOTrainer(model, _config(tmp_path), _config(tmp_path), train_dataset=_pairs())
