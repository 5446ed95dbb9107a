"""Which Latent DPO prior recipe moves users? Chosen on the validation split only (embedded default model, 2 CPU cores).

On the CLaP backbone of `examples/preference_space_evidence.py` (trained there, or here with the same code and saved
to the same place, so the evidence run reuses it), for each of its 6 simulated users and the same <= 256 pairs, it
compares where Latent DPO starts and what it trains (`LatentDPOConfig.prior_init` / `prompt_dependent_prior`):

- `paper`: N(0, I) start, constant + rank-8 prompt-dependent prior trained (the paper's recipe);
- `pairs`: start at the pairs' mean difference in z, both parts trained;
- `pairs_constant`: start at the pairs' mean difference, only the constant mean and variance trained;
- `examples`: the pairs' mean difference with no training (`PreferenceEmbedding.from_examples`).

Each at preference strengths 1, 2 and 4, on the validation prompts (16 x 2 samples, same seeds for every setting):
reward gain over the base model in base SDs, and perplexity of the samples under the base relative to the base's own.
A recipe's score is its mean gain over users, each user at the strongest strength within +15% perplexity. Writes
`<output>.json` and `<output>.md`.

    python examples/latent_dpo_prior_validation.py [--work-dir outputs/preference_space]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from preference_space_evidence import (
    PPL_BUDGET,
    USERS,
    get_backbone,
    get_pool,
    perplexity_under,
    pick_within_budget,
    sample_rows,
    split_prompts,
    stats,
)

from hf_prefalign import LatentCache, LatentDPOConfig, LatentDPOTrainer, PrefAlignForCausalLM, load_default_base
from hf_prefalign.data.pairs import preference_pairs_from_pool
from hf_prefalign.data.prompts import tokenize_prompt
from hf_prefalign.scorers import get_scorer


RECIPES = {
    "paper": {"prior_init": "zeros", "prompt_dependent_prior": True},
    "pairs": {"prior_init": "pairs", "prompt_dependent_prior": True},
    "pairs_constant": {"prior_init": "pairs", "prompt_dependent_prior": False},
    "examples": {"prior_init": "pairs", "prompt_dependent_prior": False, "max_steps": 0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="outputs/preference_space")
    parser.add_argument("--output", default="docs/preference_space/prior_validation")
    parser.add_argument("--strengths", default="1,2,4")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--users", nargs="+", default=USERS)
    parser.add_argument("--max-pairs", type=int, default=256)
    parser.add_argument("--val-samples", type=int, default=2)
    cli = parser.parse_args()
    # The evidence run's splits and pools (its defaults)
    args = argparse.Namespace(
        train_prompts=128, probe_prompts=24, val_prompts=16, test_prompts=48, num_responses=8, seed=0,
        max_new_tokens=96, clap_max_steps=None,
    )  # fmt: skip
    torch.set_num_threads(2)
    run_start = time.perf_counter()
    work = Path(cli.work_dir)
    splits = split_prompts(args)
    base, tokenizer = load_default_base()
    tokenizer.padding_side = "left"
    pool = get_pool("train", splits["train"], base, tokenizer, work, args)
    bf16_base, _ = load_default_base(dtype="auto")
    t = time.perf_counter()
    backbone = get_backbone(work / "backbone", pool, bf16_base, tokenizer, args)
    clap_seconds = time.perf_counter() - t
    cache = LatentCache(backbone, tokenizer)
    cache.encode_pool(pool)
    generator = PrefAlignForCausalLM.from_pretrained(work / "backbone", base_model=base).eval()

    report: dict = {"settings": vars(cli), "budget": PPL_BUDGET, "users": {}}
    for user in cli.users:
        pairs = preference_pairs_from_pool(pool, get_scorer(user))
        pairs = pairs.shuffle(seed=args.seed).select(range(min(cli.max_pairs, len(pairs))))
        for recipe in cli.recipes:
            options = RECIPES[recipe]
            config = LatentDPOConfig(
                output_dir=str(work / "prior-validation" / recipe / user),
                report_to=[],
                seed=args.seed,
                disable_tqdm=True,
                **options,
            )
            trainer = LatentDPOTrainer(backbone, config, train_dataset=pairs, processing_class=tokenizer,
                                       latent_cache=cache)  # fmt: skip
            start = time.perf_counter()
            if options.get("max_steps") != 0:
                trainer.train()
            seconds = time.perf_counter() - start
            generator.load_preference(trainer.model, preference_id=f"{user}.{recipe}", overwrite=True)
            z = torch.stack(
                [
                    generator.preference_latents(
                        torch.tensor([tokenize_prompt(tokenizer, p)]), None, f"{user}.{recipe}"
                    )[0]
                    for p in splits["val"]["prompt"][:8]
                ]
            )  # (8, Z)
            report["users"].setdefault(user, {})[recipe] = {
                "pairs": len(pairs),
                "train_seconds": seconds,
                "z_norm": float(z.norm(dim=1).mean()),
                "z_spread_over_prompts": float(z.std(0).norm()),
            }
        print(user, json.dumps(report["users"][user]), flush=True)

    strengths = [float(s) for s in cli.strengths.split(",")]
    settings = [(None, 0.0)] + [(u, r, s) for u in cli.users for r in cli.recipes for s in strengths]

    def rows(ids, mask, c):
        if settings[c][0] is None:
            return {"latents": torch.zeros(ids.shape[0], generator.config.latent_dim)}
        user, recipe, strength = settings[c]
        return {"latents": generator.preference_latents(ids, mask, f"{user}.{recipe}", strength=strength)}

    t = time.perf_counter()
    val_prompts = list(splits["val"]["prompt"])
    out = sample_rows(generator.generate, tokenizer, val_prompts, len(settings), rows, cli.val_samples, args, 10_000)
    base_ppl = perplexity_under(bf16_base, tokenizer, val_prompts, out[0], cli.val_samples)
    base_texts = [tokenizer.decode(r, skip_special_tokens=True) for r in out[0]]
    for (user, recipe, strength), responses in zip(settings[1:], out[1:], strict=True):
        scorer = get_scorer(user)
        reference = stats(scorer(base_texts).tolist())
        reward = stats(scorer([tokenizer.decode(r, skip_special_tokens=True) for r in responses]).tolist())
        sd = reference["std"] or 1.0
        report["users"][user][recipe].setdefault("curve", []).append(
            {
                "strength": strength,
                "reward": reward["mean"],
                "gain_sd": (reward["mean"] - reference["mean"]) / sd,
                "gain_se_sd": (reward["se"] ** 2 + reference["se"] ** 2) ** 0.5 / sd,
                "perplexity": perplexity_under(bf16_base, tokenizer, val_prompts, responses, cli.val_samples),
            }
        )
    scores = {}
    for recipe in cli.recipes:
        chosen = []
        for user in cli.users:
            entry = report["users"][user][recipe]
            entry["chosen"] = pick_within_budget(entry["curve"], base_ppl)
            chosen.append(entry["chosen"])
        scores[recipe] = {
            "mean_gain_sd_within_budget": sum(c["gain_sd"] for c in chosen) / len(chosen),
            "se": (sum(c["gain_se_sd"] ** 2 for c in chosen)) ** 0.5 / len(chosen),
            "users_within_budget": sum(c["perplexity"] <= PPL_BUDGET * base_ppl for c in chosen),
            "mean_gain_sd_at_strength_1": sum(
                next(p["gain_sd"] for p in report["users"][u][recipe]["curve"] if p["strength"] == 1.0)
                for u in cli.users
            )
            / len(cli.users),
        }
    report["scores"] = scores
    report["winner"] = max(scores, key=lambda r: scores[r]["mean_gain_sd_within_budget"])
    report["base_perplexity"] = base_ppl
    report["timings_seconds"] = {
        "clap": clap_seconds,
        "generation": time.perf_counter() - t,
        "total": time.perf_counter() - run_start,
    }
    output = Path(cli.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    output.with_suffix(".md").write_text(render(report))
    print(render(report))


def render(report: dict) -> str:
    users, recipes = list(report["users"]), list(report["scores"])
    lines = ["<!-- generated by examples/latent_dpo_prior_validation.py; do not edit by hand -->", ""]
    lines += [
        f"Validation split only. Gain over the base model in base SDs at the strongest strength within "
        f"+{round((report['budget'] - 1) * 100)}% perplexity (strength, perplexity ratio in brackets).",
        "",
        "| recipe | " + " | ".join(users) + " | mean +- SE | at strength 1 |",
        "|---|" + "---|" * (len(users) + 2),
    ]
    for recipe in recipes:
        cells = []
        for user in users:
            c = report["users"][user][recipe]["chosen"]
            cells.append(
                f"{c['gain_sd']:+.2f} (x{c['strength']:g}, {c['perplexity'] / report['base_perplexity']:.2f})"
            )
        s = report["scores"][recipe]
        lines.append(
            f"| {recipe} | "
            + " | ".join(cells)
            + f" | {s['mean_gain_sd_within_budget']:+.2f} +- {s['se']:.2f} | {s['mean_gain_sd_at_strength_1']:+.2f} |"
        )
    lines += ["", f"Winner: `{report['winner']}`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
