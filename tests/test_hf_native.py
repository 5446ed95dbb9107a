"""Loading, saving and serving a backbone the way transformers users do it: `pipeline`, `AutoModelForCausalLM` with
the standard options (`dtype="auto"`, `subfolder`, `device_map`, ...), and no log lines of our own making."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import LATENT_DIM, make_tiny_base, make_tiny_tokenizer
from transformers import AutoModelForCausalLM, pipeline

import hf_prefalign.loading as loading
from hf_prefalign import PrefAlignForCausalLM
from hf_prefalign.utils.constants import EMBEDDED_DEFAULT_BASE


def _saved_backbone(tmp_path: Path, save_base: bool = False) -> Path:
    """A tiny Llama backbone (perturbed latent modules) and its tokenizer, saved as `<tmp>/parent/backbone`."""
    base_path = tmp_path / "base"
    make_tiny_base("llama").save_pretrained(base_path)
    model = PrefAlignForCausalLM.from_base(str(base_path), latent_dim=LATENT_DIM)
    with torch.no_grad():
        for parameter in model.latent_parameters():
            parameter.add_(0.05)
    folder = tmp_path / "parent" / "backbone"
    model.save_pretrained(folder, save_base=save_base)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("hf_prefalign")
    ]


@pytest.mark.parametrize("save_base", [False, True], ids=["frozen-base", "base-included"])
def test_pipeline_loads_a_saved_backbone_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture, save_base: bool):
    folder = _saved_backbone(tmp_path, save_base=save_base)
    with caplog.at_level(logging.WARNING):
        generator = pipeline("text-generation", model=str(folder))  # passes dtype="auto", adapter_kwargs, ...
    assert isinstance(generator.model, PrefAlignForCausalLM)
    assert _warnings(caplog) == []
    out = generator("w5 w6", max_new_tokens=3, do_sample=False, return_tensors=True)
    direct = PrefAlignForCausalLM.from_pretrained(folder).eval()
    ids = generator.tokenizer("w5 w6", return_tensors="pt")
    expected = direct.generate(**ids, max_new_tokens=3, do_sample=False)
    assert list(out[0]["generated_token_ids"]) == expected[0].tolist()


def test_subfolder_is_honoured_by_both_loaders(tmp_path: Path):
    folder = _saved_backbone(tmp_path)
    reference = PrefAlignForCausalLM.from_pretrained(folder)
    for loader in (PrefAlignForCausalLM, AutoModelForCausalLM):
        model = loader.from_pretrained(folder.parent, subfolder="backbone")
        assert isinstance(model, PrefAlignForCausalLM)
        torch.testing.assert_close(model.latent_state_dict(), reference.latent_state_dict(), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="missing"):
        PrefAlignForCausalLM.from_pretrained(folder.parent, subfolder="missing")


@pytest.mark.parametrize("save_base", [False, True], ids=["frozen-base", "base-included"])
def test_dtype_auto_and_named_dtypes(tmp_path: Path, save_base: bool):
    folder = _saved_backbone(tmp_path, save_base=save_base)
    auto = PrefAlignForCausalLM.from_pretrained(folder, dtype="auto")  # a Hub/local base: the checkpoint's dtype
    assert auto.language_model.dtype == torch.float32
    half = PrefAlignForCausalLM.from_pretrained(folder, dtype="float16")
    assert half.language_model.dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in half.latent_parameters())  # log-densities stay in fp32
    legacy = PrefAlignForCausalLM.from_pretrained(folder, torch_dtype=torch.float16)
    assert legacy.language_model.dtype == torch.float16


def test_dtype_auto_for_the_embedded_default_is_the_documented_precision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    asked = []

    def fake_default_base(dtype=torch.float32):
        asked.append(dtype)
        model = make_tiny_base("llama")
        model.name_or_path = model.config._name_or_path = EMBEDDED_DEFAULT_BASE
        return model, make_tiny_tokenizer()

    monkeypatch.setattr(loading, "load_default_base", fake_default_base)
    base, _ = fake_default_base()
    PrefAlignForCausalLM.from_base(base, latent_dim=LATENT_DIM).save_pretrained(tmp_path / "backbone")
    asked.clear()
    model = PrefAlignForCausalLM.from_pretrained(tmp_path / "backbone", dtype="auto")
    assert isinstance(model, PrefAlignForCausalLM)
    assert asked == ["auto"]  # load_default_base: bf16 where native, else fp32


def test_device_map_single_device_and_refusals(tmp_path: Path):
    folder = _saved_backbone(tmp_path)
    for device_map in ("cpu", torch.device("cpu"), {"": "cpu"}, "auto"):
        model = PrefAlignForCausalLM.from_pretrained(folder, device_map=device_map)
        assert {p.device.type for p in model.parameters()} == {"cpu"}
    with pytest.raises(ValueError, match="several devices"):
        PrefAlignForCausalLM.from_pretrained(folder, device_map={"model.layers.0": 0, "lm_head": "cpu"})
    with pytest.raises(ValueError, match="several devices"):
        PrefAlignForCausalLM.from_pretrained(folder, device_map="balanced")


def test_hub_options_are_forwarded_and_unknown_ones_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    import hf_prefalign.modeling.modeling_prefalign as modeling

    folder = _saved_backbone(tmp_path)
    seen = {}
    real_pull = modeling.pull_folder

    def spy(repo_id, **kwargs):
        seen.update(kwargs)
        return real_pull(repo_id, **kwargs)

    monkeypatch.setattr(modeling, "pull_folder", spy)
    with caplog.at_level(logging.WARNING):
        PrefAlignForCausalLM.from_pretrained(
            folder, revision="main", token=False, force_download=True, local_files_only=True, not_an_option=1
        )
    assert seen["revision"] == "main" and seen["force_download"] is True and seen["local_files_only"] is True
    assert seen["token"] is False
    assert _warnings(caplog) == ["PrefAlignForCausalLM.from_pretrained ignores ['not_an_option']."]


def _backbone_with_user(family: str = "qwen2") -> PrefAlignForCausalLM:
    from hf_prefalign import PreferenceEmbedding, PreferenceEmbeddingConfig

    model = PrefAlignForCausalLM.from_base(make_tiny_base(family), latent_dim=LATENT_DIM).eval()
    embedding = PreferenceEmbedding(
        PreferenceEmbeddingConfig(
            latent_dim=LATENT_DIM,
            feature_dim=model.config.text_config.hidden_size,
            backbone_fingerprint=model.fingerprint(),
        )
    )
    model.preferences.add("alice", embedding)
    return model


@pytest.mark.parametrize("as_list", [False, True], ids=["one-id", "id-per-row"])
def test_sampled_preference_gives_each_returned_sequence_its_own_z(monkeypatch: pytest.MonkeyPatch, as_list: bool):
    model = _backbone_with_user()
    drawn = []
    real = model.preference_latents

    def spy(*args, **kwargs):
        drawn.append(real(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(model, "preference_latents", spy)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    preference_id = ["alice", "alice"] if as_list else "alice"
    torch.manual_seed(0)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        preference_id=preference_id,
        preference_sampling="sample",
        num_return_sequences=3,
        max_new_tokens=2,
        do_sample=False,
    )
    assert out.shape[0] == 6 and out[:3, :3].eq(ids[0]).all() and out[3:, :3].eq(ids[1]).all()  # row-major order
    z = drawn[-1]
    assert z.shape == (6, LATENT_DIM)
    assert torch.cdist(z, z).add(torch.eye(6)).min() > 0, "two returned sequences share a z"

    model.generate(input_ids=ids, preference_id="alice", num_return_sequences=3, max_new_tokens=2, do_sample=True)
    assert drawn[-1].shape == (2, LATENT_DIM)  # the prior's mean: one z per prompt, shared by its sequences
