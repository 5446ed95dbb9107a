"""Which Latent DPO prior recipe moves users? Chosen on the validation split, reported on the test split (2 CPU cores).

On the CLaP backbone of `examples/preference_space_evidence.py` (trained there, or here with the same code and saved
to the same place, so the evidence run reuses it), for each of its 6 simulated users and the same <= 256 pairs, it
compares where Latent DPO starts and what it trains (`LatentDPOConfig.prior_init` / `prompt_dependent_prior`):

- `paper`: N(0, I) start, constant + rank-8 prompt-dependent prior trained (the paper's recipe);
- `pairs`: start at the pairs' mean difference in z, both parts trained;
- `pairs_constant`: start at the pairs' mean difference, only the constant mean and variance trained;
- `examples`: the pairs' mean difference with no training (`PreferenceEmbedding.from_examples`).

Each at the given preference strengths, on one split's prompts (validation: 16 x 2 samples; test: 48 x 4; same
seeds for every setting, base model in the same batches): reward gain over the base model in base SDs and in SEs,
and perplexity of the samples under the base relative to the base's own. On validation a recipe's score is its mean
gain over users, each user at the strength with the highest reward within +15% perplexity; the best score wins.
Settings are chosen on `--split val` only; `--split test` just reports. Writes `<output>.json` and `<output>.md`.

    python examples/latent_dpo_prior_recipes.py --split val --strengths 1,2
    python examples/latent_dpo_prior_recipes.py --split test --recipes pairs_constant --strengths chosen
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
    parser.add_argument("--output", default=None, help="default: docs/preference_space/prior_recipes_<split>")
    parser.add_argument("--split", choices=["val", "test"], default="val")
    parser.add_argument(
        "--strengths",
        default="1,2",
        help="comma-separated; or, with --split test, 'validated' (1 and each user's validated strength) or "
        "'chosen' (only the validated one)",
    )
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--users", nargs="+", default=USERS)
    parser.add_argument("--max-pairs", type=int, default=256)
    parser.add_argument("--samples", type=int, default=None, help="samples per prompt (default: val 2, test 4)")
    cli = parser.parse_args()
    from_validation = cli.strengths in ("validated", "chosen")
    if not from_validation and 1.0 not in [float(x) for x in cli.strengths.split(",")]:
        parser.error("--strengths must include 1 (the default strength)")
    if from_validation and cli.split != "test":
        parser.error(f"--strengths {cli.strengths} reads the validation run: use it with --split test")
    cli.samples = cli.samples or (2 if cli.split == "val" else 4)
    cli.output = cli.output or f"docs/preference_space/prior_recipes_{cli.split}"
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
                    for p in splits[cli.split]["prompt"][:8]
                ]
            )  # (8, Z)
            report["users"].setdefault(user, {})[recipe] = {
                "pairs": len(pairs),
                "train_seconds": seconds,
                "z_norm": float(z.norm(dim=1).mean()),
                "z_spread_over_prompts": float(z.std(0).norm()),
            }
        print(user, json.dumps(report["users"][user]), flush=True)

    # On validation each user's strength is chosen there; on test it is read from the validation run, never chosen.
    validated = None
    if cli.split == "test":
        validated = json.loads(Path(cli.output.replace("_test", "_val")).with_suffix(".json").read_text())

    def strengths_of(user: str, recipe: str) -> list[float]:
        if cli.strengths in ("validated", "chosen"):  # the one validation chose (and strength 1, the default)
            chosen = validated["users"][user][recipe]["chosen"]["strength"]
            return sorted({1.0, chosen}) if cli.strengths == "validated" else [chosen]
        return [float(s) for s in cli.strengths.split(",")]

    settings = [(None, 0.0)] + [(u, r, s) for u in cli.users for r in cli.recipes for s in strengths_of(u, r)]

    def rows(ids, mask, c):
        if settings[c][0] is None:
            return {"latents": torch.zeros(ids.shape[0], generator.config.latent_dim)}
        user, recipe, strength = settings[c]
        return {"latents": generator.preference_latents(ids, mask, f"{user}.{recipe}", strength=strength)}

    t = time.perf_counter()
    prompts = list(splits[cli.split]["prompt"])
    seed = 10_000 if cli.split == "val" else 20_000
    # The samples are kept on disk first, so that scoring can be redone without sampling again.
    samples_path = work / "prior-recipes" / f"samples_{cli.split}.json"
    samples_path.parent.mkdir(parents=True, exist_ok=True)
    out = sample_rows(generator.generate, tokenizer, prompts, len(settings), rows, cli.samples, args, seed)
    samples_path.write_text(json.dumps({"settings": settings, "responses": out}))
    base_ppl = perplexity_under(bf16_base, tokenizer, prompts, out[0], cli.samples)
    base_texts = [tokenizer.decode(r, skip_special_tokens=True) for r in out[0]]
    for (user, recipe, strength), responses in zip(settings[1:], out[1:], strict=True):
        scorer = get_scorer(user)
        reference = stats(scorer(base_texts).tolist())
        reward = stats(scorer([tokenizer.decode(r, skip_special_tokens=True) for r in responses]).tolist())
        sd = reference["std"] or 1.0
        se = (reward["se"] ** 2 + reference["se"] ** 2) ** 0.5
        gain = reward["mean"] - reference["mean"]
        report["users"][user][recipe].setdefault("curve", []).append(
            {
                "strength": strength,
                "reward": reward["mean"],  # what pick_within_budget ranks
                "reward_stats": reward,
                "base_reward": reference,
                "gain_sd": gain / sd,
                "gain_se_sd": se / sd,
                "gain_in_se": gain / se if se > 0 else 0.0,
                "perplexity": perplexity_under(bf16_base, tokenizer, prompts, responses, cli.samples),
                "ended_naturally": sum(bool(r) and r[-1] == tokenizer.eos_token_id for r in responses)
                / len(responses),
            }
        )
    scores = {}
    for recipe in cli.recipes:
        chosen = []
        for user in cli.users:
            entry = report["users"][user][recipe]
            if validated is None:
                entry["chosen"] = pick_within_budget(entry["curve"], base_ppl)
            else:
                strength = validated["users"][user][recipe]["chosen"]["strength"]
                entry["chosen"] = next(p for p in entry["curve"] if p["strength"] == strength)
            chosen.append(entry["chosen"])
        scores[recipe] = {
            "mean_gain_sd_within_budget": sum(c["gain_sd"] for c in chosen) / len(chosen),
            "se": (sum(c["gain_se_sd"] ** 2 for c in chosen)) ** 0.5 / len(chosen),
            "users_within_budget": sum(c["perplexity"] <= PPL_BUDGET * base_ppl for c in chosen),
            "users_at_3_se": sum(c["gain_in_se"] >= 3 for c in chosen),
            "users_at_half_sd": sum(c["gain_sd"] >= 0.5 for c in chosen),
        }
        at_1 = [[p["gain_sd"] for p in report["users"][u][recipe]["curve"] if p["strength"] == 1.0] for u in cli.users]
        scores[recipe]["mean_gain_sd_at_strength_1"] = (
            sum(g[0] for g in at_1) / len(at_1) if all(at_1) else None  # None: strength 1 not sampled
        )
    report["scores"] = scores
    if cli.split == "val":
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
    lines = ["<!-- generated by examples/latent_dpo_prior_recipes.py; do not edit by hand -->", ""]
    lines += [
        f"Split `{report['settings']['split']}` ({report['settings']['samples']} samples per prompt). Gain over the "
        f"base model in base SDs, at the strength with the highest reward within "
        f"+{round((report['budget'] - 1) * 100)}% perplexity on validation (strength, perplexity ratio in brackets).",
        "",
        "| recipe | " + " | ".join(users) + " | mean +- SE | users >= 3 SE | users >= 0.5 SD | at strength 1 |",
        "|---|" + "---|" * (len(users) + 4),
    ]
    for recipe in recipes:
        cells = []
        for user in users:
            c = report["users"][user][recipe]["chosen"]
            cells.append(
                f"{c['gain_sd']:+.2f} (x{c['strength']:g}, {c['perplexity'] / report['base_perplexity']:.2f})"
            )
        s = report["scores"][recipe]
        at_1 = "-" if s["mean_gain_sd_at_strength_1"] is None else f"{s['mean_gain_sd_at_strength_1']:+.2f}"
        lines.append(
            f"| {recipe} | "
            + " | ".join(cells)
            + f" | {s['mean_gain_sd_within_budget']:+.2f} +- {s['se']:.2f} | {s.get('users_at_3_se', '-')} | "
            f"{s.get('users_at_half_sd', '-')} | {at_1} |"
        )
    lines += ["", "Every point (gain in base SDs / in SEs, perplexity ratio, answers ended naturally):", ""]
    for user in users:
        for recipe in recipes:
            points = report["users"][user][recipe]["curve"]
            text = "; ".join(
                f"x{p['strength']:g}: {p['gain_sd']:+.2f} / {p['gain_in_se']:+.1f} SE, "
                f"{p['perplexity'] / report['base_perplexity']:.2f}, {p['ended_naturally']:.2f}"
                for p in points
            )
            lines.append(f"- {user}, {recipe}: {text}")
    if "winner" in report:
        lines += ["", f"Winner on validation: `{report['winner']}`."]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
