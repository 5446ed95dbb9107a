"""Data-dependent start of CLaP: the latent space begins as the principal directions in which a prompt's responses
differ in the base's residual stream.

For every response of (a subset of) the pool, one no-grad pass reads the mean residual stream over the response at
the encoder layer and at each steering layer. Centred within each prompt, these vectors vary by what distinguishes
one response from another (what the hidden style instructions of the pool vary); their top `latent_dim` principal
directions, whitened, become the encoder head (so z ~ N(0, I) over the pool), and the residual adapter starts as
the least-squares map back from z to those directions (`W_l = scale * E[d_l z^T]`). The scale is fixed (1 by default)
or calibrated: the one that makes held-out responses of the pool most likely under their own z (a one-parameter
maximum-likelihood fit of the decoder on prompts the directions were not read from).
Gradient training of CLaP then refines both. An untrained backbone's encoder returns the same N(0, I) for every response; this start gives it a
space in which responses (and users) already differ.
"""

from __future__ import annotations

import math

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers.utils import logging
from trl.trainer.utils import pad

from ..models.prefalign.hidden_state_encoder import HiddenStateEncoder, masked_mean, read_hidden_states
from ..models.prefalign.likelihood import sequence_log_likelihood
from ..models.prefalign.modeling_prefalign import PrefAlignForCausalLM
from ..models.prefalign.steering import ResidualLatentAdapter


logger = logging.get_logger(__name__)

# Candidate adapter scales of the likelihood calibration: a factor sqrt(2) apart from 1/4 to 4.
CALIBRATION_SCALES = tuple(2 ** (k / 2) for k in range(-4, 5))


def _pad_right(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as a right-padded `(B, T)` batch and its attention mask (TRL's `pad`)."""
    ids = pad([torch.tensor(seq, dtype=torch.long) for seq in sequences], padding_value=pad_token_id)
    mask = pad([torch.ones(len(seq), dtype=torch.long) for seq in sequences], padding_value=0)
    return ids, mask


@torch.no_grad()
def pool_features(
    model: PrefAlignForCausalLM,
    dataset: Dataset,
    layers: list[int],
    pad_token_id: int,
    batch_size: int = 16,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Mean residual stream over each response at `layers`, for a tokenized pool (`prompt_input_ids`,
    `responses_input_ids`).

    Returns the response features per layer `(N, hidden)` each, the prompt (group) index of each response `(N,)`, and
    the prompts' own mean states at the first of `layers` `(G, hidden)`.
    """
    base, layout = model.get_base_model(), model.layout
    device = model.device
    sequences, starts, groups, prompt_seqs = [], [], [], []
    for group, row in enumerate(dataset):
        prompt = list(row["prompt_input_ids"])
        prompt_seqs.append(prompt)
        for response in row["responses_input_ids"]:
            sequences.append(prompt + list(response))
            starts.append(len(prompt))
            groups.append(group)
    per_layer: list[list[torch.Tensor]] = [[] for _ in layers]
    for first in tqdm(range(0, len(sequences), batch_size), desc="Reading pool hidden states", unit="batch"):
        ids, mask = _pad_right(sequences[first : first + batch_size], pad_token_id)
        response_mask = mask.clone()
        for row, start in enumerate(starts[first : first + batch_size]):
            response_mask[row, :start] = 0
        states = read_hidden_states(base, layout, layers, ids.to(device), mask.to(device))
        for slot, layer_states in enumerate(states):
            per_layer[slot].append(masked_mean(layer_states, response_mask.to(device)).cpu())
    prompt_features = []
    for first in range(0, len(prompt_seqs), batch_size):
        ids, mask = _pad_right(prompt_seqs[first : first + batch_size], pad_token_id)
        (states,) = read_hidden_states(base, layout, layers[:1], ids.to(device), mask.to(device))
        prompt_features.append(masked_mean(states, mask.to(device)).cpu())
    return [torch.cat(f) for f in per_layer], torch.tensor(groups), torch.cat(prompt_features)


def _centre_within_groups(features: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    sums = torch.zeros(int(groups.max()) + 1, features.shape[1]).index_add_(0, groups, features)
    counts = torch.bincount(groups).clamp(min=1).unsqueeze(1).float()
    return features - (sums / counts)[groups]


@torch.no_grad()
def own_latent_log_likelihood_gain(
    model: PrefAlignForCausalLM, dataset: Dataset, pad_token_id: int, scales: tuple[float, ...]
) -> dict[float, float]:
    """Per-token log-likelihood gain of each response under its own posterior mean over z = 0, with the residual
    adapter's weights multiplied by each of `scales` (teacher forcing; the weights are restored after)."""
    adapter = model.latent_adapter
    weight = adapter.weight.detach().clone()
    totals, tokens = dict.fromkeys(scales, 0.0), 0
    try:
        for row in dataset:
            prompt = list(row["prompt_input_ids"])
            ids, mask = _pad_right([prompt + list(r) for r in row["responses_input_ids"]], pad_token_id)
            ids, mask = ids.to(model.device), mask.to(model.device)
            labels = ids.masked_fill(mask == 0, -100)
            labels[:, : len(prompt)] = -100
            means = model.posterior(ids, mask, response_mask=labels != -100, refinement_steps=0).mean
            zero, count = sequence_log_likelihood(model(input_ids=ids, attention_mask=mask).logits, labels)
            tokens += int(count.sum())
            for scale in scales:
                adapter.weight.copy_(weight * scale)
                own, _ = sequence_log_likelihood(
                    model(input_ids=ids, attention_mask=mask, latents=means).logits, labels
                )
                totals[scale] += float((own - zero).sum())
    finally:
        adapter.weight.copy_(weight)
    return {scale: total / max(tokens, 1) for scale, total in totals.items()}


@torch.no_grad()
def init_latent_space_from_pool(
    model: PrefAlignForCausalLM,
    dataset: Dataset,
    pad_token_id: int,
    adapter_scale: float | None = None,
    max_prompts: int | None = 256,
    batch_size: int = 16,
    calibration_prompts: int = 8,
) -> dict[str, float]:
    """Start the hidden-state encoder (and a residual adapter) from the pool's within-prompt principal directions.

    Args:
        model (`PrefAlignForCausalLM`): a backbone with `encoder_type="hidden_states"`.
        dataset (`Dataset`): the tokenized training pool (as `CLaPTrainer` prepares it).
        pad_token_id (`int`): padding id of the tokenizer.
        adapter_scale (`float`, *optional*): the adapter maps a response's own z back to this many times its own
            deviation from the prompt's mean state. `None` calibrates it: the scale of `CALIBRATION_SCALES` under
            which the last `calibration_prompts` prompts read (held out of the directions' fit) are most likely
            given their responses' own z.
        max_prompts (`int`, *optional*, defaults to 256): prompts read (the first ones); `None` reads all.
        calibration_prompts (`int`, *optional*, defaults to 8): prompts held out for the calibration (at most a
            quarter of those read).

    Returns:
        `dict`: what the start found (responses read, the share of within-prompt variance the latent directions
        explain).
    """
    encoder = model.latent_encoder
    if not isinstance(encoder, HiddenStateEncoder):
        raise ValueError("The PCA start needs `encoder_type='hidden_states'` (the paper's encoder has no such start).")
    if max_prompts is not None and len(dataset) > max_prompts:
        dataset = dataset.select(range(max_prompts))
    adapter = model.latent_adapter if isinstance(model.latent_adapter, ResidualLatentAdapter) else None
    calibration = None
    if adapter is not None and adapter_scale is None:
        held_out = min(calibration_prompts, len(dataset) // 4)
        if held_out == 0:
            logger.warning("The pool is too small to calibrate the adapter's scale (4+ prompts); using 1.0.")
            adapter_scale = 1.0
        else:
            calibration = dataset.select(range(len(dataset) - held_out, len(dataset)))
            dataset = dataset.select(range(len(dataset) - held_out))
    layers = [encoder.layer] + (adapter.layers if adapter is not None else [])
    features, groups, prompt_features = pool_features(model, dataset, layers, pad_token_id, batch_size)
    latent_dim = model.config.latent_dim
    num = features[0].shape[0]
    if num < 2 * latent_dim:
        logger.warning(
            f"The PCA start reads {num} responses for {latent_dim} latent dimensions; the directions past the "
            f"{num - 1}th are noise. Use a larger pool."
        )
    within = _centre_within_groups(features[0], groups)  # (N, H)
    _, singular, right = torch.linalg.svd(within, full_matrices=False)  # right: (min(N,H), H)
    rank = min(latent_dim, right.shape[0])
    scale = (singular[:rank] / math.sqrt(num)).clamp(min=1e-6)  # std of each direction over responses
    head = torch.zeros(2 * latent_dim, features[0].shape[1])
    head[:rank] = right[:rank] / scale.unsqueeze(1)  # z_k = u_k . (f - mean) / s_k: whitened
    head_bias = torch.zeros(2 * latent_dim)
    head_bias[latent_dim:] = model.config.posterior_init_logvar
    target = encoder.to_gaussian
    target.weight.copy_(head.to(target.weight))
    target.bias.copy_(head_bias.to(target.bias))
    encoder.feature_mean.copy_(features[0].mean(0).to(encoder.feature_mean))
    encoder.prompt_feature_mean.copy_(prompt_features.mean(0).to(encoder.prompt_feature_mean))
    # Continue as an exponential moving average from here rather than restarting a cumulative mean.
    encoder.feature_mean_updates.fill_(int(1 / encoder.feature_mean_momentum))

    if adapter is not None:
        z = within @ head[:latent_dim].T  # (N, Z), whitened within-prompt coordinates
        for slot, layer_features in enumerate(features[1:]):
            deviations = _centre_within_groups(layer_features, groups)  # (N, H)
            weight = (adapter_scale or 1.0) * deviations.T @ z / num  # (H, Z) = scale * E[d z^T]
            adapter.weight[slot].copy_(weight.to(adapter.weight))
    explained = float((singular[:rank] ** 2).sum() / (singular**2).sum().clamp(min=1e-12))
    summary = {"responses": num, "prompts": len(dataset), "explained_variance": round(explained, 4)}
    if calibration is not None:
        gains = own_latent_log_likelihood_gain(model, calibration, pad_token_id, CALIBRATION_SCALES)
        adapter_scale = max(gains, key=gains.get)
        adapter.weight.mul_(adapter_scale)
        summary["calibration_prompts"] = len(calibration)
        summary["calibration_gain_per_token"] = {f"{k:.3g}": round(v, 4) for k, v in gains.items()}
    if adapter is not None:
        summary["adapter_scale"] = round(float(adapter_scale), 4)
    logger.info(f"PCA start of the latent space: {summary}")
    return summary


__all__ = ["init_latent_space_from_pool", "pool_features"]
