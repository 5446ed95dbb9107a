"""Loading, saving and serving a backbone the way transformers users do it: `pipeline`, `AutoModelForCausalLM` with
the standard options (`dtype="auto"`, `subfolder`, `device_map`, ...), and no log lines of our own making."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from helpers import LATENT_DIM
from transformers import AutoModelForCausalLM, pipeline

import hf_prefalign.integrations.embedded as embedded
from hf_prefalign import PrefAlignForCausalLM
from hf_prefalign.testing import make_tiny_base, make_tiny_tokenizer
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

    def fake_default_base(dtype=torch.float32, device="cpu"):
        asked.append(dtype)
        model = make_tiny_base("llama")
        model.name_or_path = model.config._name_or_path = EMBEDDED_DEFAULT_BASE
        return model, make_tiny_tokenizer()

    monkeypatch.setattr(embedded, "load_default_base", fake_default_base)
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
    import hf_prefalign.models.prefalign.modeling_prefalign as modeling

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


# ----------------------------------------------------------------------
# PEFT: LoRA on a backbone's base, bases with adapters, trainability, parameter counts
# ----------------------------------------------------------------------
def _saved_base(tmp_path: Path, family: str = "llama") -> Path:
    path = tmp_path / "base"
    make_tiny_base(family).save_pretrained(path)
    return path


@pytest.mark.parametrize("adapter_type", ["prefix", "residual"])
def test_lora_on_a_backbone_leaves_the_latent_modules_alone(tmp_path: Path, adapter_type: str):
    from peft import LoraConfig, PeftModel, get_peft_model

    from hf_prefalign import LATENT_MODULES_PATTERN

    backbone = PrefAlignForCausalLM.from_base(
        str(_saved_base(tmp_path)), latent_dim=LATENT_DIM, encoder_type="blocks", adapter_type=adapter_type
    ).eval()
    # The encoder's blocks are copies of the base's: `target_modules` alone would match their q_proj / v_proj too.
    assert any(name.startswith("latent_encoder.") and name.endswith("q_proj") for name, _ in backbone.named_modules())
    latent_before = {name: tensor.clone() for name, tensor in backbone.latent_state_dict().items()}
    config = LoraConfig(
        target_modules=["q_proj", "v_proj"], exclude_modules=LATENT_MODULES_PATTERN, init_lora_weights=False
    )
    peft_model = get_peft_model(backbone, config)

    wrapped = [name for name, module in backbone.named_modules() if hasattr(module, "lora_A")]
    assert len(wrapped) == 2 * 3 and all(name.startswith("language_model.") for name in wrapped), wrapped
    latent_after = backbone.latent_state_dict()
    assert latent_after.keys() == latent_before.keys()
    for name, tensor in latent_before.items():
        assert torch.equal(latent_after[name], tensor), name

    ids = torch.tensor([[5, 6, 7, 8]])
    z = torch.randn(1, LATENT_DIM, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = peft_model(input_ids=ids, latents=z).logits
        with peft_model.disable_adapter():
            assert not torch.allclose(peft_model(input_ids=ids, latents=z).logits, logits)  # LoRA acts on the base
        assert not torch.allclose(peft_model(input_ids=ids).logits, logits)  # and z still steers it

    with pytest.raises(TypeError, match="backbone already"):  # e.g. `CLaPTrainer(peft_model)`, which calls from_base
        PrefAlignForCausalLM.from_base(peft_model)

    # The adapters are the PeftModel's to save; the backbone saves its latent modules and the base reference only.
    with pytest.raises(ValueError, match="carries PEFT adapters"):
        backbone.save_pretrained(tmp_path / "whole", save_base=True)
    peft_model.save_pretrained(tmp_path / "lora")
    backbone.save_pretrained(tmp_path / "backbone")
    assert not (tmp_path / "backbone" / "base_model").exists()
    reloaded = PeftModel.from_pretrained(
        PrefAlignForCausalLM.from_pretrained(tmp_path / "backbone"), tmp_path / "lora"
    )
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, latents=z).logits, logits, rtol=0, atol=0)


def test_from_base_merges_a_peft_model_and_saves_the_merged_base_whole(tmp_path: Path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        make_tiny_base("llama"), LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    with pytest.raises(ValueError, match="The base model .LlamaForCausalLM. carries PEFT adapters"):
        PrefAlignForCausalLM.from_base(peft_model.get_base_model())  # adapters injected, no PeftModel to merge them

    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    backbone = PrefAlignForCausalLM.from_base(peft_model, latent_dim=LATENT_DIM)
    assert backbone.config.base_included and not [m for m in backbone.modules() if hasattr(m, "lora_A")]
    backbone.save_pretrained(tmp_path / "backbone")
    assert (tmp_path / "backbone" / "base_model" / "config.json").is_file(), "the merged weights are no named base's"
    reloaded = PrefAlignForCausalLM.from_pretrained(tmp_path / "backbone")  # frozen, for inference
    reloaded.save_pretrained(tmp_path / "again")  # a base of its own is saved again, trainable or not
    for model in (backbone, reloaded, PrefAlignForCausalLM.from_pretrained(tmp_path / "again")):
        with torch.no_grad():  # z = 0 is the base (the residual adapter adds nothing): the LoRA-tuned model
            torch.testing.assert_close(model(input_ids=ids).logits, expected)


@pytest.mark.parametrize("save_base", [False, True], ids=["frozen-base", "base-included"])
def test_from_pretrained_is_trainable(tmp_path: Path, save_base: bool):
    folder = _saved_backbone(tmp_path, save_base=save_base)
    for loader in (PrefAlignForCausalLM, AutoModelForCausalLM):
        frozen = loader.from_pretrained(folder)
        assert not frozen.training and frozen.get_nb_trainable_parameters()[0] == 0
        assert not any(p.requires_grad for p in frozen.parameters())

    trainable = PrefAlignForCausalLM.from_pretrained(folder, is_trainable=True)
    assert trainable.training
    assert all(p.requires_grad for p in trainable.latent_parameters())
    assert trainable.is_base_frozen is not save_base  # a base saved inside the backbone was trained: it trains on
    latent_ids = {id(p) for p in trainable.latent_parameters()}
    others = [p.requires_grad for p in trainable.parameters() if id(p) not in latent_ids]
    assert others and all(flag is save_base for flag in others)


def test_clap_trainer_refuses_a_backbone_with_frozen_latent_modules(tmp_path: Path):
    from peft import LoraConfig, get_peft_model

    from hf_prefalign import LATENT_MODULES_PATTERN, CLaPConfig, CLaPTrainer

    args = CLaPConfig(output_dir=str(tmp_path / "clap"), use_cpu=True, report_to="none")
    frozen = PrefAlignForCausalLM.from_pretrained(_saved_backbone(tmp_path))
    with pytest.raises(ValueError, match=r"from_pretrained\(path, is_trainable=True\)"):
        CLaPTrainer(frozen, args=args, processing_class=make_tiny_tokenizer())
    backbone = PrefAlignForCausalLM.from_base(make_tiny_base("llama"), latent_dim=LATENT_DIM)
    peft_model = get_peft_model(
        backbone, LoraConfig(target_modules=["q_proj"], exclude_modules=LATENT_MODULES_PATTERN)
    )
    with pytest.raises(TypeError, match="backbone already"):
        CLaPTrainer(peft_model, args=args, processing_class=make_tiny_tokenizer())
    with pytest.raises(ValueError, match="`get_peft_model` also freezes everything but its adapters"):
        CLaPTrainer(backbone, args=args, processing_class=make_tiny_tokenizer())


def test_trainable_parameter_counts_match_peft(capsys: pytest.CaptureFixture):
    model = PrefAlignForCausalLM.from_base(make_tiny_base("llama"), latent_dim=LATENT_DIM)  # tied embeddings
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert model.get_nb_trainable_parameters() == (model.num_latent_parameters(), total)
    model.print_trainable_parameters()
    trainable = model.num_latent_parameters()
    expected = (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )
    assert capsys.readouterr().out == expected + "\n"  # PEFT's line, so logs that parse it keep working
    model.unfreeze_base()
    assert model.get_nb_trainable_parameters() == (total, total)
