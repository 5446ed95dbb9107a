"""Users without training: `PreferenceEmbedding.from_examples`, `PreferenceEmbedding.mix`, mixed preference ids."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from datasets import Dataset
from helpers import LATENT_DIM, random_words
from transformers import pipeline

from hf_prefalign import LatentCache, PrefAlignForCausalLM, PreferenceEmbedding, PreferenceEmbeddingConfig
from hf_prefalign.cli.main import main
from hf_prefalign.data.prompts import render_prompt, tokenize_prompt, tokenize_response
from hf_prefalign.testing import make_tiny_base, make_tiny_tokenizer
from hf_prefalign.utils.constants import DEFAULT_TARGET_KL


PROMPTS = ["w5 w6 w7 w8 w9", "w10 w11", "w12 w13 w14"]
LIKED = [
    {"prompt": "w5 w6 w7", "response": "w10 w11 w12 w13"},
    {"prompt": "w20 w21", "response": "w10 w11 w12 w40 w41"},
    {"prompt": "w30 w31 w32 w33", "response": "w10 w12 w14"},
]
DISLIKED = [
    {"prompt": "w5 w6 w7", "response": "w50 w51 w52"},
    {"prompt": "w60", "response": "w50 w51 w70 w71"},
]


def _backbone(noise_seed: int = 0) -> PrefAlignForCausalLM:
    """A tiny Qwen2 backbone whose latent modules are perturbed, so responses get different posteriors."""
    model = PrefAlignForCausalLM.from_base(make_tiny_base("qwen2"), latent_dim=LATENT_DIM).eval()
    generator = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for parameter in model.latent_parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


def _user(model: PrefAlignForCausalLM, seed: int) -> PreferenceEmbedding:
    """A user of `model` with every parameter random (a prompt-dependent prior, as training leaves it)."""
    embedding = PreferenceEmbedding(
        PreferenceEmbeddingConfig(
            latent_dim=LATENT_DIM,
            feature_dim=model.config.text_config.hidden_size,
            backbone_fingerprint=model.fingerprint(),
        )
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in embedding.parameters():
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    return embedding.eval()


@pytest.fixture(scope="module")
def world():
    """A backbone with two (randomly perturbed) users registered, `alice` and `bob`, and its tokenizer."""
    model = _backbone()
    tokenizer = make_tiny_tokenizer()
    model.load_preference(_user(model, 1), "alice")
    model.load_preference(_user(model, 2), "bob")
    return model, tokenizer


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    tokenizer.padding_side = "left"
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


def _generate(model, **kwargs) -> torch.Tensor:
    settings = {"do_sample": False, "max_new_tokens": 4, "min_new_tokens": 4, "pad_token_id": 0}
    return model.generate(**{**settings, **kwargs})


def _posterior(model, tokenizer, example) -> tuple[torch.Tensor, torch.Tensor]:
    """q(z|x,y) of one example, read directly from the backbone (prompt then response, the response masked in)."""
    prompt = tokenize_prompt(tokenizer, example["prompt"])
    response = tokenize_response(tokenizer, example["response"])
    ids = torch.tensor([prompt + response])
    response_mask = torch.tensor([[0] * len(prompt) + [1] * len(response)])
    with torch.no_grad():
        posterior = model.posterior(ids, torch.ones_like(ids), response_mask)
    return posterior.mean[0], posterior.logvar[0]


def _precision_weighted_mean(model, tokenizer, examples) -> tuple[torch.Tensor, torch.Tensor]:
    means, logvars = zip(*(_posterior(model, tokenizer, e) for e in examples), strict=True)
    means, precisions = torch.stack(means), torch.stack(logvars).neg().exp()  # (N, Z) each
    mean = (precisions * means).sum(0) / precisions.sum(0)
    variance = (precisions * (1 / precisions + (means - mean) ** 2)).sum(0) / precisions.sum(0)
    return mean, variance


# ----------------------------------------------------------------------
# From examples
# ----------------------------------------------------------------------
def test_from_examples_puts_the_user_at_the_liked_posteriors(world):
    model, tokenizer = world
    user = PreferenceEmbedding.from_examples(model, tokenizer, LIKED)
    mean, variance = _precision_weighted_mean(model, tokenizer, LIKED)
    features = torch.randn(5, model.config.text_config.hidden_size)
    prior = user(features)
    torch.testing.assert_close(prior.mean, mean.expand(5, -1), atol=1e-5, rtol=1e-5)  # the same z for every prompt
    torch.testing.assert_close(prior.logvar, variance.log().expand(5, -1), atol=1e-3, rtol=1e-3)
    assert torch.equal(user.up, torch.zeros_like(user.up)) and mean.norm() > 0
    assert user.config.training["method"] == "from_examples"
    assert (user.config.training["liked"], user.config.training["disliked"]) == (3, 0)
    assert user.config.backbone_fingerprint == model.fingerprint()
    assert not user.training and not any(p.grad is not None for p in user.parameters())


def test_disliked_examples_push_the_user_away(world):
    model, tokenizer = world
    liked_mean, _ = _precision_weighted_mean(model, tokenizer, LIKED)
    disliked_mean, _ = _precision_weighted_mean(model, tokenizer, DISLIKED)
    features = torch.zeros(1, model.config.text_config.hidden_size)
    user = PreferenceEmbedding.from_examples(model, tokenizer, LIKED, DISLIKED)
    torch.testing.assert_close(user(features).mean[0], liked_mean - disliked_mean, atol=1e-5, rtol=1e-5)
    assert (user.config.training["liked"], user.config.training["disliked"]) == (3, 2)
    half = PreferenceEmbedding.from_examples(model, tokenizer, LIKED, DISLIKED, disliked_weight=0.5)
    torch.testing.assert_close(half(features).mean[0], liked_mean - 0.5 * disliked_mean, atol=1e-5, rtol=1e-5)
    # `liked: false` rows of `examples` are the same as `disliked=`.
    flagged = PreferenceEmbedding.from_examples(model, tokenizer, LIKED + [{**r, "liked": False} for r in DISLIKED])
    assert torch.equal(flagged.bias, user.bias)


def test_datasets_chat_prompts_and_trl_unpaired_columns_are_read_alike(world):
    model, tokenizer = world
    from_list = PreferenceEmbedding.from_examples(model, tokenizer, LIKED, DISLIKED)
    rows = [{"prompt": r["prompt"], "completion": r["response"], "label": True} for r in LIKED]
    rows += [{"prompt": r["prompt"], "completion": r["response"], "label": False} for r in DISLIKED]
    from_dataset = PreferenceEmbedding.from_examples(model, tokenizer, Dataset.from_list(rows))
    assert torch.equal(from_dataset.bias, from_list.bias)
    # Chat prompts go through the chat template, as in pools and Latent DPO.
    chat = [{"prompt": [{"role": "user", "content": r["prompt"]}], "response": r["response"]} for r in LIKED]
    user = PreferenceEmbedding.from_examples(model, tokenizer, Dataset.from_list(chat))
    templated = [{"prompt": render_prompt(tokenizer, r["prompt"]), "response": r["response"]} for r in chat]
    mean, _ = _precision_weighted_mean(model, tokenizer, templated)
    torch.testing.assert_close(user.bias[:LATENT_DIM], mean, atol=1e-5, rtol=1e-5)


def test_from_examples_is_deterministic_and_leaves_the_global_rng_alone(world):
    model, tokenizer = world
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    first = PreferenceEmbedding.from_examples(model, tokenizer, LIKED)
    assert torch.equal(torch.rand(3), expected)
    second = PreferenceEmbedding.from_examples(model, tokenizer, LIKED)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))


def test_an_example_user_saves_loads_banks_and_serves_like_a_trained_one(world, tmp_path):
    model, tokenizer = world
    user = PreferenceEmbedding.from_examples(model, tokenizer, LIKED, DISLIKED, variance=0.5)
    user.save_pretrained(tmp_path / "carol")
    loaded = PreferenceEmbedding.from_pretrained(tmp_path / "carol")
    assert loaded.config == user.config and loaded.config.training["variance"] == 0.5
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), user.parameters(), strict=True))
    torch.testing.assert_close(loaded(torch.zeros(1, 32)).logvar, torch.full((1, LATENT_DIM), math.log(0.5)))
    assert "from a few liked" in (tmp_path / "carol" / "README.md").read_text()

    model.load_preference(tmp_path / "carol", "carol", overwrite=True)
    batch = _batch(tokenizer)
    z = model.preference_latents(batch["input_ids"], batch["attention_mask"], "carol")
    torch.testing.assert_close(z, user.bias[:LATENT_DIM].expand(3, -1))
    assert torch.equal(_generate(model, **batch, preference_id="carol"), _generate(model, **batch, latents=z))
    neutral = _generate(model, **batch, preference_id=None)
    assert _generate(model, **batch, preference_id=["carol", None, "alice"])[1].tolist() == neutral[1].tolist()

    model.preferences.save(tmp_path / "bank")
    server = _backbone()  # the same weights: the same fingerprint
    assert server.preferences.load(tmp_path / "bank") == ["alice", "bob", "carol"]
    assert torch.equal(server.preferences.get("carol").bias, user.bias)
    model.preferences.remove("carol")


def test_from_examples_refuses_bad_input_with_one_clear_error(world):
    model, tokenizer = world
    cases = [
        ([], ValueError, "No liked examples"),
        (Dataset.from_dict({"prompt": [], "response": []}), ValueError, "No liked examples"),
        ([{**DISLIKED[0], "liked": False}], ValueError, r"No liked examples \(only 1 disliked\)"),
        ([{"prompt": "w5"}], ValueError, "example 0 lacks a `prompt` or a `response`"),
        (Dataset.from_dict({"text": ["w5"]}), ValueError, "need `prompt` and `response` columns"),
        ([{"prompt": "w5", "response": "w6", "liked": "yes"}], TypeError, "liked='yes'"),
        ([{"prompt": 5, "response": "w6"}], TypeError, "prompt of type int"),
        (LIKED[0], TypeError, "wrap a single example in a list"),
        ("w5 w6", TypeError, "must be a list of"),
    ]
    for examples, error, message in cases:
        with pytest.raises(error, match=message):
            PreferenceEmbedding.from_examples(model, tokenizer, examples)
    with pytest.raises(ValueError, match="disliked example 0 is marked liked=true"):
        PreferenceEmbedding.from_examples(model, tokenizer, LIKED, [{**DISLIKED[0], "liked": True}])
    for weight in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="`disliked_weight` must be a finite number >= 0"):
            PreferenceEmbedding.from_examples(model, tokenizer, LIKED, DISLIKED, disliked_weight=weight)
    with pytest.raises(ValueError, match="`variance` must be a number between"):
        PreferenceEmbedding.from_examples(model, tokenizer, LIKED, variance=100.0)
    with pytest.raises(TypeError, match="must be a PrefAlignForCausalLM"):
        PreferenceEmbedding.from_examples(model.get_base_model(), tokenizer, LIKED)


def test_examples_encoded_for_another_backbone_are_refused(world):
    model, tokenizer = world
    other = _backbone(noise_seed=1)
    with pytest.raises(ValueError, match="latent cache was built for another backbone"):
        PreferenceEmbedding.from_examples(model, tokenizer, LIKED, latent_cache=LatentCache(other, tokenizer))
    shared = LatentCache(model, tokenizer)
    user = PreferenceEmbedding.from_examples(model, tokenizer, LIKED, latent_cache=shared)
    assert shared.encoder_sequences == 3  # the examples now serve Latent DPO runs on this cache too
    with pytest.raises(ValueError, match="another backbone"):
        other.load_preference(user, "carol")
    assert "carol" not in other.preferences


# ----------------------------------------------------------------------
# Mixing embeddings
# ----------------------------------------------------------------------
def test_a_mix_is_the_convex_combination_of_the_users_latents(world):
    model, _ = world
    alice, bob = model.preferences.get("alice"), model.preferences.get("bob")
    features = torch.randn(4, model.config.text_config.hidden_size)
    for alone in (PreferenceEmbedding.mix({alice: 1.0}), PreferenceEmbedding.mix([alice, bob], weights=[1, 0])):
        torch.testing.assert_close(alone.latents(features), alice.latents(features))
    half = PreferenceEmbedding.mix([alice, bob])  # equal weights by default
    torch.testing.assert_close(half.latents(features), 0.5 * (alice.latents(features) + bob.latents(features)))
    skewed = PreferenceEmbedding.mix({alice: 3, bob: 1})  # normalised to 0.75 / 0.25
    expected = 0.75 * alice.latents(features) + 0.25 * bob.latents(features)
    torch.testing.assert_close(skewed.latents(features), expected)
    assert skewed.config.training["weights"] == [0.75, 0.25] and skewed.config.rank == 16
    assert skewed.config.backbone_fingerprint == model.fingerprint()


def test_mixing_refuses_foreign_users_and_bad_weights(world):
    model, _ = world
    alice, bob = model.preferences.get("alice"), model.preferences.get("bob")
    stranger = _user(_backbone(noise_seed=1), 3)
    with pytest.raises(ValueError, match="Embedding 1 of the mix was trained against another backbone"):
        PreferenceEmbedding.mix([alice, stranger])
    for weights, message in (
        ([1.0, -0.5], "embedding 1 is -0.5: weights must be non-negative"),
        ([1.0, float("nan")], "weights must be finite"),
        ([float("inf"), 1.0], "weights must be finite"),
        ([0.0, 0.0], "sum to 0.0"),
        ([1.0], "Got 1 weights for 2 embeddings"),
    ):
        with pytest.raises(ValueError, match=message):
            PreferenceEmbedding.mix([alice, bob], weights=weights)
    with pytest.raises(ValueError, match="Nothing to mix"):
        PreferenceEmbedding.mix([])
    with pytest.raises(ValueError, match="not both"):
        PreferenceEmbedding.mix({alice: 1.0}, weights=[1.0])
    with pytest.raises(TypeError, match="not a PreferenceEmbedding"):
        PreferenceEmbedding.mix(["alice"])


# ----------------------------------------------------------------------
# Mixed preference ids
# ----------------------------------------------------------------------
def test_a_mapping_preference_id_mixes_the_users_latents(world):
    model, tokenizer = world
    batch = _batch(tokenizer)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    alice = model.preference_latents(ids, mask, "alice")
    bob = model.preference_latents(ids, mask, "bob")
    assert torch.equal(model.preference_latents(ids, mask, {"alice": 1.0}), alice)
    assert torch.equal(model.preference_latents(ids, mask, {"alice": 0.7, "bob": 0.0}), alice)
    torch.testing.assert_close(model.preference_latents(ids, mask, {"alice": 0.5, "bob": 0.5}), 0.5 * (alice + bob))
    torch.testing.assert_close(model.preference_latents(ids, mask, {"alice": 2, "bob": 2}), 0.5 * (alice + bob))
    rows = model.preference_latents(ids, mask, [{"alice": 0.7, "bob": 0.3}, None, "bob"])
    torch.testing.assert_close(rows[0], 0.7 * alice[0] + 0.3 * bob[0])
    assert torch.equal(rows[1], torch.zeros(LATENT_DIM)) and torch.equal(rows[2], bob[2])
    # The same as registering the mixed embedding.
    model.load_preference(
        PreferenceEmbedding.mix({model.preferences.get("alice"): 0.7, model.preferences.get("bob"): 0.3}), "ab"
    )
    torch.testing.assert_close(model.preference_latents(ids, mask, "ab"), 0.7 * alice + 0.3 * bob)
    model.preferences.remove("ab")


def test_generate_and_pipeline_accept_a_mix(world):
    model, tokenizer = world
    batch = _batch(tokenizer)
    mix = {"alice": 0.7, "bob": 0.3}
    z = model.preference_latents(batch["input_ids"], batch["attention_mask"], mix)
    assert torch.equal(_generate(model, **batch, preference_id=mix), _generate(model, **batch, latents=z))
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    settings = {"do_sample": False, "max_new_tokens": 4, "min_new_tokens": 4}
    result = pipe("w5 w6 w7", preference_id=mix, return_tensors=True, **settings)
    alone = tokenizer(["w5 w6 w7"], return_tensors="pt")
    expected = model.generate(**alone, preference_id=mix, pad_token_id=0, **settings)[0].tolist()
    assert result[0]["generated_token_ids"] == expected


def test_pipeline_passes_preference_strength(world):
    model, tokenizer = world
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    settings = {"do_sample": False, "max_new_tokens": 4, "min_new_tokens": 4}
    alone = tokenizer(["w5 w6 w7"], return_tensors="pt")
    outputs = []
    for strength in (0.0, 2.0):
        result = pipe("w5 w6 w7", preference_id="alice", preference_strength=strength, return_tensors=True, **settings)
        expected = model.generate(
            **alone, preference_id="alice", preference_strength=strength, pad_token_id=0, **settings
        )[0].tolist()
        assert result[0]["generated_token_ids"] == expected
        outputs.append(result[0]["generated_token_ids"])
    assert outputs[0] != outputs[1]  # the strength reached generation: 0 (neutral) and 2 write differently here


def test_a_bad_mix_is_refused_before_the_lm_runs(world):
    model, tokenizer = world
    batch = _batch(tokenizer)
    calls = []
    hook = model.language_model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        for mix, error, message in (
            ({"alice": 0.5, "carol": 0.5}, KeyError, "Unknown preference id 'carol'"),
            ({"alice": -1.0, "bob": 2.0}, ValueError, "'alice' is -1.0: weights must be non-negative"),
            ({"alice": float("nan")}, ValueError, "weights must be finite"),
            ({"alice": 0.0, "bob": 0.0}, ValueError, "sum to 0.0"),
            ({}, ValueError, "Nothing to mix"),
            ({"alice": "heavy"}, TypeError, "must be a number"),
            ({1: 1.0}, TypeError, "string ids"),
        ):
            with pytest.raises(error, match=message):
                _generate(model, **batch, preference_id=mix)
            with pytest.raises(error, match=message):
                model.preference_latents(batch["input_ids"], batch["attention_mask"], [None, mix, "bob"])
    finally:
        hook.remove()
    assert not calls


# ----------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------
@pytest.fixture
def backbone_dir(tmp_path, monkeypatch):
    """A saved tiny backbone the CLI loads (its tokenizer loading pointed at the tiny tokenizer, as in test_cli), with
    a latent metric so that `target_kl` applies."""
    make_tiny_base("qwen2").save_pretrained(tmp_path / "base")
    model = PrefAlignForCausalLM.from_base(str(tmp_path / "base"), latent_dim=LATENT_DIM)
    with torch.no_grad():
        for parameter in model.latent_parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        model.latent_adapter.fisher.copy_(torch.eye(LATENT_DIM))
    path = tmp_path / "backbone"
    model.save_pretrained(path)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: make_tiny_tokenizer())
    return path


def test_cli_align_from_examples_writes_an_embedding_without_training(backbone_dir, tmp_path, capsys):
    generator = torch.Generator().manual_seed(0)
    rows = [{"prompt": random_words(generator), "response": random_words(generator)} for _ in range(3)]
    rows.append({"prompt": random_words(generator), "response": random_words(generator), "liked": False})
    data = tmp_path / "examples.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["align", "--backbone", str(backbone_dir), "--from-examples", str(data), "--output_dir"]
    assert main([*argv, str(tmp_path / "dave")]) == 0
    assert "3 liked, 1 disliked examples, no training" in capsys.readouterr().out
    user = PreferenceEmbedding.from_pretrained(tmp_path / "dave")
    assert user.config.training["method"] == "from_examples"
    model = PrefAlignForCausalLM.from_pretrained(backbone_dir)
    expected = PreferenceEmbedding.from_examples(model, make_tiny_tokenizer(), rows[:3], rows[3:])
    assert torch.equal(user.bias, expected.bias) and user.config.training["target_kl"] == DEFAULT_TARGET_KL
    model.load_preference(tmp_path / "dave", "dave")  # it belongs to the saved backbone
    # --target_kl reaches the examples' user as it reaches a trained one
    assert main([*argv, str(tmp_path / "erin"), "--target_kl", "none"]) == 0
    unscaled = PreferenceEmbedding.from_examples(model, make_tiny_tokenizer(), rows[:3], rows[3:], target_kl=None)
    assert torch.equal(PreferenceEmbedding.from_pretrained(tmp_path / "erin").bias, unscaled.bias)

    (tmp_path / "disliked.jsonl").write_text(json.dumps(rows[3]) + "\n")
    (tmp_path / "empty.jsonl").write_text("\n")
    capsys.readouterr()
    for extra, code, message in (
        (["--from_examples", str(tmp_path / "empty.jsonl")], 1, "holds no examples"),
        (["--from_examples", str(tmp_path / "disliked.jsonl")], 1, "No liked examples (only 1 disliked)"),
        (["--from_examples", str(tmp_path / "missing.jsonl")], 1, "No such file"),
        (["--from_examples", str(data), "--dataset", str(data)], 2, "give either --dataset"),
    ):
        assert main(["align", "--backbone", str(backbone_dir), *extra, "--output_dir", str(tmp_path / "e")]) == code
        err = capsys.readouterr().err
        *progress, error, hint = err.strip().splitlines()  # progress: datasets' bar while it reads the file
        assert "Traceback" not in err and message in error and hint.startswith("hint:"), err
