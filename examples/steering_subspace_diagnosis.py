"""How much of each user's steering direction can z reach? A training-pool diagnosis (embedded default model, 2 cores).

With the PCA start, z is the whitened coordinate of a response's mean residual stream (at the encoder layer) along
the top `latent_dim` within-prompt principal directions of the pool, and the residual adapter maps z back along the
same directions. A user's mean difference in z (`PreferenceEmbedding.from_examples`, the warm start of Latent DPO)
therefore steers with the projection of their CAA vector (chosen minus rejected responses' mean residual stream,
from the same pairs) onto that subspace. This script reports, per user, the share of the CAA vector's squared norm
that the top-k directions hold, for several k, on the training pool of `examples/preference_space_evidence.py`.
Writes `docs/preference_space/subspace.json`.

    python examples/steering_subspace_diagnosis.py [--work-dir outputs/preference_space]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from preference_space_evidence import USERS, _pad_right, get_pool, split_prompts

from hf_prefalign import PrefAlignForCausalLM, load_default_base
from hf_prefalign.data.pairs import preference_pairs_from_pool
from hf_prefalign.data.prompts import tokenize_prompt, tokenize_response
from hf_prefalign.models.prefalign.hidden_state_encoder import masked_mean, read_hidden_states
from hf_prefalign.scorers import get_scorer


@torch.no_grad()
def response_states(
    base, layout, tokenizer, pool, layer: int, batch_size: int = 16
) -> dict[tuple[str, str], torch.Tensor]:
    """Mean residual stream over each pool response entering `layer`, keyed by (prompt, response)."""
    items = [(row["prompt"], response) for row in pool for response in row["responses"]]
    states = {}
    for first in range(0, len(items), batch_size):
        chunk = items[first : first + batch_size]
        rows, starts = [], []
        for prompt, response in chunk:
            prompt_ids = tokenize_prompt(tokenizer, prompt)
            rows.append((prompt_ids + tokenize_response(tokenizer, response))[:384])
            starts.append(len(prompt_ids))
        ids, mask = _pad_right(rows, tokenizer.pad_token_id)
        response_mask = mask.clone()
        for r, start in enumerate(starts):
            response_mask[r, :start] = 0
        (hidden,) = read_hidden_states(base, layout, [layer], ids, mask)
        for key, value in zip(chunk, masked_mean(hidden, response_mask).float(), strict=True):
            states[(str(key[0]), key[1])] = value
    return states


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="outputs/preference_space")
    parser.add_argument("--output", default="docs/preference_space/subspace.json")
    parser.add_argument("--ranks", default="8,16,32,64,128,256")
    parser.add_argument("--max-pairs", type=int, default=256)
    cli = parser.parse_args()
    args = argparse.Namespace(
        train_prompts=128, probe_prompts=24, val_prompts=16, test_prompts=48, num_responses=8, seed=0,
        max_new_tokens=96,
    )  # fmt: skip
    torch.set_num_threads(2)
    start = time.perf_counter()
    splits = split_prompts(args)
    base, tokenizer = load_default_base()
    pool = get_pool("train", splits["train"], base, tokenizer, Path(cli.work_dir), args)
    bf16_base, _ = load_default_base(dtype="auto")
    layout = PrefAlignForCausalLM.from_base(bf16_base, tokenizer=tokenizer).layout
    layer = PrefAlignForCausalLM.from_base(bf16_base, tokenizer=tokenizer).latent_encoder.layer
    states = response_states(bf16_base, layout, tokenizer, pool, layer)

    # Within-prompt principal directions, as the PCA start computes them
    features, groups = [], []
    for index, row in enumerate(pool):
        rows = torch.stack([states[(str(row["prompt"]), r)] for r in row["responses"]])
        features.append(rows - rows.mean(0))
        groups += [index] * len(rows)
    within = torch.cat(features)  # (N, H)
    _, singular, right = torch.linalg.svd(within, full_matrices=False)
    ranks = [int(k) for k in cli.ranks.split(",")]
    report = {
        "layer": layer,
        "responses": within.shape[0],
        "variance_share_of_top_k": {k: float((singular[:k] ** 2).sum() / (singular**2).sum()) for k in ranks},
        "users": {},
    }
    for user in USERS:
        pairs = preference_pairs_from_pool(pool, get_scorer(user))
        pairs = pairs.shuffle(seed=0).select(range(min(cli.max_pairs, len(pairs))))
        difference = torch.stack(
            [states[(str(r["prompt"]), r["chosen"])] - states[(str(r["prompt"]), r["rejected"])] for r in pairs]
        ).mean(0)  # (H,): the CAA vector on response-mean states
        projections = right @ difference  # (min(N, H),)
        total = float(difference.pow(2).sum())
        report["users"][user] = {
            "caa_norm": total**0.5,
            "share_in_top_k": {k: float(projections[:k].pow(2).sum()) / total for k in ranks},
        }
        print(user, json.dumps(report["users"][user]), flush=True)
    report["seconds"] = time.perf_counter() - start
    Path(cli.output).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
