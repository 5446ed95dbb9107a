"""Which users a quickstart backbone can show: every simulated user, greedy answers on validation prompts.

Reads a finished `hf-prefalign quickstart` run (its backbone and pool), aligns one user per scorer with
`LatentDPOConfig`'s defaults on that pool, and answers validation prompts (bundled prompts the quickstart did not use:
neither its pool nor its held-out side-by-side) the way the quickstart does (greedy, `no_repeat_ngram_size=4`, the
quickstart's `max_new_tokens`), neutral and each user at each strength in one batch per prompt. Per user and strength:
the user's reward (mean +- SE over prompts), its gain in the neutral answers' standard deviations, mean words,
answers that ended before the cap, and perplexity under the base.

This is what chose the quickstart's two default users (docs/quickstart.md); the numbers are written to
`<output>.json` and `<output>.md`.

    python examples/quickstart_users.py --run prefalign-quickstart
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

# The evidence script's statistics (same folder): mean, std, se.
from preference_space_evidence import stats
from transformers import AutoTokenizer

from hf_prefalign import LatentDPOConfig, LatentDPOTrainer, PrefAlignForCausalLM
from hf_prefalign.data.pairs import preference_pairs_from_pool
from hf_prefalign.data.pools import load_response_pool
from hf_prefalign.data.prompts import load_bundled_prompts, tokenize_prompt
from hf_prefalign.scorers import get_scorer


USERS = ["positive", "negative", "concise", "detailed", "questioning", "structured"]


@torch.no_grad()
def perplexity(model: PrefAlignForCausalLM, prompt_ids: list[list[int]], answers: list[list[int]]) -> float:
    """Perplexity of `answers` under the base model (the backbone with no latent), one prompt at a time."""
    total, count = 0.0, 0
    for prompt, answer in zip(prompt_ids, answers, strict=True):
        if not answer:
            continue
        ids = torch.tensor([prompt + answer], device=model.device)
        logits = model(input_ids=ids, latents=None, use_cache=False).logits[0, len(prompt) - 1 : -1].float()
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, len(prompt) :], reduction="sum"))
        count += len(answer)
    return math.exp(total / max(count, 1))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="prefalign-quickstart", help="a finished quickstart run")
    parser.add_argument("--users", nargs="+", default=USERS)
    parser.add_argument("--strengths", default="1,2")
    parser.add_argument("--prompts", type=int, default=8, help="validation prompts (after the quickstart's)")
    parser.add_argument("--output", default="docs/quickstart_users")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    start = time.perf_counter()
    run = Path(args.run)
    state = json.loads((run / "quickstart.json").read_text())
    settings = state["settings"]
    model = PrefAlignForCausalLM.from_pretrained(run / "backbone").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "backbone")
    pool = load_response_pool(run / "pool")

    # Users: the quickstart's own recipe (library defaults) on its own pool
    pairs_per_user = {}
    for name in args.users:
        pairs = preference_pairs_from_pool(pool, get_scorer(name))
        config = LatentDPOConfig(
            output_dir=str(run / "quickstart-users" / name), latent_cache_dir="none", report_to=[], seed=0
        )
        trainer = LatentDPOTrainer(model, config, train_dataset=pairs, processing_class=tokenizer)
        trainer.train()
        model.load_preference(trainer.model, preference_id=name, overwrite=True)
        pairs_per_user[name] = len(pairs)

    # Validation prompts: the bundled prompts after the quickstart's `num_prompts`
    bundled = load_bundled_prompts()
    first = settings["num_prompts"]
    if first + args.prompts > len(bundled):
        raise SystemExit(f"only {len(bundled) - first} bundled prompts follow the quickstart's {first}")
    prompts = bundled.select(range(first, first + args.prompts))
    strengths = [float(s) for s in args.strengths.split(",")]
    columns = [(None, 0.0)] + [(user, s) for user in args.users for s in strengths]
    answers: dict[int, list[list[int]]] = {c: [] for c in range(len(columns))}
    prompt_ids = [tokenize_prompt(tokenizer, row["prompt"]) for row in prompts]
    eos = tokenizer.eos_token_id
    for ids_list in prompt_ids:
        ids = torch.tensor([ids_list], device=model.device)
        latents = torch.cat(
            [
                torch.zeros(1, model.config.latent_dim, device=model.device)
                if user is None
                else model.preference_latents(ids, None, user, strength=s)
                for user, s in columns
            ]
        )
        batch = ids.expand(len(columns), -1)
        out = model.generate(
            input_ids=batch,
            attention_mask=torch.ones_like(batch),
            latents=latents,
            do_sample=False,
            no_repeat_ngram_size=4,  # as the quickstart
            max_new_tokens=settings["max_new_tokens"],
            pad_token_id=tokenizer.pad_token_id,
        )
        for c, sequence in enumerate(out[:, ids.shape[1] :].tolist()):
            answers[c].append(sequence[: sequence.index(eos) + 1] if eos in sequence else sequence)

    def texts(c: int) -> list[str]:
        return [tokenizer.decode(a, skip_special_tokens=True) for a in answers[c]]

    def describe(c: int) -> dict:
        decoded = texts(c)
        return {
            "words": sum(len(t.split()) for t in decoded) / len(decoded),
            "ended": sum(eos in a for a in answers[c]),
            "perplexity": perplexity(model, prompt_ids, answers[c]),
        }

    neutral = describe(0)
    results: dict = {
        "settings": {**vars(args), "quickstart": settings, "prompt_range": [first, first + args.prompts]},
        "neutral": neutral,
        "users": {},
    }
    for user in args.users:
        scorer = get_scorer(user)
        reference = stats(scorer(texts(0)).tolist())
        entry = {"pairs": pairs_per_user[user], "neutral_reward": reference, "strengths": {}}
        for c, (name, s) in enumerate(columns):
            if name != user:
                continue
            reward = stats(scorer(texts(c)).tolist())
            point = describe(c)
            entry["strengths"][str(s)] = {
                "reward": reward,
                "gain_in_neutral_sd": (reward["mean"] - reference["mean"]) / (reference["std"] or 1.0),
                **point,
                "perplexity_ratio": point["perplexity"] / neutral["perplexity"],
            }
        results["users"][user] = entry
    results["seconds"] = time.perf_counter() - start
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    output.with_suffix(".md").write_text(render(results))
    print(render(results))
    return results


def render(results: dict) -> str:
    settings = results["settings"]
    first, last = settings["prompt_range"]
    neutral = results["neutral"]
    lines = [
        "<!-- generated by examples/quickstart_users.py; do not edit by hand -->",
        "",
        f"Quickstart backbone ({settings['quickstart']['num_prompts']} prompts, the last "
        f"{settings['quickstart']['num_heldout']} held out), one user per scorer with the Latent DPO defaults; "
        f"greedy answers (at most {settings['quickstart']['max_new_tokens']} new tokens) to {last - first} "
        f"validation prompts (bundled prompts {first}-{last - 1}). Neutral: {neutral['words']:.0f} words, "
        f"{neutral['ended']}/{last - first} ended before the cap.",
        "",
        "| user | pairs | neutral reward | strength | reward (+- SE) | gain (neutral SDs) | words | ended | "
        "perplexity vs neutral |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for user, entry in results["users"].items():
        reference = entry["neutral_reward"]
        for s, p in entry["strengths"].items():
            lines.append(
                f"| {user} | {entry['pairs']} | {reference['mean']:.3f} | {float(s):g} | "
                f"{p['reward']['mean']:.3f} +- {p['reward']['se']:.3f} | {p['gain_in_neutral_sd']:+.2f} | "
                f"{p['words']:.0f} | {p['ended']}/{last - first} | {100 * (p['perplexity_ratio'] - 1):+.0f}% |"
            )
    lines += ["", f"Run time: {results['seconds']:.0f} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
