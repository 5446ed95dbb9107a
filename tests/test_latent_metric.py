"""The latent Fisher metric: the sampled estimate equals the exact Gauss-Newton Fisher and its quadratic form is the
per-token KL of a small z; CLaP measures it and the backbone saves it; Latent DPO and users from examples are scaled
to `target_kl`."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import LATENT_DIM, VOCAB, make_tiny_pool
from safetensors.torch import load_file, save_file
from transformers.utils import logging as hf_logging

from hf_prefalign import (
    CLaPConfig,
    CLaPTrainer,
    LatentDPOConfig,
    LatentDPOTrainer,
    PrefAlignForCausalLM,
    PreferenceEmbedding,
)
from hf_prefalign.data.pairs import preference_pairs_from_pool
from hf_prefalign.models.prefalign.latent_metric import latent_fisher, quadratic_kl
from hf_prefalign.models.prefalign.modeling_prefalign import FISHER_KEY
from hf_prefalign.scorers import get_scorer
from hf_prefalign.testing import make_tiny_base, make_tiny_tokenizer
from hf_prefalign.trainer import estimate_latent_metric
from hf_prefalign.utils.constants import DEFAULT_TARGET_KL, WEIGHTS_NAME


@pytest.fixture
def steered():
    torch.manual_seed(0)
    model = PrefAlignForCausalLM.from_base(make_tiny_base("llama"), latent_dim=LATENT_DIM).eval()
    torch.nn.init.normal_(model.latent_adapter.weight, std=0.3)
    input_ids = torch.randint(3, VOCAB, (6, 10))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # one left-padded row
    response_mask = torch.zeros_like(input_ids)
    response_mask[:, 4:] = 1
    return model, input_ids, attention_mask, response_mask


def _log_probs(model, input_ids, attention_mask, latents):
    return torch.log_softmax(model(input_ids, attention_mask=attention_mask, latents=latents).logits.float(), -1)


def _predicting(response_mask):
    predicts = torch.zeros_like(response_mask, dtype=torch.bool)
    predicts[:, :-1] = response_mask[:, 1:].bool()
    return predicts


def test_sampled_fisher_matches_the_exact_gauss_newton_fisher(steered):
    model, input_ids, attention_mask, response_mask = steered
    fisher_sum, count = latent_fisher(
        model, input_ids, attention_mask, response_mask, num_draws=400, generator=torch.Generator().manual_seed(0)
    )
    predicts = _predicting(response_mask)
    assert count == 400 * int(predicts.sum())
    sampled = fisher_sum / count

    def logits_of(z):
        return model(input_ids, attention_mask=attention_mask, latents=z.expand(input_ids.shape[0], -1)).logits.float()

    jacobian = torch.autograd.functional.jacobian(logits_of, torch.zeros(LATENT_DIM))[predicts]  # (N, V, Z)
    with torch.no_grad():
        probs = _log_probs(model, input_ids, attention_mask, None).exp()[predicts]  # (N, V)
    mean_direction = torch.einsum("nvz,nv->nz", jacobian, probs)
    exact = torch.einsum("nvz,nv,nvw->zw", jacobian, probs, jacobian) - mean_direction.T @ mean_direction
    exact = exact / predicts.sum()
    assert torch.linalg.matrix_norm(sampled - exact) < 0.1 * torch.linalg.matrix_norm(exact)

    # Its quadratic form is the per-token KL of a small z (second order).
    z = 0.002 * torch.randn(LATENT_DIM, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        steered_lp = _log_probs(model, input_ids, attention_mask, z.expand(input_ids.shape[0], -1))
        neutral_lp = _log_probs(model, input_ids, attention_mask, None)
    kl = (steered_lp.exp() * (steered_lp - neutral_lp)).sum(-1)[predicts].mean()
    assert float(0.5 * z @ exact @ z) == pytest.approx(float(kl), rel=0.05)


def test_fisher_needs_a_draw(steered):
    model, input_ids, attention_mask, response_mask = steered
    with pytest.raises(ValueError, match="num_draws"):
        latent_fisher(model, input_ids, attention_mask, response_mask, num_draws=0)


# ----------------------------------------------------------------------
# Measured after CLaP, saved with the backbone
# ----------------------------------------------------------------------
def _clap_backbone(tmp_path, **overrides):
    tokenizer = make_tiny_tokenizer()
    model = PrefAlignForCausalLM.from_base(make_tiny_base("llama"), latent_dim=LATENT_DIM)
    args = CLaPConfig(
        output_dir=str(tmp_path / "clap"), max_steps=1, report_to=[], save_strategy="no", use_cpu=True, **overrides
    )
    CLaPTrainer(model=model, args=args, train_dataset=make_tiny_pool(seed=4), processing_class=tokenizer).train()
    return model.eval(), tokenizer


def test_clap_measures_the_metric_and_the_backbone_saves_it(tmp_path):
    model, _ = _clap_backbone(tmp_path)
    fisher = model.latent_fisher
    assert fisher is not None and fisher.shape == (LATENT_DIM, LATENT_DIM)
    torch.testing.assert_close(fisher, fisher.T)
    assert float(torch.linalg.eigvalsh(fisher).min()) >= -1e-6 and float(fisher.trace()) > 0
    summary = model.training_summary["latent_metric"]
    assert summary["prompts"] == 6 and summary["trace"] == pytest.approx(float(fisher.trace()), abs=1e-4)
    model.save_pretrained(tmp_path / "backbone")
    loaded = PrefAlignForCausalLM.from_pretrained(tmp_path / "backbone", base_model=model.get_base_model())
    torch.testing.assert_close(loaded.latent_fisher, fisher)


def test_a_backbone_saved_before_the_metric_loads_without_it_and_keeps_its_fingerprint(tmp_path):
    model, _ = _clap_backbone(tmp_path)
    fingerprint = model.fingerprint()
    model.save_pretrained(tmp_path / "backbone")
    weights = tmp_path / "backbone" / WEIGHTS_NAME
    tensors = load_file(weights)
    del tensors[FISHER_KEY]
    save_file(tensors, weights, metadata={"format": "pt"})
    old = PrefAlignForCausalLM.from_pretrained(tmp_path / "backbone", base_model=model.get_base_model())
    assert old.latent_fisher is None
    assert old.fingerprint() == fingerprint  # the metric measures z; it does not change what z does


def test_latent_metric_prompts_zero_skips_it_and_negative_is_refused(tmp_path):
    model, _ = _clap_backbone(tmp_path, latent_metric_prompts=0)
    assert model.latent_fisher is None and model.training_summary["latent_metric"] is None
    with pytest.raises(ValueError, match="latent_metric_prompts"):
        CLaPConfig(output_dir="unused", latent_metric_prompts=-1)


# ----------------------------------------------------------------------
# Latent DPO puts every user at the target departure
# ----------------------------------------------------------------------
def _user(model, tokenizer, tmp_path, **overrides):
    pairs = preference_pairs_from_pool(make_tiny_pool(seed=5, num_responses=6), get_scorer("detailed"))
    args = LatentDPOConfig(
        output_dir=str(tmp_path / "user"), max_steps=3, latent_cache_dir="none", report_to=[], **overrides
    )
    trainer = LatentDPOTrainer(model, args, train_dataset=pairs, processing_class=tokenizer)
    trainer.train()
    return trainer, trainer.model


@pytest.mark.parametrize("prompt_dependent", [False, True])
def test_target_kl_scales_the_users_mean_to_that_departure(tmp_path, prompt_dependent):
    model, tokenizer = _clap_backbone(tmp_path)
    _, free = _user(model, tokenizer, tmp_path, prompt_dependent_prior=prompt_dependent, target_kl=None)
    trainer, scaled = _user(model, tokenizer, tmp_path, prompt_dependent_prior=prompt_dependent, target_kl=0.05)
    features = trainer.train_dataset[:]["features"]
    with torch.no_grad():
        free_means, scaled_means = free(features).mean, scaled(features).mean
        torch.testing.assert_close(scaled(features).logvar, free(features).logvar)
    departure = float(quadratic_kl(scaled_means, model.latent_fisher).mean())
    assert departure == pytest.approx(0.05, rel=1e-4)
    record = scaled.config.training
    assert record["target_kl"] == 0.05
    assert record["departure_before"] == pytest.approx(
        float(quadratic_kl(free_means, model.latent_fisher).mean()), rel=1e-4
    )
    torch.testing.assert_close(scaled_means, record["departure_scale"] * free_means)  # same direction, another length


def test_target_kl_without_a_metric_warns_and_keeps_the_trained_scale(tmp_path, caplog):
    model, tokenizer = _clap_backbone(tmp_path, latent_metric_prompts=0)
    _, free = _user(model, tokenizer, tmp_path, target_kl=None)
    hf_logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        _, kept = _user(model, tokenizer, tmp_path, target_kl=0.05)
    hf_logging.disable_propagation()
    assert "target_kl=0.05 is not applied" in caplog.text and "estimate_latent_metric" in caplog.text
    torch.testing.assert_close(kept.bias, free.bias)
    assert "target_kl" not in kept.config.training


def test_estimate_latent_metric_adds_it_to_a_frozen_backbone_without_training(tmp_path):
    model, tokenizer = _clap_backbone(tmp_path, latent_metric_prompts=0)
    model.save_pretrained(tmp_path / "old")
    frozen = PrefAlignForCausalLM.from_pretrained(tmp_path / "old", base_model=model.get_base_model())
    weights = {name: tensor.clone() for name, tensor in frozen.latent_state_dict().items()}
    fisher = estimate_latent_metric(frozen, make_tiny_pool(seed=4), tokenizer, num_prompts=2, seed=42)
    assert fisher is not None and torch.equal(frozen.latent_fisher, fisher)
    for name, tensor in frozen.latent_state_dict().items():
        if name != FISHER_KEY:
            assert torch.equal(tensor, weights[name]), f"{name} changed: no training step runs"
    # The trainer's own measurement is the same one (same pool, subset and draws: CLaPConfig's seed is 42).
    args = CLaPConfig(output_dir=str(tmp_path / "m"), report_to=[], save_strategy="no", use_cpu=True)
    trainer = CLaPTrainer(model=model, args=args, train_dataset=make_tiny_pool(seed=4), processing_class=tokenizer)
    torch.testing.assert_close(trainer.estimate_latent_metric(num_prompts=2), fisher)
    assert estimate_latent_metric(frozen, make_tiny_pool(seed=4), tokenizer, num_prompts=0) is None
    with pytest.raises(ValueError, match="num_prompts"):
        estimate_latent_metric(frozen, make_tiny_pool(seed=4), tokenizer, num_prompts=-1)


# ----------------------------------------------------------------------
# A user from examples: the examples give the direction, target_kl the distance
# ----------------------------------------------------------------------
def _liked(pool, count):
    return [{"prompt": row["prompt"], "response": row["responses"][0]} for row in pool.select(range(count))]


def test_from_examples_with_target_kl_keeps_the_direction_at_that_departure(tmp_path):
    model, tokenizer = _clap_backbone(tmp_path)
    examples = _liked(make_tiny_pool(seed=6), 3)
    free = PreferenceEmbedding.from_examples(model, tokenizer, examples, target_kl=None)
    scaled = PreferenceEmbedding.from_examples(model, tokenizer, examples, target_kl=0.05)
    default = PreferenceEmbedding.from_examples(model, tokenizer, examples)
    features = torch.zeros(1, free.config.feature_dim)  # the prior is the same for every prompt
    with torch.no_grad():
        free_prior, scaled_prior = free(features), scaled(features)
        default_departure = float(quadratic_kl(default(features).mean, model.latent_fisher))
    assert float(quadratic_kl(scaled_prior.mean, model.latent_fisher)) == pytest.approx(0.05, rel=1e-4)
    assert default_departure == pytest.approx(DEFAULT_TARGET_KL, rel=1e-4)  # the trained users' departure
    assert LatentDPOConfig(output_dir="unused").target_kl == DEFAULT_TARGET_KL
    record = scaled.config.training
    assert record["target_kl"] == 0.05 and record["departure_scale"] != pytest.approx(1.0)
    assert record["departure_before"] == pytest.approx(
        float(quadratic_kl(free_prior.mean, model.latent_fisher)), rel=1e-4
    )
    torch.testing.assert_close(scaled_prior.mean, record["departure_scale"] * free_prior.mean)
    torch.testing.assert_close(scaled_prior.logvar, free_prior.logvar)  # the spread of the examples is kept
    assert "target_kl" not in free.config.training


def test_from_examples_target_kl_without_a_metric_warns_and_bad_values_are_refused(tmp_path, caplog):
    model, tokenizer = _clap_backbone(tmp_path, latent_metric_prompts=0)
    examples = _liked(make_tiny_pool(seed=6), 2)
    free = PreferenceEmbedding.from_examples(model, tokenizer, examples, target_kl=None)
    hf_logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        kept = PreferenceEmbedding.from_examples(model, tokenizer, examples, target_kl=0.05)
    hf_logging.disable_propagation()
    assert "target_kl=0.05 is not applied" in caplog.text and "estimate_latent_metric" in caplog.text
    torch.testing.assert_close(kept.bias, free.bias)
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="target_kl"):
            PreferenceEmbedding.from_examples(model, tokenizer, examples, target_kl=bad)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_target_kl_is_refused(bad):
    with pytest.raises(ValueError, match="target_kl"):
        LatentDPOConfig(output_dir="unused", target_kl=bad)
    assert LatentDPOConfig(output_dir="unused", target_kl="none").target_kl is None  # the CLI's spelling
