"""Latent DPO evidence on the embedded default model: simulated users aligned in seconds, served in one batch.

Needs the CLaP backbone and pool of `examples/clap_evidence.py` (its --output-dir). For each simulated user (a real
scorer: VADER sentiment positive / negative, word count concise / detailed) it builds preference pairs from the
training prompts' responses as the paper does (best vs 2nd worst, 2nd best vs worst), trains the user's prior with
Latent DPO on cached encoder outputs, then generates on the held-out prompts - every user and the neutral model in
the same batch - and compares each user's reward with the neutral model's and the fluency (perplexity under the base
model).

    python examples/latent_dpo_evidence.py [--clap-dir outputs/clap] [--output-json docs/latent_dpo_results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer

import hf_prefalign
from hf_prefalign import LatentCache, LatentDPOConfig, LatentDPOTrainer, PrefAlignForCausalLM, load_response_pool
from hf_prefalign.data.pairs import preference_pairs_from_pool
from hf_prefalign.data.prompts import tokenize_prompt
from hf_prefalign.scorers import get_scorer


USERS = ["positive", "negative", "concise", "detailed"]


def mean_std_se(values: list[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(n - 1, 1))
    return {"mean": mean, "std": std, "n": n, "se": std / math.sqrt(n)}


@torch.no_grad()
def response_nll(model: PrefAlignForCausalLM, prompt_ids: list[int], response_ids: list[int]) -> tuple[float, int]:
    """Summed NLL of a response under the plain base model (fluency), and its token count."""
    if not response_ids:
        return 0.0, 0
    ids = torch.tensor([prompt_ids + response_ids])
    with model.disable_latent():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(response_ids), reduction="sum")
    return float(nll), len(response_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clap-dir", default="outputs/clap")
    parser.add_argument("--output-dir", default="outputs/latent_dpo")
    parser.add_argument("--output-json", default="docs/latent_dpo_results.json")
    parser.add_argument("--output-table", default="docs/latent_dpo_results.md", help="Markdown table of the figures")
    parser.add_argument("--users", nargs="+", default=USERS)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--epochs", type=float, default=10.0)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--beta", type=float, default=0.3)
    parser.add_argument(
        "--posterior-refinement-steps",
        type=int,
        default=None,
        help="override the backbone's setting (see PrefAlignConfig; 0: the encoder alone)",
    )
    parser.add_argument("--posterior-refinement-step-size", type=float, default=None)
    parser.add_argument("--cache-dir", default=None, help="persist the latent cache here (reused by later runs)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    clap_dir, output_dir = Path(args.clap_dir), Path(args.output_dir)

    overrides = {
        name: value
        for name, value in (
            ("posterior_refinement_steps", args.posterior_refinement_steps),
            ("posterior_refinement_step_size", args.posterior_refinement_step_size),
        )
        if value is not None
    }
    model = PrefAlignForCausalLM.from_pretrained(clap_dir / "backbone", **overrides)
    tokenizer = AutoTokenizer.from_pretrained(clap_dir / "backbone")
    pool_dir = next(clap_dir.glob("pool-*"))
    pool = load_response_pool(pool_dir)
    num_train = int(round(0.9 * len(pool)))
    train_pool, heldout_pool = pool.select(range(num_train)), pool.select(range(num_train, len(pool)))

    # One-time: encode the training pool (every user below ranks these same responses).
    cache = LatentCache(model, tokenizer, cache_dir=args.cache_dir)
    start = time.perf_counter()
    cache.encode_pool(train_pool)
    cache_seconds = time.perf_counter() - start
    print(f"latent cache: {cache.encoder_sequences} sequences encoded in {cache_seconds:.1f}s")

    users = {}
    for name in args.users:
        scorer = get_scorer(name)
        pairs = preference_pairs_from_pool(train_pool, scorer)
        config = LatentDPOConfig(
            output_dir=str(output_dir / name),
            num_train_epochs=args.epochs,
            learning_rate=args.learning_rate,
            beta=args.beta,
            seed=args.seed,
            disable_tqdm=True,
            use_cpu=True,
        )
        trainer = LatentDPOTrainer(model, config, train_dataset=pairs, processing_class=tokenizer, latent_cache=cache)
        start = time.perf_counter()
        result = trainer.train()
        train_seconds = time.perf_counter() - start
        embedding_dir = output_dir / name / "embedding"
        trainer.save_preference(embedding_dir)
        model.load_preference(embedding_dir, preference_id=name, overwrite=True)
        users[name] = {
            "pairs": len(pairs),
            "steps": result.global_step,
            "train_seconds": train_seconds,
            "cache_sequences_encoded_for_this_user": trainer.cache_sequences_encoded,
            "artefact_bytes": sum(f.stat().st_size for f in embedding_dir.iterdir()),
            "final_logs": [log for log in trainer.state.log_history if "rewards/accuracy" in log][-1],
        }
        print(
            f"{name}: {len(pairs)} pairs, {result.global_step} steps, {train_seconds:.2f}s, "
            f"{users[name]['artefact_bytes']} bytes, encoder runs for this user: {trainer.cache_sequences_encoded}"
        )

    # Held-out generation: neutral + every user in one batch per prompt (one preference id per row).
    ids_per_row = [None, *args.users]
    texts: dict[str | None, list[str]] = {pid: [] for pid in ids_per_row}
    nll: dict[str | None, list[float]] = {pid: [0.0, 0] for pid in ids_per_row}
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    for row in heldout_pool:
        prompt_ids = tokenize_prompt(tokenizer, row["prompt"])
        rows = [pid for pid in ids_per_row for _ in range(args.samples_per_prompt)]
        input_ids = torch.tensor([prompt_ids] * len(rows))
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            preference_id=rows,
            do_sample=True,
            top_k=50,
            max_new_tokens=args.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        for pid, sequence in zip(rows, out[:, len(prompt_ids) :], strict=True):
            response_ids = [t for t in sequence.tolist() if t != tokenizer.pad_token_id]
            texts[pid].append(tokenizer.decode(response_ids, skip_special_tokens=True).strip())
            total, count = response_nll(model, prompt_ids, response_ids)
            nll[pid][0] += total
            nll[pid][1] += count
    generation_seconds = time.perf_counter() - start

    def perplexity(pid: str | None) -> float:
        return math.exp(nll[pid][0] / max(nll[pid][1], 1))

    evaluation = {}
    for name in args.users:
        scorer = get_scorer(name)
        aligned = mean_std_se(scorer(texts[name]).tolist())
        neutral = mean_std_se(scorer(texts[None]).tolist())
        gain = aligned["mean"] - neutral["mean"]
        se_gain = math.sqrt(aligned["se"] ** 2 + neutral["se"] ** 2)
        evaluation[name] = {
            "reward_aligned": aligned,
            "reward_neutral": neutral,
            "reward_gain": gain,
            "reward_gain_se": se_gain,
            "gain_exceeds_se": gain > se_gain,
            "perplexity_aligned": perplexity(name),
            "perplexity_neutral": perplexity(None),
            "perplexity_ratio": perplexity(name) / perplexity(None),
            "examples": texts[name][:2],
        }
        print(
            f"{name}: reward {aligned['mean']:.3f} vs neutral {neutral['mean']:.3f} (gain {gain:+.3f} +- "
            f"{se_gain:.3f}); perplexity {perplexity(name):.2f} vs {perplexity(None):.2f}"
        )

    results = {
        "machine": {"platform": platform.platform(), "cpu_threads": torch.get_num_threads()},
        "versions": {
            "hf_prefalign": hf_prefalign.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "settings": vars(args),
        "posterior": {
            "refinement_steps": model.config.posterior_refinement_steps,
            "refinement_step_size": model.config.posterior_refinement_step_size,
        },
        "heldout_prompts": len(heldout_pool),
        "one_time": {"latent_cache_seconds": cache_seconds, "latent_cache_sequences": cache.encoder_sequences},
        "users": users,
        "evaluation": evaluation,
        "generation": {"seconds": generation_seconds, "rows_per_batch": len(ids_per_row) * args.samples_per_prompt},
        "neutral_examples": texts[None][:2],
    }
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"written to {args.output_json}")
    if args.output_table:
        Path(args.output_table).write_text(render_table(results))
        print(f"written to {args.output_table}")


def render_table(results: dict) -> str:
    """The figures of one run as a Markdown page (generated; do not edit by hand)."""
    settings = results["settings"]
    lines = [
        "<!-- generated by examples/latent_dpo_evidence.py; do not edit -->",
        "# Latent DPO on SmolLM2-135M-Instruct: measured",
        "",
        f"{results['heldout_prompts']} held-out prompts x {settings['samples_per_prompt']} sampled responses per user "
        f"(top-k 50, {settings['max_new_tokens']} new tokens), every user and the neutral model decoded in the same "
        f"batches ({results['generation']['rows_per_batch']} rows, one preference id per row). Reward gain = aligned "
        "mean - neutral mean, with the standard error of that difference. Perplexity: the base model's, on the "
        "generated responses. Posterior of the backbone: "
        + (
            f"encoder + {results['posterior']['refinement_steps']} refinement step(s) of length "
            f"{results['posterior']['refinement_step_size']}."
            if results["posterior"]["refinement_steps"]
            else "encoder alone."
        )
        + f" Latent DPO: {settings['epochs']} epochs, lr {settings['learning_rate']}, beta {settings['beta']}.",
        "",
        "| user | pairs | train loop (s) | artefact | reward aligned | reward neutral | gain +- se | "
        "perplexity aligned / neutral |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, user in results["users"].items():
        ev = results["evaluation"][name]
        lines.append(
            f"| {name} | {user['pairs']} | {user['train_seconds']:.2f} | {user['artefact_bytes'] / 1024:.1f} KB | "
            f"{ev['reward_aligned']['mean']:.3f} | {ev['reward_neutral']['mean']:.3f} | "
            f"{ev['reward_gain']:+.3f} +- {ev['reward_gain_se']:.3f} | "
            f"{ev['perplexity_aligned']:.2f} / {ev['perplexity_neutral']:.2f} ({100 * (ev['perplexity_ratio'] - 1):+.1f}%) |"
        )
    one_time = results["one_time"]
    if one_time["latent_cache_sequences"]:
        cache_line = (
            f"One-time cost, shared by all users: encoding the training pool ({one_time['latent_cache_sequences']} "
            f"prompts and responses) took {one_time['latent_cache_seconds']:.1f} s."
        )
    else:
        cache_line = (
            f"The training pool's latents came from the cache on disk ({results['settings']['cache_dir']}), built by an "
            "earlier run; that one-time cost is in docs/latent_dpo.md."
        )
    lines += ["", cache_line + " Per-user training never runs the LM.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
