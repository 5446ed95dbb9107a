"""CLaP (stage 1): the loss terms, the prompt-group batching, training, resuming, the recipes and bad input."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from datasets import Dataset
from helpers import LATENT_DIM, PAPER_DESIGN, make_tiny_pool
from safetensors.torch import load_file
from torch.utils.data import DataLoader, DistributedSampler
from transformers import TrainerCallback

from hf_prefalign import PrefAlignForCausalLM
from hf_prefalign.data import DataCollatorForResponseGroups
from hf_prefalign.distributions import DiagonalGaussian
from hf_prefalign.models.prefalign.modeling_prefalign import FISHER_KEY
from hf_prefalign.testing import make_tiny_base, make_tiny_tokenizer
from hf_prefalign.trainer import CLaPConfig, CLaPTrainer
from hf_prefalign.trainer.clap_losses import (
    aggregate_posterior_kl,
    analytic_kl,
    info_nce,
    negative_indices,
    sequence_log_likelihood,
)


LATENT_PREFIXES = ("latent_encoder.", "latent_adapter.")


# ----------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------
def _backbone(family: str = "llama") -> PrefAlignForCausalLM:
    # The trainer's mechanics on the paper's design (every loss term reaches encoder blocks, queries and prefix);
    # the default design's CLaP (PCA start, residual adapter) is tested in test_preference_space.py.
    return PrefAlignForCausalLM.from_base(make_tiny_base(family), latent_dim=LATENT_DIM, **PAPER_DESIGN)


def _config(tmp_path, **overrides) -> CLaPConfig:
    defaults = {
        "output_dir": str(tmp_path / "clap"),
        "report_to": [],
        "disable_tqdm": True,
        "use_cpu": True,
        "save_strategy": "no",
    }
    return CLaPConfig(**{**defaults, **overrides})


def _trainer(tmp_path, model=None, pool=None, **overrides) -> CLaPTrainer:
    return CLaPTrainer(
        model if model is not None else _backbone(),
        _config(tmp_path, **overrides),
        train_dataset=pool if pool is not None else make_tiny_pool(num_prompts=4, num_responses=3),
        processing_class=make_tiny_tokenizer(),
    )


def _uneven_pool(num_prompts: int = 7) -> Dataset:
    """Distinct prompts with 2, 3 or 4 distinct responses each, so groups of different sizes share batches."""
    rows = []
    for i in range(num_prompts):
        responses = [f"w{10 + i} w{30 + k} w{60 + i}" for k in range(2 + i % 3)]
        rows.append({"prompt": f"w{5 + i} w{50 + i}" + " w90" * (i % 2), "responses": responses})
    return Dataset.from_list(rows)


def _separable_pool(num_prompts: int = 6, num_responses: int = 4) -> Dataset:
    """Each response repeats one word, different for every response of a prompt: easy to tell apart from z."""
    rows = []
    for p in range(num_prompts):
        responses = [" ".join([f"w{20 + 10 * k + p % 3}"] * 6) for k in range(num_responses)]
        rows.append({"prompt": f"w{5 + p} w{6 + p}", "responses": responses})
    return Dataset.from_list(rows)


def _tokenized(pool: Dataset, tmp_path, **overrides) -> Dataset:
    return CLaPTrainer._prepare_dataset(pool, make_tiny_tokenizer(), _config(tmp_path, **overrides), "train")


def _batch(pool: Dataset, tmp_path) -> dict[str, torch.Tensor]:
    tokenized = _tokenized(pool, tmp_path)
    collator = DataCollatorForResponseGroups(pad_token_id=make_tiny_tokenizer().pad_token_id)
    return collator([tokenized[i] for i in range(len(tokenized))])


def _groups(batch: dict[str, torch.Tensor]) -> dict[tuple[int, ...], list[tuple[int, ...]]]:
    """prompt tokens -> sorted full sequences (prompt + response) found in a batch, checking group coherence."""
    groups: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    group_index = batch["group_index"].tolist()
    assert group_index == sorted(group_index), "the sequences of a prompt must be consecutive"
    assert sorted(set(group_index)) == list(range(len(set(group_index))))
    for g in sorted(set(group_index)):
        prompts, sequences = set(), []
        for row in (batch["group_index"] == g).nonzero().flatten().tolist():
            real = batch["attention_mask"][row].bool()
            ids, labels = batch["input_ids"][row][real], batch["labels"][row][real]
            prompts.add(tuple(ids[labels == -100].tolist()))
            sequences.append(tuple(ids.tolist()))
        assert len(prompts) == 1, f"group {g} mixes prompts {prompts}"
        prompt = prompts.pop()
        assert prompt not in groups, "a prompt appears as two groups of one batch"
        groups[prompt] = sorted(sequences)
    return groups


def _expected_groups(tokenized: Dataset) -> dict[tuple[int, ...], list[tuple[int, ...]]]:
    expected = {}
    for row in tokenized:
        prompt = tuple(row["prompt_input_ids"])
        expected[prompt] = sorted(prompt + tuple(r) for r in row["responses_input_ids"])
    assert len(expected) == len(tokenized), "test pools need distinct prompts"
    return expected


def _perturb_encoder_head(model: PrefAlignForCausalLM, std: float = 0.05) -> None:
    """The head starts at zero (q = N(0, I)), which zeroes every gradient below it; give it random weights."""
    with torch.no_grad():
        torch.manual_seed(3)
        torch.nn.init.normal_(model.latent_encoder.to_gaussian.weight, std=std)
        torch.nn.init.normal_(model.latent_encoder.to_gaussian.bias, std=std)


def _grads(model: PrefAlignForCausalLM, prefix: str) -> dict[str, torch.Tensor | None]:
    return {name: p.grad for name, p in model.named_parameters() if name.startswith(prefix)}


def _has_gradient(grads: dict[str, torch.Tensor | None]) -> bool:
    return any(g is not None and g.abs().sum() > 0 for g in grads.values())


def _no_gradient(grads: dict[str, torch.Tensor | None]) -> bool:
    return all(g is None or g.abs().sum() == 0 for g in grads.values())


def _base_grads(model: PrefAlignForCausalLM) -> dict[str, torch.Tensor | None]:
    return {name: p.grad for name, p in model.named_parameters() if not name.startswith(LATENT_PREFIXES)}


def _term(model: PrefAlignForCausalLM, batch: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """One CLaP loss term, computed from the loss functions on the model's own posterior and logits."""
    posterior = model.posterior(batch["input_ids"], batch["attention_mask"])
    if name == "kl_analytic":
        return analytic_kl(posterior).sum()
    if name == "kl_aggregate":
        return aggregate_posterior_kl(posterior, batch["group_index"], num_samples=8).sum()
    latents = posterior.rsample()
    own = model(batch["input_ids"], attention_mask=batch["attention_mask"], latents=latents).logits
    own_ll, num_tokens = sequence_log_likelihood(own, batch["labels"])
    if name == "nll":
        return -own_ll.sum() / num_tokens.sum()
    assert name == "contrastive"
    negatives = negative_indices(batch["group_index"], None)
    rows = torch.arange(len(latents)).repeat_interleave(negatives.shape[1])
    neg = model(
        batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows], latents=latents[negatives.reshape(-1)]
    ).logits
    neg_ll, _ = sequence_log_likelihood(neg, batch["labels"][rows])
    scores = torch.cat([own_ll.unsqueeze(1), neg_ll.view(negatives.shape)], dim=1)
    return info_nce(scores)[0]


# ----------------------------------------------------------------------
# Loss terms on a tiny model
# ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["nll", "kl_analytic", "kl_aggregate", "contrastive"])
def test_loss_term_is_finite_with_the_right_sign(tmp_path, name):
    model = _backbone().train()
    _perturb_encoder_head(model)
    value = _term(model, _batch(make_tiny_pool(num_prompts=3, num_responses=3), tmp_path), name)
    assert torch.isfinite(value)
    if name == "nll":
        assert value > 0
    elif name in ("contrastive", "kl_analytic"):
        assert value >= 0
    if name == "kl_analytic":
        assert value > 0, "a perturbed encoder is no longer exactly N(0, I)"


def test_full_loss_trains_only_the_latent_modules_when_the_base_is_frozen(tmp_path):
    trainer = _trainer(tmp_path)
    model = trainer.model.train()
    _perturb_encoder_head(model)
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(model, batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(g is None for g in _base_grads(model).values()), "a frozen base parameter got a gradient"
    latent = {name: p for name, p in model.named_parameters() if name.startswith(LATENT_PREFIXES)}
    assert all(p.requires_grad for p in latent.values())
    without = sorted(name for name, p in latent.items() if p.grad is None or p.grad.abs().sum() == 0)
    assert not without, f"latent parameters without gradient: {without}"


@pytest.mark.parametrize("name", ["kl_analytic", "kl_aggregate"])
def test_kl_alone_trains_the_encoder_but_not_the_adapter(tmp_path, name):
    model = _backbone().train()
    _perturb_encoder_head(model)
    _term(model, _batch(make_tiny_pool(num_prompts=3, num_responses=3), tmp_path), name).backward()
    assert _has_gradient(_grads(model, "latent_encoder.to_gaussian."))
    assert _has_gradient(_grads(model, "latent_encoder.blocks."))
    assert all(g is None for g in _grads(model, "latent_adapter.").values())
    assert all(g is None for g in _base_grads(model).values())


def test_nll_trains_the_adapter_and_through_z_the_encoder(tmp_path):
    model = _backbone().train()
    _perturb_encoder_head(model)
    _term(model, _batch(make_tiny_pool(num_prompts=3, num_responses=3), tmp_path), "nll").backward()
    assert _has_gradient(_grads(model, "latent_adapter.weight"))
    assert _has_gradient(_grads(model, "latent_adapter.bias"))
    assert _has_gradient(_grads(model, "latent_encoder.to_gaussian."))
    assert _has_gradient(_grads(model, "latent_encoder.blocks."))
    assert _has_gradient(_grads(model, "latent_encoder.queries"))
    assert all(g is None for g in _base_grads(model).values())


def test_zero_encoder_head_blocks_gradients_to_the_encoder_blocks(tmp_path):
    model = _backbone().train()  # untrained: to_gaussian is exactly zero
    _term(model, _batch(make_tiny_pool(num_prompts=3, num_responses=3), tmp_path), "nll").backward()
    assert _has_gradient(_grads(model, "latent_encoder.to_gaussian."))
    assert _no_gradient(_grads(model, "latent_encoder.blocks."))


def test_contrastive_term_trains_adapter_and_encoder(tmp_path):
    model = _backbone().train()
    _perturb_encoder_head(model)
    _term(model, _batch(make_tiny_pool(num_prompts=3, num_responses=3), tmp_path), "contrastive").backward()
    assert _has_gradient(_grads(model, "latent_adapter.weight"))
    assert _has_gradient(_grads(model, "latent_encoder.to_gaussian."))
    assert all(g is None for g in _base_grads(model).values())


# ----------------------------------------------------------------------
# The aggregate KL estimator against the analytic KL
# ----------------------------------------------------------------------
def test_aggregate_kl_of_the_prior_itself_is_exactly_zero():
    prior = DiagonalGaussian.standard_normal((3, LATENT_DIM))
    torch.manual_seed(0)
    aggregate = aggregate_posterior_kl(prior, torch.tensor([0, 1, 2]), num_samples=64)  # one posterior per group
    assert aggregate.shape == (LATENT_DIM,)
    assert torch.equal(aggregate, torch.zeros(LATENT_DIM))
    assert torch.equal(analytic_kl(prior), torch.zeros(LATENT_DIM))


def test_aggregate_kl_of_identical_prior_posteriors_in_one_group_is_zero():
    prior = DiagonalGaussian.standard_normal((4, LATENT_DIM))
    torch.manual_seed(0)
    aggregate = aggregate_posterior_kl(prior, torch.zeros(4, dtype=torch.long), num_samples=64)
    torch.testing.assert_close(aggregate, torch.zeros(LATENT_DIM), rtol=0, atol=1e-6)


def test_aggregate_kl_of_single_posteriors_matches_the_analytic_kl():
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(3, LATENT_DIM, generator=generator)
    logvar = 0.5 * torch.randn(3, LATENT_DIM, generator=generator)
    posterior = DiagonalGaussian(mean, logvar)
    torch.manual_seed(0)
    # Each response alone in its group: the aggregated posterior is the posterior itself.
    aggregate = aggregate_posterior_kl(posterior, torch.tensor([0, 1, 2]), num_samples=20000)
    exact = analytic_kl(posterior)
    torch.testing.assert_close(aggregate.sum(), exact.sum(), rtol=0.03, atol=0)
    torch.testing.assert_close(aggregate, exact, rtol=0.1, atol=0.03)


def test_aggregate_kl_of_sharp_distinct_posteriors_is_below_their_mean_analytic_kl():
    # Six sharp posteriors whose means spread over the prior: each is far from N(0, I), their mixture is not.
    generator = torch.Generator().manual_seed(0)
    means = torch.linspace(-2.0, 2.0, 6).unsqueeze(1) + 0.1 * torch.randn(6, LATENT_DIM, generator=generator)
    posterior = DiagonalGaussian(means, torch.full((6, LATENT_DIM), -4.0))
    torch.manual_seed(0)
    aggregate = aggregate_posterior_kl(posterior, torch.zeros(6, dtype=torch.long), num_samples=256).sum()
    exact = analytic_kl(posterior).sum()
    assert 0 <= aggregate < 0.5 * exact, (aggregate, exact)


def test_aggregate_kl_compares_posteriors_only_within_their_prompt():
    # Two prompts, each with identical posteriors: one group's mixture must not include the other's.
    mean = torch.cat([torch.full((2, LATENT_DIM), 3.0), torch.full((2, LATENT_DIM), -3.0)])
    posterior = DiagonalGaussian(mean, torch.full((4, LATENT_DIM), -2.0))
    torch.manual_seed(0)
    grouped = aggregate_posterior_kl(posterior, torch.tensor([0, 0, 1, 1]), num_samples=2000)
    torch.testing.assert_close(grouped, analytic_kl(posterior), rtol=0.05, atol=0.05)


# ----------------------------------------------------------------------
# InfoNCE and negatives
# ----------------------------------------------------------------------
def test_info_nce_is_minimal_when_latents_separate_responses():
    scores = torch.zeros(5, 4)
    scores[:, 0] = 60.0  # log p(y_i | z_i) far above log p(y_i | z_j)
    loss, accuracy = info_nce(scores)
    assert 0 <= loss < 1e-6
    assert accuracy == 1.0


def test_info_nce_of_uniform_scores_is_log_of_the_candidates():
    for candidates in (2, 3, 8):
        loss, _ = info_nce(torch.full((4, candidates), -7.5))
        assert math.isclose(loss.item(), math.log(candidates), rel_tol=1e-6)


def test_info_nce_wrong_ranking_gives_zero_accuracy():
    scores = torch.zeros(3, 4)
    scores[:, 2] = 5.0
    loss, accuracy = info_nce(scores)
    assert accuracy == 0.0
    assert loss > math.log(4)


def test_tied_scores_are_not_counted_as_correct():
    # All candidates equally likely (e.g. every z equal): the own latent is not ranked first, accuracy is chance.
    _, accuracy = info_nce(torch.full((6, 3), -4.0))
    assert accuracy <= 1 / 3 + 1e-6


def test_untrained_backbone_has_chance_contrastive_accuracy_in_evaluation(tmp_path):
    # Untrained: every posterior mean is 0, so every candidate latent gives the same score.
    pool = make_tiny_pool(num_prompts=2, num_responses=3)
    trainer = CLaPTrainer(_backbone(), _config(tmp_path), eval_dataset=pool, processing_class=make_tiny_tokenizer())
    metrics = trainer.evaluate()
    assert math.isclose(metrics["eval_loss/contrastive"], math.log(3), rel_tol=1e-5)
    assert metrics["eval_contrastive/accuracy"] <= 1 / 3 + 1e-6


def test_negative_indices_stay_within_the_prompt_and_skip_the_response_itself():
    group_index = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    generator = torch.Generator().manual_seed(0)
    for cap, expected in ((None, 2), (1, 1), (2, 2), (10, 2)):  # smallest group has 3 responses
        for _ in range(20):
            negatives = negative_indices(group_index, cap, generator=generator)
            assert negatives.shape == (len(group_index), expected)
            for i, row in enumerate(negatives.tolist()):
                assert i not in row, f"response {i} is its own negative"
                assert len(set(row)) == len(row), "negatives are drawn without replacement"
                assert all(group_index[j] == group_index[i] for j in row), "a negative from another prompt"


def test_negative_indices_cover_every_other_response_over_draws():
    group_index = torch.tensor([0, 0, 0, 0, 0])
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(50):
        seen.update(negative_indices(group_index, 1, generator=generator)[0].tolist())
    assert seen == {1, 2, 3, 4}


def test_negative_indices_need_two_responses_per_prompt():
    with pytest.raises(ValueError, match="2 responses"):
        negative_indices(torch.tensor([0, 0, 1]), None)


# ----------------------------------------------------------------------
# Sequence log-likelihood
# ----------------------------------------------------------------------
def _random_scoring_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 7, 11, generator=generator)
    labels = torch.randint(0, 11, (3, 7), generator=generator)
    labels[0, :3] = -100  # prompt
    labels[1, :2] = -100
    labels[1, 5:] = -100  # padding
    labels[2, :4] = -100
    return logits, labels


def test_sequence_log_likelihood_matches_a_manual_sum():
    logits, labels = _random_scoring_inputs()
    ll, num_tokens = sequence_log_likelihood(logits, labels)
    log_probs = torch.log_softmax(logits, dim=-1)
    for n in range(labels.shape[0]):
        expected, count = 0.0, 0
        for t in range(1, labels.shape[1]):
            if labels[n, t] != -100:
                expected += log_probs[n, t - 1, labels[n, t]].item()
                count += 1
        assert math.isclose(ll[n].item(), expected, rel_tol=1e-5)
        assert num_tokens[n] == count
    assert (ll < 0).all()


def test_sequence_log_likelihood_ignores_unlabelled_positions():
    logits, labels = _random_scoring_inputs()
    ll, _ = sequence_log_likelihood(logits, labels)
    changed = logits.clone()
    for n in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            # Position t predicts token t+1: its logits matter only when token t+1 is labelled.
            if t + 1 >= labels.shape[1] or labels[n, t + 1] == -100:
                changed[n, t] = torch.randn(logits.shape[-1]) * 10
    torch.testing.assert_close(sequence_log_likelihood(changed, labels)[0], ll, rtol=0, atol=0)


def test_sequence_log_likelihood_on_trailing_positions_only():
    logits, labels = _random_scoring_inputs()
    ll, num_tokens = sequence_log_likelihood(logits, labels)
    keep = CLaPTrainer._positions_to_score(labels)
    assert keep < labels.shape[1], "the test needs leading positions that can be skipped"
    for k in (keep, keep + 1, labels.shape[1]):
        ll_k, num_k = sequence_log_likelihood(logits[:, -k:], labels[:, -k:])
        torch.testing.assert_close(ll_k, ll, rtol=0, atol=1e-6)
        assert torch.equal(num_k, num_tokens)


def test_model_logits_to_keep_gives_the_same_sequence_scores(tmp_path):
    model = _backbone().eval()
    batch = _batch(_uneven_pool(3), tmp_path)  # prompts of different lengths in one batch
    keep = CLaPTrainer._positions_to_score(batch["labels"])
    assert keep < batch["labels"].shape[1]
    latents = torch.randn(len(batch["input_ids"]), LATENT_DIM)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "latents": latents}
    with torch.no_grad():
        full, _ = sequence_log_likelihood(model(**inputs).logits, batch["labels"])
        kept_logits = model(**inputs, logits_to_keep=keep).logits
        kept, _ = sequence_log_likelihood(kept_logits, batch["labels"][:, -keep:])
    assert kept_logits.shape[1] == keep
    torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------
# Prompt groups through collators and samplers
# ----------------------------------------------------------------------
def test_collator_keeps_whole_prompt_groups(tmp_path):
    tokenized = _tokenized(_uneven_pool(), tmp_path)
    expected = _expected_groups(tokenized)
    collator = DataCollatorForResponseGroups(pad_token_id=0)
    batch = collator([tokenized[i] for i in (4, 0, 2)])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    groups = _groups(batch)
    assert list(groups) == [tuple(tokenized[i]["prompt_input_ids"]) for i in (4, 0, 2)]
    for prompt, sequences in groups.items():
        assert sequences == expected[prompt]
    eos = make_tiny_tokenizer().eos_token_id
    last = batch["attention_mask"].sum(-1) - 1
    assert (batch["input_ids"][torch.arange(len(last)), last] == eos).all(), "every response ends with EOS"


def test_shuffled_dataloader_yields_whole_groups(tmp_path):
    tokenized = _tokenized(_uneven_pool(), tmp_path)
    expected = _expected_groups(tokenized)
    collator = DataCollatorForResponseGroups(pad_token_id=0)
    torch.manual_seed(0)
    seen = []
    for batch in DataLoader(tokenized, batch_size=3, shuffle=True, collate_fn=collator):
        for prompt, sequences in _groups(batch).items():
            assert sequences == expected[prompt]
            seen.append(prompt)
    assert sorted(seen) == sorted(expected)


@pytest.mark.parametrize("epoch", [0, 1])
def test_distributed_replicas_yield_whole_groups_and_cover_every_prompt(tmp_path, epoch):
    tokenized = _tokenized(_uneven_pool(), tmp_path)
    expected = _expected_groups(tokenized)
    collator = DataCollatorForResponseGroups(pad_token_id=0)
    covered = set()
    for rank in (0, 1):
        sampler = DistributedSampler(tokenized, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(epoch)
        for batch in DataLoader(tokenized, batch_size=2, sampler=sampler, collate_fn=collator):
            for prompt, sequences in _groups(batch).items():
                assert sequences == expected[prompt]
                covered.add(prompt)
    assert covered == set(expected)


def test_trainer_dataloader_yields_whole_groups(tmp_path):
    pool = _uneven_pool()
    trainer = _trainer(tmp_path, pool=pool, per_device_train_batch_size=3)
    expected = _expected_groups(trainer.train_dataset)
    seen = []
    for batch in trainer.get_train_dataloader():
        for prompt, sequences in _groups(batch).items():
            assert sequences == expected[prompt]
            seen.append(prompt)
    assert sorted(seen) == sorted(expected)


def test_max_responses_takes_a_subset_from_one_prompt(tmp_path):
    tokenized = _tokenized(_uneven_pool(), tmp_path)
    expected = _expected_groups(tokenized)
    sizes = [len(r) for r in tokenized["responses_input_ids"]]
    big, small = sizes.index(4), sizes.index(2)
    subsets = set()
    for seed in range(20):
        collator = DataCollatorForResponseGroups(pad_token_id=0, max_responses=2, seed=seed)
        groups = _groups(collator([tokenized[big], tokenized[small]]))
        again = _groups(collator([tokenized[small], tokenized[big]]))
        big_prompt, small_prompt = (tuple(tokenized[i]["prompt_input_ids"]) for i in (big, small))
        assert list(groups) == [big_prompt, small_prompt]
        assert len(groups[big_prompt]) == 2
        assert len(set(groups[big_prompt])) == 2, "a response was drawn twice"
        assert set(groups[big_prompt]) <= set(expected[big_prompt]), "a response from another prompt"
        assert groups[small_prompt] == expected[small_prompt], "a group within the cap stays whole"
        assert again[big_prompt] == groups[big_prompt], "the subset is a function of (seed, prompt), not of the batch"
        subsets.add(tuple(groups[big_prompt]))
    assert len(subsets) > 1, "the subset should change with the seed"


def test_evaluation_uses_every_response_even_with_responses_per_step(tmp_path):
    pool = _uneven_pool()
    trainer = CLaPTrainer(
        _backbone(),
        _config(tmp_path, responses_per_step=2),
        train_dataset=pool,
        eval_dataset=pool,
        processing_class=make_tiny_tokenizer(),
    )
    expected = _expected_groups(trainer.eval_dataset)
    for batch in trainer.get_eval_dataloader():
        for prompt, sequences in _groups(batch).items():
            assert sequences == expected[prompt]
    train_batch = next(iter(trainer.get_train_dataloader()))
    assert max(torch.bincount(train_batch["group_index"]).tolist()) <= 2


# ----------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------
TRAINING = {
    "max_steps": 40,
    "learning_rate": 3e-3,
    "per_device_train_batch_size": 2,
    "logging_steps": 5,
}


def test_short_training_run_lowers_the_loss(tmp_path):
    pool = _separable_pool()
    trainer = CLaPTrainer(
        _backbone(),
        _config(tmp_path, **TRAINING),
        train_dataset=pool,
        eval_dataset=pool,
        processing_class=make_tiny_tokenizer(),
    )
    before = {name: p.detach().clone() for name, p in trainer.model.get_base_model().named_parameters()}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == TRAINING["max_steps"] // TRAINING["logging_steps"]
    for key in ("loss/nll", "loss/kl", "loss/contrastive", "contrastive/accuracy", "latent/active_dims"):
        assert key in logs[0], f"{key} is not logged"
        assert all(math.isfinite(entry[key]) for entry in logs)
    first, last = logs[0], logs[-1]
    assert last["loss"] < first["loss"] - 0.1, (first["loss"], last["loss"])
    assert last["loss/contrastive"] < first["loss/contrastive"]
    for name, p in trainer.model.get_base_model().named_parameters():
        assert torch.equal(p, before[name]), f"frozen base parameter {name} changed"

    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_contrastive/accuracy", "eval_nll/zero_latent", "eval_nll/posterior"):
        assert key in metrics, f"evaluate() does not report {key}"
    assert metrics["eval_contrastive/accuracy"] > 0.5, "responses should be told apart from their latents"
    assert metrics["eval_nll/posterior"] < metrics["eval_nll/zero_latent"]


def test_evaluation_metrics_are_logged(tmp_path):
    pool = make_tiny_pool(num_prompts=2, num_responses=3)
    trainer = CLaPTrainer(_backbone(), _config(tmp_path), eval_dataset=pool, processing_class=make_tiny_tokenizer())
    trainer.evaluate()
    logged = trainer.state.log_history[-1]
    for key in ("eval_loss/nll", "eval_loss/kl", "eval_contrastive/accuracy", "eval_nll/zero_latent"):
        assert key in logged
    assert not any(key.startswith("loss/") for key in logged), "evaluation metrics must carry the eval_ prefix"


@pytest.mark.parametrize(
    "options",
    [{}, {"responses_per_step": 2}, {"freeze_base": False}],
    ids=["frozen", "responses_per_step", "unfrozen"],
)
def test_resuming_from_a_checkpoint_continues_identically(tmp_path, options):
    pool = make_tiny_pool(num_prompts=5, num_responses=4)
    settings = {
        "max_steps": 8,
        "save_strategy": "steps",
        "save_steps": 4,
        "learning_rate": 3e-3,
        "per_device_train_batch_size": 2,  # 3 steps per epoch: the checkpoint falls mid-epoch
        "logging_steps": 1,
        "seed": 7,
        **options,
    }
    uninterrupted = CLaPTrainer(
        _backbone(), _config(tmp_path / "a", **settings), train_dataset=pool, processing_class=make_tiny_tokenizer()
    )
    uninterrupted.train()
    checkpoint = tmp_path / "a" / "clap" / "checkpoint-4"

    assert (checkpoint / "config.json").is_file()
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert saved and all(name.startswith(LATENT_PREFIXES) for name in saved), "model.safetensors holds base tensors"
    assert set(saved) == set(uninterrupted.model.latent_state_dict())
    assert (checkpoint / "base_model").is_dir() == (options.get("freeze_base") is False)

    resumed = CLaPTrainer(
        _backbone(), _config(tmp_path / "b", **settings), train_dataset=pool, processing_class=make_tiny_tokenizer()
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 8
    expected, found = uninterrupted.model.latent_state_dict(), resumed.model.latent_state_dict()
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], rtol=0, atol=1e-6, msg=f"{name} differs")
    if options.get("freeze_base") is False:
        expected_base = uninterrupted.model.get_base_model().state_dict()
        for name, tensor in resumed.model.get_base_model().state_dict().items():
            torch.testing.assert_close(tensor, expected_base[name], rtol=0, atol=1e-6, msg=f"{name} differs")


def test_best_checkpoint_restores_the_trained_base_too(tmp_path):
    # Recipe b with load_best_model_at_end: the best checkpoint (step 2, made "best" by greater_is_better) holds the
    # latent modules and the base; both must come back, not the best latents on top of the last step's base.
    pool = make_tiny_pool(num_prompts=4, num_responses=3)
    settings = {
        "freeze_base": False,
        "max_steps": 4,
        "learning_rate": 1e-2,
        "eval_strategy": "steps",
        "eval_steps": 2,
        "save_strategy": "steps",
        "save_steps": 2,
        "load_best_model_at_end": True,
        "metric_for_best_model": "eval_step_marker",
        "greater_is_better": True,
    }

    class EarlierIsBetter(TrainerCallback):
        # A metric that makes step 2 the best whatever the losses do (they may rise or fall in 4 steps).
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            metrics["eval_step_marker"] = -float(state.global_step)

    trainer = CLaPTrainer(
        _backbone(),
        _config(tmp_path, **settings),
        train_dataset=pool,
        eval_dataset=pool,
        processing_class=make_tiny_tokenizer(),
        callbacks=[EarlierIsBetter()],
    )
    trainer.train()
    best = tmp_path / "clap" / "checkpoint-2"
    assert trainer.state.best_model_checkpoint == str(best)
    saved_latent = load_file(str(best / "model.safetensors"))
    for name, tensor in trainer.model.latent_state_dict().items():
        if name == FISHER_KEY:  # measured after training, on the restored best model: no checkpoint holds it
            continue
        torch.testing.assert_close(tensor, saved_latent[name], rtol=0, atol=0, msg=f"{name} is not the best one")
    saved_base = {}
    for shard in sorted((best / "base_model").glob("*.safetensors")):
        saved_base.update(load_file(str(shard)))
    assert saved_base
    base_state = trainer.model.get_base_model().state_dict()
    for name, tensor in saved_base.items():
        torch.testing.assert_close(base_state[name], tensor, rtol=0, atol=0, msg=f"base {name} is not the best one")


def test_unfrozen_base_receives_gradients_and_changes(tmp_path):
    trainer = _trainer(tmp_path, freeze_base=False, max_steps=3, learning_rate=1e-3)
    model = trainer.model
    assert not model.is_base_frozen
    model.train()
    loss = trainer.compute_loss(model, next(iter(trainer.get_train_dataloader())))
    loss.backward()
    base_grads = _base_grads(model)
    assert _has_gradient(base_grads), "no base parameter got a gradient"
    assert _has_gradient({k: v for k, v in base_grads.items() if ".layers." in k or ".h." in k})
    model.zero_grad(set_to_none=True)

    before = {name: p.detach().clone() for name, p in model.get_base_model().named_parameters()}
    trainer.train()
    changed = [name for name, p in model.get_base_model().named_parameters() if not torch.equal(p, before[name])]
    assert changed, "no base parameter changed in training"


def test_gradient_skip_path_changes_no_value_but_carries_gradient():
    model = _backbone()  # llama: no dropout, so train-mode logits are deterministic
    model.enable_gradient_skip_path()
    skip = model.latent_adapter.skip
    assert skip is not None and skip.weight.requires_grad
    model.train()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 96, (3, 6), generator=generator)
    latents = torch.randn(3, LATENT_DIM, generator=generator)
    with_path = model(input_ids, latents=latents).logits
    model.latent_adapter.skip = None  # path disabled
    try:
        without_path = model(input_ids, latents=latents).logits
    finally:
        model.latent_adapter.skip = skip
    torch.testing.assert_close(with_path, without_path, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids, latents=latents).logits, with_path, rtol=0, atol=1e-6)
    with_path.logsumexp(-1).sum().backward()
    assert skip.weight.grad is not None and skip.weight.grad.abs().sum() > 0


def test_trainer_gradient_skip_path_trains_the_skip_weight(tmp_path):
    trainer = _trainer(tmp_path, gradient_skip_path=True)
    model = trainer.model.train()
    assert model.latent_adapter.skip is not None
    _perturb_encoder_head(model)
    trainer.compute_loss(model, next(iter(trainer.get_train_dataloader()))).backward()
    assert _has_gradient(_grads(model, "latent_adapter.skip."))
    assert all(g is None for g in _base_grads(model).values())


@pytest.mark.parametrize("kl_estimator", ["aggregate", "analytic"])
def test_trainer_smoke_on_every_family(tmp_path, family, kl_estimator):
    pool = make_tiny_pool(num_prompts=3, num_responses=3, chat=True)
    trainer = CLaPTrainer(
        _backbone(family),
        _config(tmp_path, max_steps=2, learning_rate=1e-2, logging_steps=1, kl_estimator=kl_estimator),
        train_dataset=pool,
        eval_dataset=pool,
        processing_class=make_tiny_tokenizer(),
    )
    before = {name: t.clone() for name, t in trainer.model.latent_state_dict().items()}
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    after = trainer.model.latent_state_dict()
    assert any(not torch.equal(after[name], before[name]) for name in before), "the latent modules did not move"
    metrics = trainer.evaluate()
    assert all(math.isfinite(value) for value in metrics.values())


# ----------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------
def test_empty_dataset_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        _trainer(tmp_path, pool=Dataset.from_dict({"prompt": [], "responses": []}))


def test_missing_columns_are_named(tmp_path):
    pool = Dataset.from_dict({"question": ["w5 w6"], "answers": [["w7", "w8"]]})
    with pytest.raises(ValueError, match="question") as error:
        _trainer(tmp_path, pool=pool)
    assert "answers" in str(error.value)


def test_missing_tokenizer_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="processing_class"):
        CLaPTrainer(_backbone(), _config(tmp_path), train_dataset=make_tiny_pool())


def _pool_with_a_lone_response() -> Dataset:
    return Dataset.from_dict(
        {"prompt": ["w5 w6", "w7", "w8 w9"], "responses": [["w10", "w11"], ["w12"], ["w13", "w14", "w15"]]}
    )


def test_prompt_with_one_response_is_skipped_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        trainer = _trainer(tmp_path, pool=_pool_with_a_lone_response(), max_steps=1)
    assert len(trainer.train_dataset) == 2
    assert all(len(r) >= 2 for r in trainer.train_dataset["responses_input_ids"])
    assert any("1 prompt" in record.getMessage() for record in caplog.records), caplog.text
    trainer.train()


def test_prompt_with_one_response_raises_when_asked(tmp_path):
    with pytest.raises(ValueError, match="fewer than 2 responses"):
        _trainer(tmp_path, pool=_pool_with_a_lone_response(), too_few_responses="error")


def test_prompt_with_one_response_is_kept_without_the_contrastive_term(tmp_path):
    trainer = _trainer(tmp_path, pool=_pool_with_a_lone_response(), contrastive_weight=0.0, max_steps=2)
    assert len(trainer.train_dataset) == 3
    trainer.train()


def test_pool_without_any_prompt_of_two_responses_is_rejected(tmp_path):
    pool = Dataset.from_dict({"prompt": ["w5", "w6"], "responses": [["w7"], ["w8"]]})
    with pytest.raises(ValueError, match="2 or more responses"):
        _trainer(tmp_path, pool=pool)


def test_long_prompts_and_responses_are_truncated_to_max_length(tmp_path, caplog):
    long = " ".join(f"w{10 + i}" for i in range(20))
    pool = Dataset.from_dict({"prompt": ["w5 w6", long], "responses": [[long, "w7"], [long, "w8 w9"]]})
    with caplog.at_level(logging.WARNING):
        trainer = _trainer(tmp_path, pool=pool, max_length=8, max_steps=2, per_device_train_batch_size=2)
    assert "truncated" in caplog.text
    eos = make_tiny_tokenizer().eos_token_id
    for row in trainer.train_dataset:
        for response in row["responses_input_ids"]:
            assert len(row["prompt_input_ids"]) + len(response) <= 8
            assert response[-1] == eos and len(response) >= 2, "a truncated response keeps a token and its EOS"
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[1] <= 8
    trainer.train()


@pytest.mark.parametrize(
    "options",
    [
        {"nll_weight": -1.0},
        {"kl_weight": -0.5},
        {"contrastive_weight": -1.0},
        {"kl_estimator": "x"},
        {"too_few_responses": "drop"},
        {"kl_samples": 0},
        {"contrastive_num_negatives": 0},
        {"responses_per_step": 1},
        {"max_length": 1},
        {"gradient_checkpointing": True},
        {"label_smoothing_factor": 0.1},
    ],
    ids=lambda options: next(iter(options)),
)
def test_invalid_config_values_are_rejected(tmp_path, options):
    name = next(iter(options))
    with pytest.raises(ValueError, match=name):
        _config(tmp_path, **options)


def test_kl_warmup_raises_the_kl_weight_linearly(tmp_path):
    trainer = _trainer(tmp_path, max_steps=4, kl_warmup_steps=4, kl_weight=2.0, logging_steps=1)
    trainer.train()
    weights = [log["loss/kl_weight"] for log in trainer.state.log_history if "loss/kl_weight" in log]
    assert weights == pytest.approx([0.0, 0.5, 1.0, 1.5])


def test_encoder_blocks_get_their_own_learning_rate(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2, learning_rate=1e-2, encoder_blocks_learning_rate=0.0, warmup_steps=0)
    blocks = {name: p.detach().clone() for name, p in trainer.model.latent_encoder.blocks.named_parameters()}
    head = trainer.model.latent_encoder.to_gaussian.weight.detach().clone()
    trainer.train()
    for name, tensor in trainer.model.latent_encoder.blocks.named_parameters():
        assert torch.equal(tensor, blocks[name]), f"{name} moved with learning rate 0"
    assert not torch.equal(trainer.model.latent_encoder.to_gaussian.weight, head)
    initial_lr = {id(p): group["initial_lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    assert {initial_lr[id(p)] for p in trainer.model.latent_encoder.blocks.parameters()} == {0.0}
    assert initial_lr[id(trainer.model.latent_encoder.to_gaussian.weight)] == pytest.approx(1e-2)
