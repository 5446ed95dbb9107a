"""Beyond the paper, measured: users from k examples, the strength dial, and mixes of two users (2 CPU cores).

On the CLaP backbone and training pool of `examples/preference_space_evidence.py` (trained there or here, with the
same code and into the same place), for the 6 simulated users and test prompts that are in no pool:

- `strength`: each user aligned by Latent DPO (library defaults, <= 256 pairs) at `preference_strength` s for s in
  `--strengths` (s = 0 is the neutral model, which equals the base): reward and perplexity per s;
- `mix`: `preference_id={a: 1 - w, b: w}` for two opposed users (`--mix concise detailed`) and w in `--mix-weights`;
  both users' rewards per w (w = 0 is user a, w = 1 user b);
- `examples`: a user from k pairs without training (`PreferenceEmbedding.from_examples`, the k chosen responses
  liked and the k rejected ones disliked; at its own scale and at each of `--examples-target-kls`) against Latent
  DPO trained on the same k pairs, for k in `--ks`, with the time each takes.

`--split val` measures on the validation prompts instead of the test prompts, to choose a setting there.
Every setting is sampled in one batch per prompt with the base model (same seeds); a gain is in base SDs and in SEs
(over the base's samples), perplexity is that of the samples under the base, relative to the base's own. Nothing is
chosen here: the settings are fixed in advance, the strengths and weights are the issue's grid. Writes the samples
to `<work>/personalisation/samples.json` before scoring, then `<output>.json` and `<output>.md`.

    python examples/personalisation_evidence.py [--features strength mix examples] [--samples 2]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from itertools import pairwise
from pathlib import Path

import torch
from preference_space_evidence import (
    USERS,
    get_backbone,
    get_pool,
    perplexity_under,
    sample_rows,
    split_prompts,
    stats,
    write_report,
)

from hf_prefalign import LatentCache, LatentDPOConfig, LatentDPOTrainer, PreferenceEmbedding, load_default_base
from hf_prefalign.data.pairs import preference_pairs_from_pool
from hf_prefalign.scorers import get_scorer
from hf_prefalign.utils.constants import DEFAULT_TARGET_KL


FEATURES = ("strength", "mix", "examples")


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def parse_target_kls(text: str) -> list[float | None]:
    """`none,0.14`: from_examples at its own scale (`none`) and at each target KL."""
    return [None if x.strip().lower() == "none" else float(x) for x in text.split(",")]


def examples_label(target_kl: float | None) -> str:
    return "from_examples" if target_kl is None else f"from_examples_kl{target_kl:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="outputs/preference_space")
    parser.add_argument("--output", default="docs/personalisation/evidence")
    parser.add_argument("--features", nargs="+", choices=FEATURES, default=list(FEATURES))
    parser.add_argument("--users", nargs="+", default=USERS)
    parser.add_argument("--examples-users", nargs="+", default=None, help="users of the k curve (default: --users)")
    parser.add_argument("--max-pairs", type=int, default=256)
    parser.add_argument("--strengths", type=parse_floats, default=parse_floats("0.5,1,1.5,2"))
    parser.add_argument("--mix", nargs=2, default=["concise", "detailed"], metavar=("A", "B"))
    parser.add_argument("--mix-weights", type=parse_floats, default=parse_floats("0.25,0.5,0.75"))
    parser.add_argument("--ks", type=lambda t: [int(x) for x in t.split(",")], default=[2, 4, 8, 16])
    parser.add_argument(
        "--examples-target-kls",
        type=parse_target_kls,
        default=[None, DEFAULT_TARGET_KL],
        help="from_examples at its own scale (none) and at these departures; default: none and the library's",
    )
    parser.add_argument("--split", choices=["test", "val"], default="test", help="the evidence run's prompts to use")
    parser.add_argument("--prompts", type=int, default=48, help="prompts used (of the split's 48 test or 16 val)")
    parser.add_argument("--samples", type=int, default=2, help="samples per prompt and setting")
    cli = parser.parse_args()
    if any(s < 0 for s in cli.strengths) or any(not 0 < w < 1 for w in cli.mix_weights):
        parser.error("strengths must be >= 0 and mix weights strictly between 0 and 1")
    if any(kl is not None and not kl > 0 for kl in cli.examples_target_kls):
        parser.error("--examples-target-kls takes `none` or positive numbers")
    if "mix" in cli.features and not set(cli.mix) <= set(cli.users):
        parser.error(f"--mix users {cli.mix} must be among --users")
    examples_users = cli.examples_users or cli.users
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
    backbone = get_backbone(work / "backbone", pool, bf16_base, tokenizer, args)
    cache = LatentCache(backbone, tokenizer)
    cache.encode_pool(pool)  # the one-time cost every user shares, reported apart
    generator = type(backbone).from_pretrained(work / "backbone", base_model=base).eval()

    def latent_dpo(pairs, name: str) -> tuple[LatentDPOTrainer, float]:
        config = LatentDPOConfig(
            output_dir=str(work / "personalisation" / name), report_to=[], seed=args.seed, disable_tqdm=True
        )
        trainer = LatentDPOTrainer(
            backbone, config, train_dataset=pairs, processing_class=tokenizer, latent_cache=cache
        )
        start = time.perf_counter()
        trainer.train()
        return trainer, time.perf_counter() - start

    report: dict = {"settings": vars(cli), "timings_seconds": {}, "users": {}}
    settings: list[tuple[str, object, float]] = [("base", None, 0.0)]  # (label, preference id, strength)
    trained = set(cli.users if {"strength", "mix"} & set(cli.features) else [])
    for user in sorted(trained | (set(examples_users) if "examples" in cli.features else set()), key=USERS.index):
        pairs = preference_pairs_from_pool(pool, get_scorer(user)).shuffle(seed=args.seed)
        entry = report["users"].setdefault(user, {"pairs_available": len(pairs)})
        if user in trained:
            trainer, seconds = latent_dpo(pairs.select(range(min(cli.max_pairs, len(pairs)))), user)
            generator.load_preference(trainer.model, preference_id=user, overwrite=True)
            entry["latent_dpo"] = {"pairs": min(cli.max_pairs, len(pairs)), "train_seconds": seconds}
        if "examples" in cli.features and user in examples_users:
            for k in cli.ks:
                subset = pairs.select(range(min(k, len(pairs))))
                liked = [{"prompt": r["prompt"], "response": r["chosen"]} for r in subset]
                disliked = [{"prompt": r["prompt"], "response": r["rejected"]} for r in subset]
                row = entry.setdefault("k", {}).setdefault(str(k), {"pairs": len(subset)})
                for target_kl in cli.examples_target_kls:
                    label = examples_label(target_kl)
                    start = time.perf_counter()
                    embedding = PreferenceEmbedding.from_examples(
                        backbone, tokenizer, liked, disliked, latent_cache=cache, target_kl=target_kl
                    )
                    row[f"{label}_ms"] = 1000 * (time.perf_counter() - start)
                    generator.load_preference(embedding, preference_id=f"{user}.{label}.k{k}", overwrite=True)
                    settings += [(f"{user}/{label}/k{k}", f"{user}.{label}.k{k}", 1.0)]
                trainer, seconds = latent_dpo(subset, f"{user}-k{k}")
                generator.load_preference(trainer.model, preference_id=f"{user}.latent_dpo.k{k}", overwrite=True)
                row["latent_dpo_train_seconds"] = seconds
                settings += [(f"{user}/latent_dpo/k{k}", f"{user}.latent_dpo.k{k}", 1.0)]
    if "strength" in cli.features:
        settings += [(f"{u}/strength/{s:g}", u, s) for u in cli.users for s in cli.strengths]
    if "mix" in cli.features:
        a, b = cli.mix
        settings += [(f"mix/{w:g}", {a: 1 - w, b: w}, 1.0) for w in cli.mix_weights]
        if "strength" not in cli.features or 1.0 not in cli.strengths:
            settings += [(f"{u}/strength/1", u, 1.0) for u in cli.mix]
    labels = [label for label, _, _ in settings]
    if len(set(labels)) != len(labels):
        raise ValueError("duplicate settings")

    def rows(ids, mask, c):
        _, preference_id, strength = settings[c]
        return {"latents": generator.preference_latents(ids, mask, preference_id, strength=strength)}

    prompts = list(splits[cli.split]["prompt"])[: cli.prompts]
    print(f"sampling {len(settings)} settings x {len(prompts)} prompts x {cli.samples} samples", flush=True)
    t = time.perf_counter()
    samples_path = work / "personalisation" / "samples.json"
    samples_path.parent.mkdir(parents=True, exist_ok=True)
    out = sample_rows(generator.generate, tokenizer, prompts, len(settings), rows, cli.samples, args, 30_000)
    samples_path.write_text(json.dumps({"settings": labels, "responses": out}))
    report["timings_seconds"]["generation"] = time.perf_counter() - t

    texts = {
        label: [tokenizer.decode(r, skip_special_tokens=True) for r in o] for label, o in zip(labels, out, strict=True)
    }
    base_ppl = perplexity_under(bf16_base, tokenizer, prompts, out[0], cli.samples)
    report["base_perplexity"] = base_ppl

    def point(label: str, user: str) -> dict:
        scorer = get_scorer(user)
        reference = stats(scorer(texts["base"]).tolist())
        reward = stats(scorer(texts[label]).tolist())
        sd = reference["std"] or 1.0
        se = math.sqrt(reward["se"] ** 2 + reference["se"] ** 2)
        gain = reward["mean"] - reference["mean"]
        responses = out[labels.index(label)]
        return {
            "reward": reward,
            "gain_sd": gain / sd,
            "gain_se_sd": se / sd,
            "gain_in_se": gain / se if se > 0 else 0.0,
            "perplexity_ratio": perplexity_under(bf16_base, tokenizer, prompts, responses, cli.samples) / base_ppl,
        }

    results: dict = {}
    if "strength" in cli.features:
        for user in cli.users:
            curve = [{"strength": 0.0, **point("base", user)}]
            curve += [{"strength": s, **point(f"{user}/strength/{s:g}", user)} for s in cli.strengths]
            results.setdefault("strength", {})[user] = curve
        steps = [
            curve[i + 1]["reward"]["mean"] >= curve[i]["reward"]["mean"]
            for curve in results["strength"].values()
            for i in range(len(curve) - 1)
        ]
        mean_gain = [
            sum(curve[i]["gain_sd"] for curve in results["strength"].values()) / len(cli.users)
            for i in range(len(cli.strengths) + 1)
        ]
        results["strength_summary"] = {
            "mean_gain_sd_by_strength": dict(zip(["0"] + [f"{s:g}" for s in cli.strengths], mean_gain, strict=True)),
            "monotone_on_average": all(b >= a for a, b in pairwise(mean_gain)),
            "rising_steps": f"{sum(steps)}/{len(steps)}",
        }
    if "mix" in cli.features:
        a, b = cli.mix
        weights = [0.0, *cli.mix_weights, 1.0]
        mix_labels = [f"{a}/strength/1", *[f"mix/{w:g}" for w in cli.mix_weights], f"{b}/strength/1"]
        curve = [
            {"weight_of_" + b: w, a: point(lab, a), b: point(lab, b)}
            for w, lab in zip(weights, mix_labels, strict=True)
        ]
        rewards_b = [c[b]["reward"]["mean"] for c in curve]
        results["mix"] = {
            "users": [a, b],
            "curve": curve,
            "monotone": all(y >= x for x, y in pairwise(rewards_b)),
        }
    if "examples" in cli.features:
        for user in examples_users:
            for k in cli.ks:
                row = report["users"][user]["k"][str(k)]
                for target_kl in cli.examples_target_kls:
                    label = examples_label(target_kl)
                    row[label] = point(f"{user}/{label}/k{k}", user)
                row["latent_dpo"] = point(f"{user}/latent_dpo/k{k}", user)
        results["examples"] = {u: report["users"][u]["k"] for u in examples_users}
    report["results"] = results
    report["timings_seconds"]["total"] = time.perf_counter() - run_start
    write_report(cli.output, report, render(report))
    print(render(report))


def render(report: dict) -> str:
    settings, results = report["settings"], report["results"]
    lines = ["<!-- generated by examples/personalisation_evidence.py; do not edit by hand -->", ""]
    lines += [
        f"{settings['prompts']} {'validation' if settings.get('split') == 'val' else 'test'} prompts x "
        f"{settings['samples']} samples per setting; gain over the base model "
        "in base SDs (in SEs), perplexity of the samples under the base relative to the base's own.",
        "",
    ]
    if "strength" in results:
        strengths = ["0", *[f"{s:g}" for s in settings["strengths"]]]
        lines += ["### Preference strength", "", "| user | " + " | ".join(f"s = {s}" for s in strengths) + " |"]
        lines.append("|---|" + "---|" * len(strengths))
        for user, curve in results["strength"].items():
            cells = [f"{c['gain_sd']:+.2f} ({c['gain_in_se']:+.1f} SE), x{c['perplexity_ratio']:.2f}" for c in curve]
            lines.append(f"| {user} | " + " | ".join(cells) + " |")
        summary = results["strength_summary"]
        means = " / ".join(f"{v:+.2f}" for v in summary["mean_gain_sd_by_strength"].values())
        lines += [
            "",
            f"Mean gain over users by strength: {means} base SDs; monotone on average: "
            f"{'yes' if summary['monotone_on_average'] else 'no'}; rising steps {summary['rising_steps']}.",
            "",
        ]
    if "mix" in results:
        a, b = results["mix"]["users"]
        lines += [
            "### Mixing two users",
            "",
            f"| weight of {b} | {a} gain | {b} gain | perplexity |",
            "|---|---|---|---|",
        ]
        for c in results["mix"]["curve"]:
            lines.append(
                f"| {c['weight_of_' + b]:g} | {c[a]['gain_sd']:+.2f} ({c[a]['gain_in_se']:+.1f} SE) | "
                f"{c[b]['gain_sd']:+.2f} ({c[b]['gain_in_se']:+.1f} SE) | x{c[b]['perplexity_ratio']:.2f} |"
            )
        lines += ["", f"{b}'s reward monotone in the weight: {'yes' if results['mix']['monotone'] else 'no'}.", ""]
    if "examples" in results:
        labels = [examples_label(kl) for kl in settings.get("examples_target_kls", [None])]
        names = {label: label.replace("_kl", " at KL ") for label in labels}

        def cell(point: dict) -> str:
            return f"{point['gain_sd']:+.2f} ({point['gain_in_se']:+.1f} SE), x{point['perplexity_ratio']:.2f}"

        lines += [
            "### Users from k examples (no training) against Latent DPO on the same k pairs",
            "",
            "| user | k | "
            + " | ".join(f"{names[label]} gain | time (ms)" for label in labels)
            + " | Latent DPO gain | time (s) |",
            "|---|---:|" + "---|---:|" * len(labels) + "---|---:|",
        ]
        for user, ks in results["examples"].items():
            for k, row in ks.items():
                cells = [f"{cell(row[label])} | {row[f'{label}_ms']:.0f}" for label in labels]
                lines.append(
                    f"| {user} | {k} | " + " | ".join(cells) + f" | {cell(row['latent_dpo'])} | "
                    f"{row['latent_dpo_train_seconds']:.2f} |"
                )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
