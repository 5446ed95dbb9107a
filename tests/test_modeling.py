"""Forward pass, latent prefix, positions and generation of PrefAlignForCausalLM on every supported family."""

from __future__ import annotations

import torch
from helpers import LATENT_DIM, VOCAB, left_padded_batch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_prefalign import PrefAlignConfig, PrefAlignForCausalLM
from hf_prefalign.testing import make_tiny_base


def test_untrained_encoder_returns_standard_normal(backbone):
    input_ids, attention_mask = left_padded_batch([5, 3])
    posterior = backbone.posterior(input_ids, attention_mask)
    assert posterior.mean.shape == (2, LATENT_DIM)
    assert posterior.mean.dtype == torch.float32
    assert torch.equal(posterior.mean, torch.zeros(2, LATENT_DIM))
    assert torch.equal(posterior.logvar, torch.zeros(2, LATENT_DIM))


def test_model_built_from_config_is_standard_normal_too(base):
    # `post_init` owns initialisation: the zero output layer must survive it.
    config = PrefAlignConfig(text_config=base.config.to_dict(), latent_dim=LATENT_DIM)
    model = PrefAlignForCausalLM(config).eval()
    posterior = model.posterior(torch.tensor([[4, 5, 6]]))
    assert torch.equal(posterior.mean, torch.zeros(1, LATENT_DIM))
    assert torch.equal(posterior.logvar, torch.zeros(1, LATENT_DIM))


def test_wrapping_leaves_the_base_untouched(family):
    base = make_tiny_base(family)
    input_ids = torch.randint(3, VOCAB, (2, 6))
    with torch.no_grad():
        reference = base(input_ids).logits
    model = PrefAlignForCausalLM.from_base(base, latent_dim=LATENT_DIM).eval()
    with torch.no_grad(), model.disable_latent():
        logits = model(input_ids).logits
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)


def test_encoder_starts_from_the_base_first_blocks(paper_backbone):
    backbone = paper_backbone
    base_blocks = backbone.get_base_model().base_model.state_dict()
    encoder_blocks = backbone.latent_encoder.blocks.state_dict()
    layer_keys = [name for name in encoder_blocks if ".0." in name or ".1." in name]
    assert layer_keys
    for name in layer_keys:
        torch.testing.assert_close(encoder_blocks[name], base_blocks[name], rtol=0, atol=0)
    assert not any(".2." in name for name in encoder_blocks), "encoder should hold only 2 blocks"


def test_different_latents_give_different_logits(backbone):
    input_ids = torch.randint(3, VOCAB, (2, 6))
    with torch.no_grad():
        a = backbone(input_ids, latents=torch.randn(2, LATENT_DIM)).logits
        b = backbone(input_ids, latents=torch.randn(2, LATENT_DIM)).logits
    assert (a - b).abs().max() > 1e-4


def test_prefix_respects_grouped_query_attention(paper_backbone):
    backbone = paper_backbone
    text_config = backbone.config.text_config
    cache = backbone.build_prefix_cache(torch.randn(3, LATENT_DIM))
    kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    assert len(cache.layers) == text_config.num_hidden_layers
    for layer in cache.layers:
        assert layer.keys.shape == (3, kv_heads, backbone.config.num_prefix_slots, head_dim)
        assert layer.values.shape == (3, kv_heads, backbone.config.num_prefix_slots, head_dim)


def test_full_forward_equals_step_by_step_decoding(backbone):
    input_ids, attention_mask = left_padded_batch([7, 4])
    latents = torch.randn(2, LATENT_DIM)
    with torch.no_grad():
        full = backbone(input_ids, attention_mask=attention_mask, latents=latents).logits
        prefill = backbone(input_ids[:, :3], attention_mask=attention_mask[:, :3], latents=latents, use_cache=True)
        steps, cache = [prefill.logits], prefill.cache
        for t in range(3, input_ids.shape[1]):
            # The residual adapter acts at every step, so z comes with each call (the prefix ignores it once cached).
            out = backbone(
                input_ids[:, t : t + 1],
                attention_mask=attention_mask[:, : t + 1],
                cache=cache,
                use_cache=True,
                latents=latents,
            )
            steps.append(out.logits)
            cache = out.cache
    stepwise = torch.cat(steps, dim=1)
    real = attention_mask.bool()
    torch.testing.assert_close(stepwise[real], full[real], rtol=1e-4, atol=1e-5)


def test_left_padding_does_not_change_real_token_logits(backbone):
    # Training forward passes: a padded row must see the same positions as the row alone.
    input_ids, attention_mask = left_padded_batch([6, 3])
    latents = torch.randn(2, LATENT_DIM)
    with torch.no_grad():
        batched = backbone(input_ids, attention_mask=attention_mask, latents=latents).logits
        alone = backbone(input_ids[1:, -3:], latents=latents[1:]).logits
    torch.testing.assert_close(batched[1, -3:], alone[0], rtol=1e-4, atol=1e-5)


def test_left_padded_batch_generation_equals_rowwise(backbone):
    lengths = [6, 3, 5]
    input_ids, attention_mask = left_padded_batch(lengths)
    latents = torch.randn(len(lengths), LATENT_DIM)
    settings = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    batched = backbone.generate(input_ids=input_ids, attention_mask=attention_mask, latents=latents, **settings)
    for row, length in enumerate(lengths):
        alone = backbone.generate(
            input_ids=input_ids[row : row + 1, -length:], latents=latents[row : row + 1], **settings
        )
        assert torch.equal(batched[row, -6:], alone[0, -6:]), f"row {row} differs"


def test_generate_follows_the_latent(backbone):
    input_ids = torch.randint(3, VOCAB, (1, 4)).repeat(2, 1)
    attention_mask = torch.ones_like(input_ids)
    latents = torch.randn(2, LATENT_DIM)
    settings = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    out = backbone.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        latents=latents,
        return_dict_in_generate=True,
        output_logits=True,
        **settings,
    )
    first_step = out.logits[0]  # (B, V): same prompt, different z per row
    assert (first_step[0] - first_step[1]).abs().max() > 1e-4
    # One shared latent `(Z,)` is broadcast to every row, also with num_return_sequences.
    shared = backbone.generate(
        input_ids=input_ids[:1],
        attention_mask=attention_mask[:1],
        latents=latents[1],
        num_return_sequences=2,
        return_dict_in_generate=True,
        output_logits=True,
        **{**settings, "do_sample": True},  # greedy forbids several return sequences; raw logits are the same
    )
    torch.testing.assert_close(shared.logits[0][0], first_step[1])
    torch.testing.assert_close(shared.logits[0][1], first_step[1])


def test_loss_is_mean_nll_over_labelled_tokens(backbone):
    input_ids = torch.randint(3, VOCAB, (2, 6))
    labels = input_ids.clone()
    labels[:, :3] = -100  # prompt tokens are not scored
    latents = torch.randn(2, LATENT_DIM)
    with torch.no_grad():
        out = backbone(input_ids, labels=labels, latents=latents)
    shifted_logits, shifted_labels = out.logits[:, :-1], labels[:, 1:]
    expected = torch.nn.functional.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]).float(), shifted_labels.reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)


def test_encoder_shares_the_frozen_embedding_table(paper_backbone):
    backbone = paper_backbone
    embedding = backbone.get_input_embeddings()
    for name, parameter in backbone.latent_encoder.named_parameters():
        assert parameter.data_ptr() != embedding.weight.data_ptr(), name
        assert parameter.shape != embedding.weight.shape, f"{name} looks like a copy of the token table"
    token_tables = [
        m
        for m in backbone.latent_encoder.modules()
        if isinstance(m, torch.nn.Embedding) and m.num_embeddings == embedding.num_embeddings
    ]
    assert token_tables == []
    assert not embedding.weight.requires_grad
    # The encoder reads the base's table itself: editing a row changes the posterior.
    backbone.latent_encoder.to_gaussian.weight.data.normal_()
    input_ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        before = backbone.posterior(input_ids).mean.clone()
        embedding.weight[6] = torch.randn(embedding.weight.shape[1])
        after = backbone.posterior(input_ids).mean
    assert (before - after).abs().max() > 1e-4


def test_base_stays_frozen_and_latent_modules_learn(paper_backbone):
    backbone = paper_backbone
    backbone.train()
    input_ids = torch.randint(3, VOCAB, (2, 6))
    posterior = backbone.posterior(input_ids)
    backbone.latent_encoder.to_gaussian.weight.data.normal_(std=0.1)  # let gradients reach the encoder blocks
    posterior = backbone.posterior(input_ids)
    loss = backbone(input_ids, labels=input_ids, latents=posterior.rsample()).loss
    loss.backward()
    assert backbone.is_base_frozen
    assert all(p.grad is None for p in backbone.get_base_model().parameters())
    assert backbone.latent_adapter.weight.grad.abs().sum() > 0
    assert backbone.latent_encoder.queries.grad.abs().sum() > 0
    trainable = {name.split(".")[0] for name, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {"latent_encoder", "latent_adapter"}


def test_unfrozen_base_receives_gradients(base):
    model = PrefAlignForCausalLM.from_base(base, latent_dim=LATENT_DIM, freeze_base=False)
    input_ids = torch.randint(3, VOCAB, (2, 5))
    model(input_ids, labels=input_ids).loss.backward()
    assert not model.is_base_frozen
    assert model.get_input_embeddings().weight.grad is not None


def test_auto_classes_know_prefalign(base):
    config = AutoConfig.for_model("prefalign", text_config=base.config.to_dict(), latent_dim=LATENT_DIM)
    assert isinstance(config, PrefAlignConfig)
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, PrefAlignForCausalLM)


def _trained_head(backbone: PrefAlignForCausalLM) -> PrefAlignForCausalLM:
    torch.manual_seed(0)
    torch.nn.init.normal_(backbone.latent_encoder.to_gaussian.weight, std=0.1)
    return backbone


def test_posterior_reads_the_response_wherever_the_padding_is(paper_backbone):
    backbone = paper_backbone
    backbone = _trained_head(backbone)
    prompt, response = [5, 6, 7, 8], [9, 10, 2]
    alone = backbone.posterior(torch.tensor([prompt + response]), response_mask=torch.tensor([[0] * 4 + [1] * 3]))
    other = [11, 12, 13, 14, 15, 16, 17, 18, 19]
    for side in ("right", "left"):
        pad = [0] * (len(other) - 7)
        row = prompt + response + pad if side == "right" else pad + prompt + response
        mask = [1] * 7 + [0] * len(pad) if side == "right" else [0] * len(pad) + [1] * 7
        response_mask = [0] * 4 + [1] * 3 + [0] * len(pad) if side == "right" else [0] * (len(pad) + 4) + [1] * 3
        batch = backbone.posterior(
            torch.tensor([row, other]),
            torch.tensor([mask, [1] * len(other)]),
            response_mask=torch.tensor([response_mask, [0] * 5 + [1] * 4]),
        )
        torch.testing.assert_close(batch.mean[0], alone.mean[0], atol=1e-5, rtol=1e-4, msg=side)
        torch.testing.assert_close(batch.logvar[0], alone.logvar[0], atol=1e-5, rtol=1e-4, msg=side)
    # Without a response mask the queries read the prompt too: another posterior.
    everything = backbone.posterior(torch.tensor([prompt + response]))
    assert not torch.allclose(everything.mean, alone.mean)


def test_posterior_init_logvar_sets_the_untrained_variance(base):
    model = PrefAlignForCausalLM.from_base(base, latent_dim=LATENT_DIM, posterior_init_logvar=-4.0).eval()
    posterior = model.posterior(torch.tensor([[4, 5, 6]]))
    assert torch.equal(posterior.mean, torch.zeros(1, LATENT_DIM))
    assert torch.equal(posterior.logvar, torch.full((1, LATENT_DIM), -4.0))


def test_feature_mean_is_tracked_in_training_only(paper_backbone):
    backbone = paper_backbone
    encoder = backbone.latent_encoder
    input_ids, attention_mask = left_padded_batch([5, 3])
    backbone.eval()
    backbone.posterior(input_ids, attention_mask)
    assert int(encoder.feature_mean_updates) == 0 and torch.count_nonzero(encoder.feature_mean) == 0
    backbone.train()
    backbone.posterior(input_ids, attention_mask)
    first = encoder.feature_mean.clone()
    assert int(encoder.feature_mean_updates) == 1 and torch.count_nonzero(first) > 0
    with torch.no_grad():  # feature extraction for caches or metrics leaves the statistics alone
        backbone.posterior(input_ids, attention_mask)
    assert int(encoder.feature_mean_updates) == 1 and torch.equal(encoder.feature_mean, first)
    # It is a saved buffer: part of the latent weights (and so of the fingerprint).
    assert "latent_encoder.feature_mean" in backbone.latent_state_dict()
