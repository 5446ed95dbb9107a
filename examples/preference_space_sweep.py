"""Where should z act, and how strongly? A validation-split sweep that chose the defaults of `PrefAlignConfig`
(`encoder_layer`, `steering_layers`) and `CLaPConfig.latent_init_scale`.

For each candidate layer, a backbone reads and steers at that layer and starts from the pool's PCA (no gradient
step: Latent DPO never runs the LM, so a user's z does not depend on the adapter's scale, and scale x strength is
one knob at generation). Every user is aligned by Latent DPO on the same pairs as in the evidence run, then sampled
on the *validation* prompts at several effective scales. Reports reward gain over the base (in base SDs) and
perplexity under the base; writes `<output>.json` and `<output>.md`.

    python examples/preference_space_sweep.py [--work-dir outputs/preference_space] [--output docs/preference_space/sweep]

Reuses the training pool that `examples/preference_space_evidence.py` builds (and builds it if absent).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

# The evidence script's helpers (same folder): splits, pools, batched sampling, perplexity, statistics.
from preference_space_evidence import PPL_BUDGET, USERS, get_pool, perplexity_under, sample_rows, split_prompts, stats

from hf_prefalign import (
    CLaPConfig,
    CLaPTrainer,
    LatentCache,
    LatentDPOConfig,
    LatentDPOTrainer,
    PrefAlignForCausalLM,
    load_default_base,
)
from hf_prefalign.data.pairs import preference_pairs_from_pool
from hf_prefalign.scorers import get_scorer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="outputs/preference_space")
    parser.add_argument("--output", default="docs/preference_space/sweep")
    parser.add_argument("--train-prompts", type=int, default=128)
    parser.add_argument("--probe-prompts", type=int, default=24)
    parser.add_argument("--val-prompts", type=int, default=16)
    parser.add_argument("--test-prompts", type=int, default=48)
    parser.add_argument("--num-responses", type=int, default=8)
    parser.add_argument("--val-samples", type=int, default=2, help="samples per prompt of the swept split")
    parser.add_argument(
        "--split",
        choices=("val", "test"),
        default="val",
        help="`val` chooses; `test` only reports a choice already made on `val` (never tune on it)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--max-pairs", type=int, default=256)
    parser.add_argument(
        "--layers",
        default="7,15",
        help="candidates: `L` reads and steers at layer L; `L@A+B+C` reads at L and steers at layers A, B and C",
    )
    parser.add_argument("--scales", default="2,4,8", help="effective adapter scales (init scale x strength)")
    parser.add_argument("--users", nargs="+", default=USERS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    splits = split_prompts(args)
    base, tokenizer = load_default_base()  # fp32 for sampling
    tokenizer.padding_side = "left"
    pool = get_pool("train", splits["train"], base, tokenizer, work, args)
    bf16_base, _ = load_default_base(dtype="auto")
    val_prompts = list(splits[args.split]["prompt"])  # named for the default split
    scales = [float(x) for x in args.scales.split(",")]
    user_pairs = {}
    for name in args.users:
        pairs = preference_pairs_from_pool(pool, get_scorer(name))
        user_pairs[name] = pairs.shuffle(seed=args.seed).select(range(min(args.max_pairs, len(pairs))))

    results: dict = {"settings": vars(args), "layers": {}}
    base_rows = None
    for candidate in args.layers.split(","):
        layer, steering_layers = parse_candidate(candidate)
        # PCA start at adapter scale 1 (the effective scale is applied as a strength below)
        backbone = PrefAlignForCausalLM.from_base(
            bf16_base, tokenizer=tokenizer, encoder_layer=layer, steering_layers=steering_layers
        )
        CLaPTrainer(
            model=backbone,
            args=CLaPConfig(
                output_dir=str(work / "sweep-pca"),
                max_steps=0,
                latent_init_scale=1.0,
                save_strategy="no",
                report_to=[],
            ),
            train_dataset=pool,
            processing_class=tokenizer,
        )._init_latent_space(resuming=False)
        backbone.eval()
        cache = LatentCache(backbone, tokenizer)
        cache.encode_pool(pool)
        generator = PrefAlignForCausalLM.from_base(
            base, tokenizer=tokenizer, encoder_layer=layer, steering_layers=steering_layers
        ).eval()
        generator.load_state_dict(backbone.latent_state_dict(), strict=False)
        for name in args.users:
            config = LatentDPOConfig(output_dir=str(work / "sweep-users" / name), report_to=[], seed=args.seed)
            trainer = LatentDPOTrainer(
                backbone, config, train_dataset=user_pairs[name], processing_class=tokenizer, latent_cache=cache
            )
            trainer.train()
            generator.load_preference(trainer.model, preference_id=name, overwrite=True)

        settings = [(None, 0.0)] + [(user, scale) for user in args.users for scale in scales]

        def rows(ids, mask, c, settings=settings, generator=generator):
            user, strength = settings[c]
            if user is None:
                return {"latents": torch.zeros(ids.shape[0], generator.config.latent_dim)}
            return {"latents": generator.preference_latents(ids, mask, user, strength=strength)}

        sampled = sample_rows(
            generator.generate, tokenizer, val_prompts, len(settings), rows, args.val_samples, args, 10_000
        )
        if base_rows is None:  # z = 0 is the base for every layer (same seeds): one reference
            base_rows = sampled[0]
        base_ppl = perplexity_under(bf16_base, tokenizer, val_prompts, base_rows, args.val_samples)
        per_user: dict = {}
        for (user, scale), responses in zip(settings[1:], sampled[1:], strict=True):
            scorer = get_scorer(user)
            texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
            reference = stats(scorer([tokenizer.decode(r, skip_special_tokens=True) for r in base_rows]).tolist())
            reward = stats(scorer(texts).tolist())
            per_user.setdefault(user, []).append(
                {
                    "scale": scale,
                    "reward": reward,
                    "base_reward": reference,
                    "gain_in_base_sd": (reward["mean"] - reference["mean"]) / (reference["std"] or 1.0),
                    "gain_in_se": (reward["mean"] - reference["mean"])
                    / ((reward["se"] ** 2 + reference["se"] ** 2) ** 0.5 or 1.0),
                    "perplexity_ratio": perplexity_under(
                        bf16_base, tokenizer, val_prompts, responses, args.val_samples
                    )
                    / base_ppl,
                }
            )
        summary = {}
        for scale in scales:
            points = [next(p for p in per_user[u] if p["scale"] == scale) for u in args.users]
            summary[str(scale)] = {
                "mean_gain_in_base_sd": sum(p["gain_in_base_sd"] for p in points) / len(points),
                "mean_perplexity_ratio": sum(p["perplexity_ratio"] for p in points) / len(points),
                "users_within_budget": sum(p["perplexity_ratio"] <= PPL_BUDGET for p in points),
            }
        results["layers"][candidate] = {"users": per_user, "summary": summary}
        print(candidate, json.dumps(summary), flush=True)
        results["seconds"] = time.perf_counter() - start
        write(results, Path(args.output))  # after every layer: a stopped sweep keeps what it measured
    print(render(results))


def parse_candidate(candidate: str) -> tuple[int, list[int]]:
    """`"15"` -> (15, [15]); `"15@8+15+22"` -> (15, [8, 15, 22]): the encoder's layer and the steering layers."""
    encoder, _, steering = candidate.partition("@")
    return int(encoder), [int(x) for x in steering.split("+")] if steering else [int(encoder)]


def write(results: dict, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    output.with_suffix(".md").write_text(render(results))


def render(results: dict) -> str:
    split = results["settings"].get("split", "val")
    title = "Validation" if split == "val" else "Test"
    lines = [
        "<!-- generated by examples/preference_space_sweep.py; do not edit by hand -->",
        "",
        f"{title} split ({results['settings'][f'{split}_prompts']} prompts x "
        f"{results['settings']['val_samples']} samples), PCA start only, Latent DPO per user; gain over the base in "
        "base SDs / perplexity vs the base.",
        "",
    ]
    users = results["settings"]["users"]
    lines.append("| layer | scale | " + " | ".join(users) + " | mean gain | mean ppl | users within +15% |")
    lines.append("|---|---:|" + "---:|" * (len(users) + 3))
    for layer, entry in results["layers"].items():
        for scale, summary in entry["summary"].items():
            cells = []
            for user in users:
                p = next(p for p in entry["users"][user] if str(p["scale"]) == scale)
                cells.append(f"{p['gain_in_base_sd']:+.2f} / {100 * (p['perplexity_ratio'] - 1):+.0f}%")
            lines.append(
                f"| {layer} | {float(scale):g} | "
                + " | ".join(cells)
                + f" | {summary['mean_gain_in_base_sd']:+.2f} | {100 * (summary['mean_perplexity_ratio'] - 1):+.0f}%"
                + f" | {summary['users_within_budget']}/{len(users)} |"
            )
    lines.append("")
    lines.append(f"Run time: {results['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
