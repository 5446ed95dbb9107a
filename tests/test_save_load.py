"""save_pretrained / from_pretrained of backbones: frozen base (latent modules + reference) and trained base (whole)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import LATENT_DIM, left_padded_batch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_prefalign import PrefAlignForCausalLM
from hf_prefalign.testing import make_tiny_base


def _train_latent_modules(model: PrefAlignForCausalLM) -> None:
    """Give the latent modules non-initial values so a lost tensor would show in the outputs."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.latent_parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


def _outputs(model: PrefAlignForCausalLM) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    input_ids, attention_mask = left_padded_batch([5, 3])
    latents = torch.linspace(-2, 2, 2 * LATENT_DIM).view(2, LATENT_DIM)
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask, latents=latents).logits
        posterior = model.posterior(input_ids, attention_mask)
    return logits, posterior.mean, posterior.logvar


@pytest.fixture
def saved_base_path(family, tmp_path):
    """A tiny base saved to disk, so a frozen-base backbone can reference it by path."""
    path = tmp_path / "base"
    make_tiny_base(family).save_pretrained(path)
    return path


def test_frozen_base_round_trip(saved_base_path, tmp_path):
    model = PrefAlignForCausalLM.from_base(str(saved_base_path), latent_dim=LATENT_DIM).eval()
    _train_latent_modules(model)
    model.save_pretrained(tmp_path / "backbone")

    files = sorted(p.name for p in (tmp_path / "backbone").iterdir())
    assert files == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    saved = load_file(tmp_path / "backbone" / "model.safetensors")
    assert all(name.startswith(("latent_encoder.", "latent_adapter.")) for name in saved)
    config = json.loads((tmp_path / "backbone" / "config.json").read_text())
    assert config["base_model_name_or_path"] == str(saved_base_path)
    assert config["base_included"] is False
    assert config["text_config"]["model_type"] == model.config.text_config.model_type

    for loader in (PrefAlignForCausalLM, AutoModelForCausalLM):
        reloaded = loader.from_pretrained(tmp_path / "backbone")
        assert isinstance(reloaded, PrefAlignForCausalLM)
        assert reloaded.is_base_frozen
        for a, b in zip(_outputs(model), _outputs(reloaded), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_trained_base_is_saved_whole(base, tmp_path):
    model = PrefAlignForCausalLM.from_base(base, latent_dim=LATENT_DIM, freeze_base=False).eval()
    _train_latent_modules(model)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1.5)  # "trained" base weights that only a full save preserves
    model.save_pretrained(tmp_path / "backbone")
    assert (tmp_path / "backbone" / "base_model" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "backbone" / "config.json").read_text())["base_included"] is True

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "backbone")
    for a, b in zip(_outputs(model), _outputs(reloaded), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resaving_frozen_over_full_removes_the_stale_base(base, tmp_path):
    model = PrefAlignForCausalLM.from_base(base, latent_dim=LATENT_DIM, freeze_base=False)
    model.save_pretrained(tmp_path / "backbone")
    model.freeze_base()
    model.save_pretrained(tmp_path / "backbone", save_base=False)
    assert not (tmp_path / "backbone" / "base_model").exists()
    leftovers = [p.name for p in (tmp_path / "backbone").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_explicit_base_model_argument(base, tmp_path):
    model = PrefAlignForCausalLM.from_base(base, latent_dim=LATENT_DIM).eval()
    _train_latent_modules(model)
    model.save_pretrained(tmp_path / "backbone")
    reloaded = PrefAlignForCausalLM.from_pretrained(tmp_path / "backbone", base_model=model.get_base_model())
    for a, b in zip(_outputs(model), _outputs(reloaded), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_interrupted_save_keeps_the_previous_checkpoint(base, tmp_path, monkeypatch):
    model = PrefAlignForCausalLM.from_base(base, latent_dim=LATENT_DIM).eval()
    model.save_pretrained(tmp_path / "backbone")
    before = (tmp_path / "backbone" / "model.safetensors").read_bytes()

    _train_latent_modules(model)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("hf_prefalign.utils.serialization.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path / "backbone")
    assert (tmp_path / "backbone" / "model.safetensors").read_bytes() == before
    assert [p.name for p in (tmp_path / "backbone").iterdir() if p.name.startswith(".")] == []


def test_missing_base_names_the_reference(saved_base_path, tmp_path):
    model = PrefAlignForCausalLM.from_base(str(saved_base_path), latent_dim=LATENT_DIM)
    model.save_pretrained(tmp_path / "backbone")
    for child in saved_base_path.iterdir():
        child.unlink()
    saved_base_path.rmdir()
    with pytest.raises(OSError, match=str(saved_base_path)):
        PrefAlignForCausalLM.from_pretrained(tmp_path / "backbone")


def test_corrupt_weights_file_is_named(base, tmp_path):
    model = PrefAlignForCausalLM.from_base(base, latent_dim=LATENT_DIM)
    model.save_pretrained(tmp_path / "backbone")
    weights = tmp_path / "backbone" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(OSError, match="corrupt"):
        PrefAlignForCausalLM.from_pretrained(tmp_path / "backbone", base_model=model.get_base_model())


def test_weights_of_another_backbone_are_rejected(base, tmp_path):
    PrefAlignForCausalLM.from_base(base, latent_dim=LATENT_DIM).save_pretrained(tmp_path / "a")
    other = PrefAlignForCausalLM.from_base(make_tiny_base("llama"), latent_dim=4)
    other.save_pretrained(tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").write_bytes((tmp_path / "b" / "model.safetensors").read_bytes())
    with pytest.raises(OSError, match="model.safetensors"):
        PrefAlignForCausalLM.from_pretrained(tmp_path / "a", base_model=base)


def test_loading_a_plain_model_directory_says_what_it_found(saved_base_path, family):
    with pytest.raises(ValueError, match=f"holds a '{family}' model"):
        PrefAlignForCausalLM.from_pretrained(saved_base_path)


def test_refuses_to_save_into_a_file(base, tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(ValueError, match="must be a directory"):
        PrefAlignForCausalLM.from_base(base, latent_dim=LATENT_DIM).save_pretrained(target)


def test_base_of_another_architecture_is_rejected(base, tmp_path):
    PrefAlignForCausalLM.from_base(base, latent_dim=LATENT_DIM).save_pretrained(tmp_path / "backbone")
    other = make_tiny_base("gpt2" if base.config.model_type != "gpt2" else "llama")
    with pytest.raises(ValueError, match="does not match"):
        PrefAlignForCausalLM.from_pretrained(tmp_path / "backbone", base_model=other)


def test_training_summary_is_saved_beside_the_config_not_in_it(base, tmp_path):
    model = PrefAlignForCausalLM.from_base(base, latent_dim=LATENT_DIM)
    model.training_summary = {"method": "clap", "steps": 3}
    model.save_pretrained(tmp_path / "backbone")
    assert "training_summary" not in json.loads((tmp_path / "backbone" / "config.json").read_text())
    loaded = PrefAlignForCausalLM.from_pretrained(tmp_path / "backbone", base_model=model.get_base_model())
    assert loaded.training_summary == {"method": "clap", "steps": 3}

    model.training_summary = None  # a resave without provenance leaves none behind
    model.save_pretrained(tmp_path / "backbone")
    assert not (tmp_path / "backbone" / "training_summary.json").exists()


def test_training_summary_of_an_older_config_moves_to_the_model(base, tmp_path):
    model = PrefAlignForCausalLM.from_base(base, latent_dim=LATENT_DIM)
    model.save_pretrained(tmp_path / "backbone")
    config_file = tmp_path / "backbone" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "training_summary": {"steps": 5}}))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "backbone", base_model=model.get_base_model())
    assert loaded.training_summary == {"steps": 5}
    assert "training_summary" not in loaded.config.to_dict()


def test_corrupt_training_summary_is_named(base, tmp_path):
    model = PrefAlignForCausalLM.from_base(base, latent_dim=LATENT_DIM)
    model.training_summary = {"steps": 1}
    model.save_pretrained(tmp_path / "backbone")
    (tmp_path / "backbone" / "training_summary.json").write_text("[1, 2]")
    with pytest.raises(OSError, match="training_summary.json must hold a JSON object"):
        PrefAlignForCausalLM.from_pretrained(tmp_path / "backbone", base_model=model.get_base_model())
