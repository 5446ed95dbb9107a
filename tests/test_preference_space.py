"""The preference-space design: hidden-instruction pools, the hidden-state encoder, the residual adapter (z = 0 is the
base), the PCA start of CLaP, the bf16 path, the no-signal warning and the preference-strength dial."""

from __future__ import annotations

import json
import logging
import threading

import pytest
import torch
from helpers import LATENT_DIM, VOCAB, make_tiny_pool
from transformers.utils import logging as hf_logging

from hf_prefalign import (
    CLaPConfig,
    CLaPTrainer,
    LatentDPOConfig,
    LatentDPOTrainer,
    PrefAlignForCausalLM,
)
from hf_prefalign.data.pairs import preference_pairs_from_pool
from hf_prefalign.data.pools import build_response_pool, instructed_prompt, load_style_instructions
from hf_prefalign.data.prompts import tokenize_prompt
from hf_prefalign.models.prefalign.hidden_state_encoder import read_hidden_states
from hf_prefalign.scorers import get_scorer
from hf_prefalign.scorers.style import exclamation_share, list_share, question_share
from hf_prefalign.testing import make_tiny_base, make_tiny_tokenizer
from hf_prefalign.trainer.clap_init import CALIBRATION_SCALES, init_latent_space_from_pool, pool_features
from hf_prefalign.utils import precision


def _greedy(model, ids, **kwargs):
    return model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6, pad_token_id=0, **kwargs
    )


# ----------------------------------------------------------------------
# Pools with hidden style instructions
# ----------------------------------------------------------------------
def test_bundled_instruction_bank_is_diverse():
    bank = load_style_instructions()
    assert len(bank) >= 30 and "" in bank  # one plain prompt among them
    assert len(set(bank)) == len(bank)


@pytest.mark.parametrize(
    ("source", "message"),
    [([], "at least 2"), (["only one"], "at least 2"), ("/nonexistent/bank.jsonl", "No style instruction file")],
)
def test_bad_instruction_banks_are_refused(source, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_style_instructions(source)


def test_invalid_jsonl_bank_names_the_line(tmp_path):
    path = tmp_path / "bank.jsonl"
    path.write_text('{"instruction": "Be brief."}\n{not json}\n')
    with pytest.raises(ValueError, match="line 2"):
        load_style_instructions(path)


def test_instruction_goes_into_the_last_user_turn_only():
    prompt = [{"role": "user", "content": "Plan a picnic."}]
    assert instructed_prompt(prompt, "Be brief.") == [{"role": "user", "content": "Plan a picnic.\n\nBe brief."}]
    assert prompt[0]["content"] == "Plan a picnic."  # the input is not modified
    assert instructed_prompt(prompt, "") is prompt
    assert instructed_prompt("Once upon", "Be brief.") == "Be brief.\n\nOnce upon"


def test_pool_records_hidden_instructions_that_clap_never_sees():
    base, tokenizer = make_tiny_base("llama"), make_tiny_tokenizer()
    prompts = [[{"role": "user", "content": "w5 w6"}], [{"role": "user", "content": "w7"}]]
    bank = ["", "w30 w31", "w40", "w50 w51 w52"]
    pool = build_response_pool(
        base, tokenizer, prompts, num_responses=4, max_new_tokens=4, style_instructions=bank, seed=1
    )
    assert pool.column_names == ["prompt", "instructions", "responses"]
    for row in pool:
        assert sorted(row["instructions"]) == sorted(bank)  # K different instructions while the bank allows
        assert len(row["responses"]) == 4
    again = build_response_pool(
        base, tokenizer, prompts, num_responses=4, max_new_tokens=4, style_instructions=bank, seed=1
    )
    assert again["responses"] == pool["responses"] and again["instructions"] == pool["instructions"]
    prepared = CLaPTrainer._prepare_dataset(pool, tokenizer, CLaPConfig(output_dir="unused", report_to=[]), "train")
    for row, prompt in zip(prepared, prompts, strict=True):
        assert list(row["prompt_input_ids"]) == tokenize_prompt(tokenizer, prompt)


def test_overlong_instructed_prompts_are_truncated_with_a_count(caplog):
    base, tokenizer = make_tiny_base("llama"), make_tiny_tokenizer()
    prompts = [[{"role": "user", "content": " ".join(["w9"] * 40)}]]
    with caplog.at_level(logging.WARNING):
        hf_logging.enable_propagation()
        pool = build_response_pool(
            base,
            tokenizer,
            prompts,
            num_responses=2,
            max_new_tokens=2,
            style_instructions=["", "w8"],
            max_prompt_length=16,
        )
        hf_logging.disable_propagation()
    assert len(pool[0]["responses"]) == 2
    assert "2 prompt(s) exceeded 16 tokens (max_prompt_length=16" in caplog.text


# ----------------------------------------------------------------------
# Hidden-state encoder
# ----------------------------------------------------------------------
def test_encoder_reads_the_mid_layer_state_of_the_response(family):
    base = make_tiny_base(family)
    model = PrefAlignForCausalLM.from_base(base, latent_dim=LATENT_DIM).eval()
    layer = model.config.resolved_encoder_layer
    ids = torch.randint(3, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = base(input_ids=ids, output_hidden_states=True).hidden_states[layer]  # input of `layer`
    (states,) = read_hidden_states(base, model.layout, [layer], ids, mask)
    torch.testing.assert_close(states, expected)
    response_mask = torch.zeros_like(ids)
    response_mask[:, 4:] = 1
    features = model.latent_encoder.response_features(base, model.layout, ids, mask, response_mask)
    torch.testing.assert_close(features, expected[:, 4:].mean(1))


def test_encoder_pass_stops_at_its_layer():
    base = make_tiny_base("llama")
    model = PrefAlignForCausalLM.from_base(base, latent_dim=LATENT_DIM).eval()
    calls = []
    handles = [
        layer.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, layer in enumerate(base.model.layers)
    ]
    model.posterior(torch.randint(3, VOCAB, (1, 5)))
    for handle in handles:
        handle.remove()
    assert calls == list(range(model.config.resolved_encoder_layer))


def test_untrained_encoder_is_the_prior_and_prompt_features_are_normalised():
    model = PrefAlignForCausalLM.from_base(make_tiny_base("gpt2"), latent_dim=LATENT_DIM, posterior_init_logvar=-2.0)
    posterior = model.eval().posterior(torch.randint(3, VOCAB, (3, 5)))
    assert torch.equal(posterior.mean, torch.zeros(3, LATENT_DIM))
    assert torch.equal(posterior.logvar, torch.full((3, LATENT_DIM), -2.0))
    features = model.prompt_features(torch.randint(3, VOCAB, (3, 5)))
    assert features.shape == (3, model.config.text_config.hidden_size) and features.dtype == torch.float32
    torch.testing.assert_close(features.mean(-1), torch.zeros(3), atol=1e-4, rtol=0)
    assert bool((features.std(-1) > 0.5).all())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"encoder_type": "mlp"}, "encoder_type"),
        ({"adapter_type": "lora"}, "adapter_type"),
        ({"encoder_layer": 0}, "between 1 and 2"),
        ({"steering_layers": [1, 3]}, "between 1 and 2"),
        ({"steering_layers": [1, 1]}, "twice"),
        ({"steering_layers": []}, "non-empty"),
        ({"steering_layers": "all"}, "'auto' or None"),
    ],
)
def test_bad_design_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        PrefAlignForCausalLM.from_base(make_tiny_base("llama"), latent_dim=LATENT_DIM, **options)


@pytest.mark.parametrize(
    ("num_layers", "encoder_layer", "expected"),
    [(30, None, [8, 15, 22]), (4, None, [1, 2, 3]), (3, None, [1]), (8, 2, [2, 4])],
)
def test_auto_steering_layers_are_resolved_and_saved_as_a_list(tmp_path, num_layers, encoder_layer, expected):
    base = make_tiny_base("llama", num_hidden_layers=num_layers)
    model = PrefAlignForCausalLM.from_base(base, latent_dim=LATENT_DIM, encoder_layer=encoder_layer)
    assert model.config.steering_layers == expected  # "auto" -> the encoder layer and a quarter of the depth around
    assert model.latent_adapter.weight.shape[0] == len(expected)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["steering_layers"] == expected


def test_a_backbone_saved_with_steering_layers_null_keeps_its_single_layer(tmp_path):
    """Backbones saved before "auto" hold `null`, which still means the encoder layer alone."""
    base = make_tiny_base("llama", num_hidden_layers=4)
    model = PrefAlignForCausalLM.from_base(base, latent_dim=LATENT_DIM, steering_layers=[2])
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "steering_layers": None}))
    loaded = PrefAlignForCausalLM.from_pretrained(tmp_path, base_model=base)
    assert loaded.config.resolved_steering_layers == [2] and loaded.latent_adapter.weight.shape[0] == 1
    torch.testing.assert_close(loaded.latent_adapter.weight, model.latent_adapter.weight)


# ----------------------------------------------------------------------
# Residual adapter: neutral rows are the base
# ----------------------------------------------------------------------
def _steering_model(family: str = "llama") -> PrefAlignForCausalLM:
    model = PrefAlignForCausalLM.from_base(make_tiny_base(family), latent_dim=LATENT_DIM).eval()
    torch.manual_seed(0)
    torch.nn.init.normal_(model.latent_adapter.weight, std=1.0)
    return model


def test_neutral_generation_is_the_base_bit_for_bit(family):
    model = _steering_model(family)
    ids = torch.randint(3, VOCAB, (3, 6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model.get_base_model()(ids).logits)
    assert torch.equal(_greedy(model, ids), _greedy(model.get_base_model(), ids))
    assert not torch.equal(_greedy(model, ids, latents=torch.randn(3, LATENT_DIM) * 3), _greedy(model, ids))


def test_neutral_rows_of_a_mixed_batch_are_the_base_rows():
    model = _steering_model()
    ids = torch.randint(3, VOCAB, (3, 6))
    latents = torch.zeros(3, LATENT_DIM)
    latents[1] = 3 * torch.randn(LATENT_DIM)
    with torch.no_grad():
        mixed = model(ids, latents=latents).logits
        base = model.get_base_model()(ids).logits
    torch.testing.assert_close(mixed[[0, 2]], base[[0, 2]], rtol=0, atol=0)
    assert (mixed[1] - base[1]).abs().max() > 1e-3


def test_steering_is_per_thread():
    model = _steering_model()
    ids = torch.randint(3, VOCAB, (2, 6))
    z = 3 * torch.randn(2, LATENT_DIM)
    expected_steered, expected_plain = _greedy(model, ids, latents=z), _greedy(model, ids)
    results, barrier = {}, threading.Barrier(2)

    def run(name, latents):
        barrier.wait()
        results[name] = [_greedy(model, ids, latents=latents) for _ in range(5)]

    threads = [threading.Thread(target=run, args=("steered", z)), threading.Thread(target=run, args=("plain", None))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(out, expected_steered) for out in results["steered"])
    assert all(torch.equal(out, expected_plain) for out in results["plain"])


def test_steered_forward_matches_cached_decoding():
    model = _steering_model("qwen2")
    ids = torch.randint(3, VOCAB, (2, 7))
    z = torch.randn(2, LATENT_DIM)
    with torch.no_grad():
        full = model(ids, latents=z, use_cache=False).logits
        prefill = model(ids[:, :5], latents=z, use_cache=True)
        step = model(ids[:, 5:], attention_mask=torch.ones_like(ids), cache=prefill.cache, latents=z).logits
    torch.testing.assert_close(step, full[:, 5:], atol=1e-5, rtol=1e-4)


def test_the_paper_design_stays_available():
    model = PrefAlignForCausalLM.from_base(
        make_tiny_base("llama"), latent_dim=LATENT_DIM, encoder_type="blocks", adapter_type="prefix"
    )
    assert model.build_prefix_cache(torch.randn(1, LATENT_DIM)).get_seq_length() == model.config.num_prefix_slots
    with pytest.raises(ValueError, match="adapter_type='prefix'"):
        _steering_model().build_prefix_cache(torch.randn(1, LATENT_DIM))


# ----------------------------------------------------------------------
# PCA start of CLaP
# ----------------------------------------------------------------------
def _prepared_pool(tokenizer, num_prompts=8, num_responses=4):
    pool = make_tiny_pool(num_prompts=num_prompts, num_responses=num_responses, seed=3)
    return CLaPTrainer._prepare_dataset(pool, tokenizer, CLaPConfig(output_dir="unused", report_to=[]), "train")


def test_pca_start_whitens_the_pool_and_maps_z_back():
    tokenizer = make_tiny_tokenizer()
    model = PrefAlignForCausalLM.from_base(make_tiny_base("llama"), latent_dim=4).eval()
    data = _prepared_pool(tokenizer)
    summary = init_latent_space_from_pool(model, data, tokenizer.pad_token_id, adapter_scale=2.0)
    assert summary["responses"] == 32 and 0 < summary["explained_variance"] <= 1
    (features,), groups, _ = pool_features(model, data, [model.config.resolved_encoder_layer], tokenizer.pad_token_id)
    means = model.latent_encoder(features).mean  # (N, Z)
    group_means = torch.zeros(8, 4).index_add_(0, groups, means) / 4
    within = means - group_means[groups]
    torch.testing.assert_close(within.pow(2).mean(0), torch.ones(4), atol=1e-3, rtol=1e-3)  # whitened
    # The adapter is the least-squares map back: W = scale * E[d z^T] with the same within-prompt deviations.
    deviations = features - (torch.zeros(8, features.shape[1]).index_add_(0, groups, features) / 4)[groups]
    expected = 2.0 * deviations.T @ within / within.shape[0]
    torch.testing.assert_close(model.latent_adapter.weight[0], expected, atol=1e-4, rtol=1e-3)


def test_adapter_scale_is_calibrated_by_the_likelihood_of_held_out_prompts():
    tokenizer = make_tiny_tokenizer()
    data = _prepared_pool(tokenizer)  # 8 prompts: 2 held out for the calibration
    calibrated = PrefAlignForCausalLM.from_base(make_tiny_base("llama"), latent_dim=4).eval()
    summary = init_latent_space_from_pool(calibrated, data, tokenizer.pad_token_id, adapter_scale=None)
    gains = summary["calibration_gain_per_token"]
    assert summary["calibration_prompts"] == 2 and summary["responses"] == 24
    assert len(gains) == len(CALIBRATION_SCALES)
    assert f"{summary['adapter_scale']:.3g}" == max(gains, key=gains.get)
    # The same directions as a fixed-scale start on the other 6 prompts, times the chosen scale.
    fixed = PrefAlignForCausalLM.from_base(make_tiny_base("llama"), latent_dim=4).eval()
    init_latent_space_from_pool(fixed, data.select(range(6)), tokenizer.pad_token_id, adapter_scale=1.0)
    torch.testing.assert_close(
        calibrated.latent_adapter.weight, summary["adapter_scale"] * fixed.latent_adapter.weight, atol=1e-4, rtol=1e-3
    )
    torch.testing.assert_close(calibrated.latent_encoder.to_gaussian.weight, fixed.latent_encoder.to_gaussian.weight)


def test_clap_starts_from_pca_once_and_trains():
    tokenizer = make_tiny_tokenizer()
    model = PrefAlignForCausalLM.from_base(make_tiny_base("llama"), latent_dim=LATENT_DIM)
    args = CLaPConfig(output_dir="unused", max_steps=2, report_to=[], save_strategy="no", use_cpu=True)
    trainer = CLaPTrainer(model=model, args=args, train_dataset=make_tiny_pool(seed=4), processing_class=tokenizer)
    trainer.train()
    summary = model.training_summary
    assert summary["latent_init"]["responses"] == 24 and summary["latent_init"]["adapter_scale"] == 1.0
    assert model.latent_encoder.to_gaussian.weight.abs().sum() > 0
    # A second run continues from the trained space instead of starting over.
    assert trainer._init_latent_space(resuming=False) is None


def test_clap_loss_reaches_the_head_and_the_adapter_never_the_base():
    tokenizer = make_tiny_tokenizer()
    model = PrefAlignForCausalLM.from_base(make_tiny_base("qwen2"), latent_dim=LATENT_DIM)
    args = CLaPConfig(output_dir="unused", max_steps=1, report_to=[], save_strategy="no")
    trainer = CLaPTrainer(model=model, args=args, train_dataset=make_tiny_pool(seed=6), processing_class=tokenizer)
    trainer._init_latent_space(resuming=False)
    model.train()
    trainer.compute_loss(model, next(iter(trainer.get_train_dataloader()))).backward()
    assert model.latent_encoder.to_gaussian.weight.grad.abs().sum() > 0
    assert model.latent_adapter.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.get_base_model().parameters())


def test_latent_init_none_keeps_the_zero_encoder_start():
    tokenizer = make_tiny_tokenizer()
    model = PrefAlignForCausalLM.from_base(make_tiny_base("llama"), latent_dim=LATENT_DIM)
    args = CLaPConfig(output_dir="unused", max_steps=1, latent_init="none", report_to=[], save_strategy="no")
    CLaPTrainer(model=model, args=args, train_dataset=make_tiny_pool(seed=4), processing_class=tokenizer).train()
    assert model.training_summary["latent_init"] is None


# ----------------------------------------------------------------------
# bf16 path
# ----------------------------------------------------------------------
def test_auto_dtype_follows_hardware_support(monkeypatch):
    monkeypatch.setattr(precision, "bf16_supported", lambda device="cpu": True)
    assert precision.resolve_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(precision, "bf16_supported", lambda device="cpu": False)
    assert precision.resolve_dtype("auto") == torch.float32
    assert precision.resolve_dtype(None) is None
    with pytest.raises(ValueError, match="Unknown dtype"):
        precision.resolve_dtype("float33")


def test_unsupported_bf16_falls_back_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(precision, "bf16_supported", lambda device="cpu": False)
    hf_logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        assert precision.resolve_dtype(torch.bfloat16) == torch.float32
    hf_logging.disable_propagation()
    assert "falling back to float32" in caplog.text


def test_bf16_base_keeps_fp32_latents_and_densities():
    base = make_tiny_base("llama").to(torch.bfloat16)
    model = PrefAlignForCausalLM.from_base(base, latent_dim=LATENT_DIM).eval()
    torch.nn.init.normal_(model.latent_encoder.to_gaussian.weight, std=0.1)
    assert model.latent_adapter.weight.dtype == torch.float32
    ids = torch.randint(3, VOCAB, (2, 6))
    posterior = model.posterior(ids)
    assert posterior.mean.dtype == torch.float32 and posterior.mean.abs().sum() > 0
    assert model(ids, latents=posterior.mean).logits.dtype == torch.bfloat16


# ----------------------------------------------------------------------
# Latent DPO: no signal on an untrained backbone; the strength dial
# ----------------------------------------------------------------------
def test_latent_dpo_warns_when_the_encoder_sees_no_difference(caplog):
    tokenizer = make_tiny_tokenizer()
    model = PrefAlignForCausalLM.from_base(make_tiny_base("llama"), latent_dim=LATENT_DIM).eval()
    pairs = preference_pairs_from_pool(make_tiny_pool(seed=5), get_scorer("detailed"))
    args = LatentDPOConfig(output_dir="unused", max_steps=1, latent_cache_dir="none", report_to=[])
    hf_logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        trainer = LatentDPOTrainer(model, args, train_dataset=pairs, processing_class=tokenizer)
    hf_logging.disable_propagation()
    assert trainer.posterior_separation == 0.0
    assert "Latent DPO finds no signal" in caplog.text and "CLaPTrainer" in caplog.text


def test_preference_strength_dial():
    from hf_prefalign import PreferenceEmbedding, PreferenceEmbeddingConfig

    model = _steering_model()
    embedding = PreferenceEmbedding(
        PreferenceEmbeddingConfig(
            latent_dim=LATENT_DIM,
            feature_dim=model.config.text_config.hidden_size,
            backbone_fingerprint=model.fingerprint(),
        )
    )
    with torch.no_grad():
        embedding.bias[:LATENT_DIM] = 3.0
    model.load_preference(embedding, preference_id="alice")
    ids = torch.randint(3, VOCAB, (1, 6))
    assert torch.equal(_greedy(model, ids, preference_id="alice", preference_strength=0.0), _greedy(model, ids))
    assert torch.equal(
        _greedy(model, ids, preference_id="alice", preference_strength=1.0), _greedy(model, ids, preference_id="alice")
    )
    latents = model.preference_latents(ids, None, "alice", strength=2.0)
    torch.testing.assert_close(latents, 2 * model.preference_latents(ids, None, "alice"))
    for bad in (-0.5, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="preference_strength"):
            _greedy(model, ids, preference_id="alice", preference_strength=bad)


# ----------------------------------------------------------------------
# Style scorers
# ----------------------------------------------------------------------
def test_style_shares():
    assert question_share("Is it? Yes. Why not?") == pytest.approx(2 / 3)
    assert exclamation_share("Wow! Great!! ok.") == pytest.approx(2 / 3)
    assert question_share("no punctuation") == 0.0
    assert list_share("Intro:\n- one\n2. two\n\nend") == pytest.approx(2 / 4)
    assert list_share("") == 0.0
    scores = get_scorer("questioning")(["Why? Because.", "Fine."])
    assert scores.tolist() == [0.5, 0.0]
    assert get_scorer("structured")(["- a\n- b"]).tolist() == [1.0]
