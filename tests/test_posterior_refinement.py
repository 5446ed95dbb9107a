"""Semi-amortised posterior: gradient steps on the encoder's mean (`PrefAlignConfig.posterior_refinement_steps`)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import LATENT_DIM, make_tiny_pool

from hf_prefalign import PrefAlignConfig, PrefAlignForCausalLM
from hf_prefalign.models.prefalign.likelihood import sequence_log_likelihood
from hf_prefalign.testing import make_tiny_base, make_tiny_tokenizer
from hf_prefalign.trainer import CLaPConfig, CLaPTrainer


PROMPTS = [[5, 6, 7, 8], [11, 12, 13]]
RESPONSES = [[9, 10, 2], [14, 15, 16, 17, 2]]


def _refining(base, step_size: float = 0.05) -> PrefAlignForCausalLM:
    return PrefAlignForCausalLM.from_base(
        base, latent_dim=LATENT_DIM, posterior_refinement_steps=1, posterior_refinement_step_size=step_size
    ).eval()


def _right_padded() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt + response rows, right-padded: `(input_ids, attention_mask, response_mask)`."""
    rows = [p + r for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask, response_mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (prompt, row) in enumerate(zip(PROMPTS, rows, strict=True)):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        response_mask[i, len(prompt) : len(row)] = 1
    return ids, mask, response_mask


def _log_likelihood(model, ids, mask, response_mask, latents) -> torch.Tensor:
    labels = ids.masked_fill(~(response_mask.bool() & mask.bool()), -100)
    with torch.no_grad():
        return sequence_log_likelihood(model(input_ids=ids, attention_mask=mask, latents=latents).logits, labels)[0]


def test_a_step_moves_the_mean_by_its_length_and_raises_the_likelihood(base):
    model = _refining(base)
    ids, mask, response_mask = _right_padded()
    with torch.no_grad():  # caches and metrics encode without grad: the refinement must still work
        refined = model.posterior(ids, mask, response_mask)
        amortised = model.posterior(ids, mask, response_mask, refinement_steps=0)
    torch.testing.assert_close((refined.mean - amortised.mean).norm(dim=-1), torch.full((2,), 0.05))
    assert torch.equal(refined.logvar, amortised.logvar)
    gain = _log_likelihood(model, ids, mask, response_mask, refined.mean) - _log_likelihood(
        model, ids, mask, response_mask, amortised.mean
    )
    assert (gain > 0).all(), gain
    assert all(p.grad is None for p in model.parameters()), "refinement must not touch parameter gradients"


def test_refinement_of_a_row_ignores_the_rest_of_the_batch_and_its_padding(base):
    model = _refining(base, step_size=1.0)
    ids, mask, response_mask = _right_padded()
    batch = model.posterior(ids, mask, response_mask)
    for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        alone = model.posterior(
            torch.tensor([prompt + response]), response_mask=torch.tensor([[0] * len(prompt) + [1] * len(response)])
        )
        torch.testing.assert_close(batch.mean[row], alone.mean[0], atol=1e-4, rtol=1e-4)


def test_refinement_needs_the_response(base):
    with pytest.raises(ValueError, match="response_mask"):
        _refining(base).posterior(torch.tensor([[5, 6, 7]]))


def test_refinement_gradient_reaches_the_encoder_through_the_amortised_mean_only(base):
    model = _refining(base).train()
    ids, mask, response_mask = _right_padded()
    model.posterior(ids, mask, response_mask).mean.sum().backward()
    assert model.latent_encoder.to_gaussian.weight.grad.abs().sum() > 0
    assert model.latent_adapter.weight.grad is None, "the step direction is a constant for autograd"


def test_settings_are_validated_enter_the_fingerprint_and_load_as_overrides(base, tmp_path):
    with pytest.raises(ValueError, match="posterior_refinement_steps"):
        PrefAlignConfig(text_config=base.config.to_dict(), posterior_refinement_steps=-1)
    with pytest.raises(ValueError, match="posterior_refinement_step_size"):
        PrefAlignConfig(text_config=base.config.to_dict(), posterior_refinement_step_size=0.0)
    plain = PrefAlignForCausalLM.from_base(base, latent_dim=LATENT_DIM).eval()
    plain.save_pretrained(tmp_path / "backbone")
    loaded = PrefAlignForCausalLM.from_pretrained(
        tmp_path / "backbone", base_model=base, posterior_refinement_steps=2, posterior_refinement_step_size=0.5
    )
    assert (loaded.config.posterior_refinement_steps, loaded.config.posterior_refinement_step_size) == (2, 0.5)
    # Users trained on refined posteriors live in another latent space: they must not load onto the plain backbone.
    assert loaded.fingerprint() != plain.fingerprint()
    assert PrefAlignForCausalLM.from_pretrained(tmp_path / "backbone", base_model=base).fingerprint() == (
        plain.fingerprint()
    )


def test_clap_trains_with_a_refined_posterior(tmp_path):
    model = _refining(make_tiny_base("llama"), step_size=1.0)
    config = CLaPConfig(
        output_dir=str(tmp_path / "clap"),
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
        max_steps=2,
        logging_steps=1,
    )
    trainer = CLaPTrainer(
        model,
        config,
        train_dataset=make_tiny_pool(num_prompts=2, num_responses=3),
        processing_class=make_tiny_tokenizer(),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss/nll" in entry]
    assert len(logs) == 2 and all(math.isfinite(entry["loss"]) for entry in logs)
