"""Is z a preference space? The evidence run on the embedded default model (SmolLM2-135M-Instruct, 2 CPU cores).

One script, library defaults throughout (`PrefAlignForCausalLM.from_base`, `ResponsePoolConfig`, `CLaPConfig`,
`LatentDPOConfig`): the recipe measured here is what README's snippet and the CLI run.

1. Prompts: the bundled 360, shuffled once and split into a training pool, a probe pool (held-out responses for
   the encoder checks), a validation split (every setting that is chosen is chosen there) and a test split (the
   reported user figures). No test or validation prompt is in any pool.
2. Pools: K responses per prompt, each under a hidden style instruction (recorded, never shown to CLaP).
3. CLaP (PCA start + gradient steps), and two controls on the same base: the untrained backbone (`from_base`) and
   the PCA start alone (no gradient step).
4. Encoder checks on the probe pool: contrastive accuracy of the amortised encoder among a prompt's K responses; a
   ridge probe from posterior means to 6 attributes (fit on training-pool responses, R^2 on probe responses).
5. Users: 6 simulated users (real scorers), Latent DPO on at most 256 pairs from the training pool; a CAA steering
   vector from the same pairs (layer and multiplier swept on validation, per user, the best reward within +15%
   perplexity of the base). Ours has one setting for every user, `LatentDPOConfig.target_kl` (each user's departure
   from the base in nats per token under the backbone's latent metric): swept on validation, the one with the best
   mean standardised gain at which every user stays within +15% perplexity; the library's default is checked
   against it.
6. Test: every user, method and control on the test prompts x samples, same seeds: reward mean +- SE, gain over the
   base in SEs and in base SDs, perplexity under the base, distinct-2; neutral greedy output vs the base's.

    python examples/preference_space_evidence.py [--work-dir outputs/preference_space] [--output docs/preference_space/results]

Stages already on disk under --work-dir are reused: the pools, the backbone, and under `stages/<key>/` the encoder
checks, the trained users, the validation sweep and every generated chunk, keyed by the settings and the backbone's
weights. A run that is killed resumes where it stopped; delete `stages/` to recompute. Writes `<output>.json` and `<output>.md`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from steering_baselines import caa_generate as steering_caa_generate
from steering_baselines import caa_vectors_for
from steering_baselines import pad_right as _pad_right

import hf_prefalign
from hf_prefalign import (
    CLaPConfig,
    CLaPTrainer,
    LatentCache,
    LatentDPOConfig,
    LatentDPOTrainer,
    PrefAlignForCausalLM,
    build_response_pool,
    load_bundled_prompts,
    load_default_base,
    load_response_pool,
    save_response_pool,
)
from hf_prefalign.data.pairs import preference_pairs_from_pool
from hf_prefalign.data.prompts import tokenize_prompt, tokenize_response
from hf_prefalign.models.prefalign.latent_metric import departure_scale, quadratic_kl
from hf_prefalign.models.prefalign.likelihood import sequence_log_likelihood
from hf_prefalign.scorers import get_scorer
from hf_prefalign.scorers.style import exclamation_share, list_share, question_share
from hf_prefalign.utils.serialization import atomic_path, write_json_atomic


USERS = ["positive", "negative", "concise", "detailed", "questioning", "structured"]
PPL_BUDGET = 1.15  # perplexity of a user's samples under the base, relative to the base's own samples
REUSED: list[str] = []  # stage results read back from an earlier run (their time is not in this run's timings)


# ----------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------
def stats(values: list[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(n - 1, 1))
    return {"mean": mean, "std": std, "se": std / math.sqrt(n), "n": n}


def distinct_n(texts: list[str], n: int = 2) -> float:
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def attributes(text: str, vader: Callable[[list[str]], torch.Tensor]) -> list[float]:
    """The probe's targets: log word count, VADER compound, question / exclamation / list-line shares, mean word
    length."""
    words = text.split()
    return [
        math.log1p(len(words)),
        float(vader([text])[0]),
        question_share(text),
        exclamation_share(text),
        list_share(text),
        sum(map(len, words)) / max(len(words), 1),
    ]


ATTRIBUTES = ["log_words", "sentiment", "question_share", "exclamation_share", "list_share", "mean_word_length"]


# ----------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------
def add_split_arguments(parser: argparse.ArgumentParser) -> None:
    """The work folder, prompt splits and pool size; the companion scripts take the same, to find the cached pools."""
    parser.add_argument("--work-dir", default="outputs/preference_space")
    parser.add_argument("--train-prompts", type=int, default=128)
    parser.add_argument("--probe-prompts", type=int, default=24)
    parser.add_argument("--val-prompts", type=int, default=16)
    parser.add_argument("--test-prompts", type=int, default=48)
    parser.add_argument("--num-responses", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)


def write_report(output: str | Path, report: dict[str, Any], table: str) -> None:
    """`<output>.json` (the numbers) and `<output>.md` (the generated table), each replaced whole (a kill leaves the
    previous version, never half a file)."""
    for path, text in ((f"{output}.json", json.dumps(report, indent=1) + "\n"), (f"{output}.md", table)):
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")


def split_prompts(args: argparse.Namespace) -> dict[str, Dataset]:
    prompts = load_bundled_prompts()
    order = list(range(len(prompts)))
    random.Random(args.seed).shuffle(order)
    sizes = {"test": args.test_prompts, "val": args.val_prompts, "probe": args.probe_prompts}
    splits, start = {}, 0
    for name, size in sizes.items():
        splits[name] = prompts.select(order[start : start + size])
        start += size
    splits["train"] = prompts.select(order[start : start + args.train_prompts])
    return splits


def stage_dir(work: Path, args: argparse.Namespace, backbone_dir: Path) -> Path:
    """Where this run's stage results live: keyed by every setting that changes a number and by the backbone's
    weights, so a changed setting or a retrained backbone never reuses a stale stage."""
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in ("output", "render_only", "stop_after_pools")}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name in ("config.json", "model.safetensors"):
        digest.update((backbone_dir / name).read_bytes())
    return work / "stages" / digest.hexdigest()[:16]


def cached_stage(path: Path, compute: Callable[[], Any]) -> Any:
    """`compute()`'s JSON result, written atomically to `path`, or read back from there."""
    if path.is_file():
        print(f"reusing {path}", flush=True)
        REUSED.append(path.name)
        return json.loads(path.read_text())
    result = compute()
    write_json_atomic(result, path)
    return result


def get_pool(name: str, prompts: Dataset, base, tokenizer, work: Path, args: argparse.Namespace) -> Dataset:
    path = work / f"pool_{name}"
    if path.is_dir():
        return load_response_pool(path)
    start = time.perf_counter()
    pool = build_response_pool(
        base, tokenizer, prompts, num_responses=args.num_responses, batch_size=8, seed=args.seed
    )
    save_response_pool(pool, path)
    (work / f"pool_{name}.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))
    return pool


def get_backbone(
    backbone_dir: Path, pool: Dataset, bf16_base, tokenizer, args: argparse.Namespace
) -> PrefAlignForCausalLM:
    """The CLaP backbone of the library defaults, trained on `pool` (frozen base in bf16 where the CPU has it) and
    saved to `backbone_dir`, or loaded from there."""
    if not (backbone_dir / "config.json").is_file():
        model = PrefAlignForCausalLM.from_base(bf16_base, tokenizer=tokenizer)
        clap_args = CLaPConfig(
            output_dir=str(backbone_dir.parent / "clap-trainer"), save_strategy="no", report_to=[], seed=args.seed
        )
        if getattr(args, "clap_max_steps", None) is not None:
            clap_args.max_steps = args.clap_max_steps
        CLaPTrainer(model=model, args=clap_args, train_dataset=pool, processing_class=tokenizer).train()
        model.save_pretrained(backbone_dir)
    return PrefAlignForCausalLM.from_pretrained(backbone_dir, base_model=bf16_base).eval()


# ----------------------------------------------------------------------
# Encoder checks
# ----------------------------------------------------------------------
def group_batch(tokenizer, prompt, responses: list[str], max_length: int):
    prompt_ids = tokenize_prompt(tokenizer, prompt)
    rows = [(prompt_ids + tokenize_response(tokenizer, r))[:max_length] for r in responses]
    ids, mask = _pad_right(rows, tokenizer.pad_token_id)
    response_mask = mask.clone()
    response_mask[:, : len(prompt_ids)] = 0
    return ids, mask, response_mask


@torch.no_grad()
def contrastive_accuracy(model: PrefAlignForCausalLM, tokenizer, pool: Dataset, max_length: int) -> dict[str, float]:
    """Own latent ranked first among the K latents of the prompt's responses (ties count 1/k), posterior means of the
    amortised encoder (no refinement)."""
    model.eval()
    hits, gains, tokens = [], 0.0, 0
    for row in pool:
        ids, mask, response_mask = group_batch(tokenizer, row["prompt"], row["responses"], max_length)
        labels = ids.masked_fill(response_mask == 0, -100)
        means = model.posterior(ids, mask, response_mask, refinement_steps=0).mean
        k = ids.shape[0]
        if bool((means == means[:1]).all()):  # one latent for every response (untrained): a k-way tie, chance
            hits += [1 / k] * k
            continue
        scores = torch.zeros(k, k)
        for j in range(k):
            logits = model(input_ids=ids, attention_mask=mask, latents=means[j].expand(k, -1), use_cache=False).logits
            scores[:, j], _ = sequence_log_likelihood(logits, labels)  # it aligns logits and labels itself
        zero, count = sequence_log_likelihood(
            model(input_ids=ids, attention_mask=mask, latents=None, use_cache=False).logits, labels
        )
        best = scores.max(1, keepdim=True).values
        at_best = scores == best
        hits += (at_best.diagonal().float() / at_best.sum(1).float()).tolist()
        gains += float((scores.diagonal() - zero).sum())
        tokens += int(count.sum())
    k = len(pool[0]["responses"])
    accuracy = sum(hits) / len(hits)
    gain = gains / tokens if tokens else 0.0  # identical latents: z = 0 for everyone, no gain
    return {"accuracy": accuracy, "chance": 1 / k, "x_chance": accuracy * k, "nll_gain_per_token": gain}


@torch.no_grad()
def posterior_means(model, tokenizer, pool: Dataset, max_length: int) -> tuple[torch.Tensor, list[str]]:
    means, texts = [], []
    for row in pool:
        ids, mask, response_mask = group_batch(tokenizer, row["prompt"], row["responses"], max_length)
        means.append(model.posterior(ids, mask, response_mask, refinement_steps=0).mean)
        texts += row["responses"]
    return torch.cat(means), texts


def ridge_probe(train_x, train_y, test_x, test_y, alphas=(0.1, 1.0, 10.0, 100.0)) -> dict[str, Any]:
    """Ridge from posterior means to each attribute; alpha chosen by 5-fold CV on the training responses only."""
    mu_x, sd_x = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    xs, xt = (train_x - mu_x) / sd_x, (test_x - mu_x) / sd_x
    results = {}
    folds = torch.arange(xs.shape[0]) % 5
    for a, name in enumerate(ATTRIBUTES):
        y, yt = train_y[:, a], test_y[:, a]

        def fit(x, target, alpha):
            xb = torch.cat([x, torch.ones(x.shape[0], 1)], 1)
            reg = alpha * torch.eye(xb.shape[1])
            reg[-1, -1] = 0
            return torch.linalg.solve(xb.T @ xb + reg, xb.T @ target)

        def predict(w, x):
            return torch.cat([x, torch.ones(x.shape[0], 1)], 1) @ w

        def r2(pred, target):
            total = ((target - target.mean()) ** 2).sum()
            if total <= 1e-9 * target.numel():  # a constant attribute has no variance to explain
                return float("nan")
            return float(1 - ((target - pred) ** 2).sum() / total)

        cv = {
            alpha: sum(
                r2(predict(fit(xs[folds != f], y[folds != f], alpha), xs[folds == f]), y[folds == f]) for f in range(5)
            )
            / 5
            for alpha in alphas
        }
        alpha = max(cv, key=cv.get)
        results[name] = {
            "r2_heldout": r2(predict(fit(xs, y, alpha), xt), yt),
            "alpha": alpha,
            "r2_cv_train": cv[alpha],
        }
    return results


# ----------------------------------------------------------------------
# Generation and scoring
# ----------------------------------------------------------------------
SAMPLING = {"do_sample": True, "temperature": 0.7, "top_p": 0.9}


@torch.no_grad()
def sample_rows(
    generate: Callable[..., torch.Tensor],
    tokenizer,
    prompts: list,
    num_configs: int,
    row_inputs: Callable[[torch.Tensor, torch.Tensor, int], dict[str, Any]],
    samples: int,
    args,
    seed: int,
    rows_per_call: int = 48,
    resume: Path | None = None,
) -> list[list[list[int]]]:
    """For each of `num_configs` settings, `samples` responses per prompt, all settings of a prompt in one batch.

    `row_inputs(input_ids, attention_mask, config_index)` gives the extra `generate` inputs of one setting's rows
    (e.g. `latents` or steering offsets). Returns `[config][prompt * samples + s]` token lists (up to EOS). With
    `resume`, every finished call's rows are written there (atomically) and reused by a later run: each call seeds
    its own sampling, so a resumed run draws what an uninterrupted one would.
    """
    out: list[list[list[int]]] = [[] for _ in range(num_configs)]
    per_prompt = num_configs * samples
    prompts_per_call = max(1, rows_per_call // per_prompt)
    done: dict[str, list[list[list[int]]]] = {}
    if resume is not None and resume.is_file():
        done = json.loads(resume.read_text())
        print(f"reusing {len(done)} generated chunks from {resume}", flush=True)
        REUSED.append(f"{resume.name} ({len(done)} chunks)")
    for first in range(0, len(prompts), prompts_per_call):
        if str(first) in done:
            for c, rows in enumerate(done[str(first)]):
                out[c].extend(rows)
            continue
        chunk = prompts[first : first + prompts_per_call]
        encoded = [tokenize_prompt(tokenizer, p) for p in chunk]
        width = max(map(len, encoded))
        ids = torch.full((len(chunk) * per_prompt, width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        config_of_row = []
        for p_index, prompt_ids in enumerate(encoded):
            for c in range(num_configs):
                for s_index in range(samples):
                    row = (p_index * num_configs + c) * samples + s_index
                    ids[row, width - len(prompt_ids) :] = torch.tensor(prompt_ids)
                    mask[row, width - len(prompt_ids) :] = 1
                    config_of_row.append(c)
        extra: dict[str, list] = {}
        for c in range(num_configs):
            rows = [r for r, cc in enumerate(config_of_row) if cc == c]
            for key, value in row_inputs(ids[rows], mask[rows], c).items():
                extra.setdefault(key, [None] * len(config_of_row))
                for r, v in zip(rows, value, strict=True):
                    extra[key][r] = v
        kwargs = {key: torch.stack(values) for key, values in extra.items()}
        torch.manual_seed(seed + first)
        generated = generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=args.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **SAMPLING,
            **kwargs,
        )
        chunk_out: list[list[list[int]]] = [[] for _ in range(num_configs)]
        for r, sequence in enumerate(generated[:, width:].tolist()):
            if tokenizer.eos_token_id in sequence:
                sequence = sequence[: sequence.index(tokenizer.eos_token_id) + 1]
            chunk_out[config_of_row[r]].append(sequence)
        for c, rows in enumerate(chunk_out):
            out[c].extend(rows)
        if resume is not None:
            done[str(first)] = chunk_out
            write_json_atomic(done, resume)
    return out


@torch.no_grad()
def perplexity_under(base, tokenizer, prompts: list, responses: list[list[int]], samples: int) -> float:
    total, count = 0.0, 0
    for index, prompt in enumerate(prompts):
        prompt_ids = tokenize_prompt(tokenizer, prompt)
        rows = [r for r in responses[index * samples : (index + 1) * samples] if r]
        if not rows:
            continue
        ids, mask = _pad_right([prompt_ids + r for r in rows], tokenizer.pad_token_id)
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, : len(prompt_ids)] = -100
        logits = base(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="sum"
        )
        total += float(nll)
        count += int((labels[:, 1:] != -100).sum())
    return math.exp(total / max(count, 1))


def evaluate(name_to_responses: dict[str, list[list[int]]], tokenizer, scorer_bf16_base, prompts, samples) -> dict:
    results = {}
    for name, responses in name_to_responses.items():
        texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
        ended = sum(bool(r) and r[-1] == tokenizer.eos_token_id for r in responses) / len(responses)
        results[name] = {
            "texts": texts,
            "perplexity": perplexity_under(scorer_bf16_base, tokenizer, prompts, responses, samples),
            "distinct_2": distinct_n(texts),
            "ended_naturally": ended,
            "mean_words": sum(len(t.split()) for t in texts) / len(texts),
        }
    return results


# ----------------------------------------------------------------------
# CAA (examples/steering_baselines.py): the setting kept within the perplexity budget
# ----------------------------------------------------------------------
def pick_within_budget(curve: list[dict], base_ppl: float) -> dict:
    """The setting with the highest reward whose perplexity stays within PPL_BUDGET of the base (else the lowest-
    perplexity one)."""
    allowed = [point for point in curve if point["perplexity"] <= PPL_BUDGET * base_ppl]
    if not allowed:
        return min(curve, key=lambda p: p["perplexity"])
    return max(allowed, key=lambda p: p["reward"])


def departure_of(trainer: LatentDPOTrainer, model: PrefAlignForCausalLM) -> float | None:
    """A trained user's departure from the base in nats per token (its mean z over its training prompts under the
    backbone's latent metric), as `LatentDPOConfig.target_kl` measures it; `None` without a metric."""
    if model.latent_fisher is None:
        return None
    with torch.no_grad():
        means = trainer.model(trainer.train_dataset[:]["features"]).mean
    return float(quadratic_kl(means, model.latent_fisher).mean())


def strength_for(departure: float | None, target_kl: float) -> float:
    """The factor on a user's trained z that puts it at `target_kl` (trainer/departure.py); 1 without a departure."""
    if not departure:
        return 1.0
    return float(departure_scale(torch.tensor(departure), target_kl))


def pick_target_kl(curves: dict[str, list[dict]], base_ppl: float, base_sd: dict[str, float]) -> float:
    """Ours: the target departure with the best mean standardised gain over users among those at which every user's
    perplexity stays within PPL_BUDGET of the base (else the smallest)."""
    kls = sorted({p["target_kl"] for curve in curves.values() for p in curve})

    def at(kl: float) -> list[dict]:
        return [next(p for p in curve if p["target_kl"] == kl) for curve in curves.values()]

    allowed = [kl for kl in kls if all(p["perplexity"] <= PPL_BUDGET * base_ppl for p in at(kl))]
    if not allowed:
        return kls[0]
    return max(
        allowed, key=lambda kl: sum(p["gain"] / (base_sd[u] or 1.0) for u, p in zip(curves, at(kl), strict=True))
    )


# ----------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_split_arguments(parser)
    parser.add_argument("--output", default="docs/preference_space/results")
    parser.add_argument("--samples", type=int, default=4, help="test samples per prompt")
    parser.add_argument("--val-samples", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--max-pairs", type=int, default=256)
    parser.add_argument("--clap-max-steps", type=int, default=None, help="cap CLaP's gradient steps (default: config)")
    parser.add_argument(
        "--target-kls",
        default="0.04,0.07,0.1,0.14,0.2,0.28",
        help="ours: departures from the base swept on validation",
    )
    parser.add_argument("--caa-layers", default="8,15")
    parser.add_argument("--caa-multipliers", default="2,4,8")
    parser.add_argument("--users", nargs="+", default=USERS)
    parser.add_argument("--stop-after-pools", action="store_true")
    parser.add_argument(
        "--render-only", action="store_true", help="rewrite <output>.md from <output>.json; run nothing"
    )
    args = parser.parse_args()
    if args.render_only:
        Path(f"{args.output}.md").write_text(render(json.loads(Path(f"{args.output}.json").read_text())))
        return
    torch.set_num_threads(2)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    results: dict[str, Any] = {"settings": vars(args)}
    run_start = time.perf_counter()

    splits = split_prompts(args)
    base, tokenizer = load_default_base()  # fp32: sampling gains nothing from bf16
    tokenizer.padding_side = "left"
    t = time.perf_counter()
    pool = get_pool("train", splits["train"], base, tokenizer, work, args)
    probe_pool = get_pool("probe", splits["probe"], base, tokenizer, work, args)
    timings["pools"] = time.perf_counter() - t
    if args.stop_after_pools:
        return

    # CLaP with the frozen base in bf16 where the CPU has it (densities stay fp32)
    bf16_base, _ = load_default_base(dtype="auto")
    backbone_dir = work / "backbone"
    t = time.perf_counter()
    trained = get_backbone(backbone_dir, pool, bf16_base, tokenizer, args)
    timings["clap"] = time.perf_counter() - t
    results["clap_summary"] = trained.training_summary
    # The controls' latent modules start from a seeded draw, so that a resumed run meets the same controls.
    torch.manual_seed(args.seed)
    untrained = PrefAlignForCausalLM.from_base(bf16_base, tokenizer=tokenizer).eval()
    torch.manual_seed(args.seed)
    pca_only = PrefAlignForCausalLM.from_base(bf16_base, tokenizer=tokenizer)
    CLaPTrainer(
        model=pca_only,
        args=CLaPConfig(output_dir=str(work / "pca-only"), max_steps=0, save_strategy="no", report_to=[]),
        train_dataset=pool,
        processing_class=tokenizer,
    )._init_latent_space(resuming=False)
    pca_only.eval()
    backbones = {"clap": trained, "pca_start_only": pca_only, "untrained": untrained}

    # Encoder checks on the probe pool
    stages = stage_dir(work, args, backbone_dir)
    print(f"stage results: {stages}", flush=True)
    t = time.perf_counter()
    vader = get_scorer("positive")
    max_length = 384

    def encoder_checks() -> dict[str, Any]:
        checks: dict[str, Any] = {
            "contrastive": {
                name: contrastive_accuracy(model, tokenizer, probe_pool, max_length)
                for name, model in backbones.items()
            },
            "probe": {},
        }
        for name, model in backbones.items():
            train_x, train_texts = posterior_means(
                model, tokenizer, pool.select(range(min(96, len(pool)))), max_length
            )
            test_x, test_texts = posterior_means(model, tokenizer, probe_pool, max_length)
            train_y = torch.tensor([attributes(x, vader) for x in train_texts])
            test_y = torch.tensor([attributes(x, vader) for x in test_texts])
            checks["probe"][name] = ridge_probe(train_x, train_y, test_x, test_y)
        return checks

    results.update(cached_stage(stages / "encoder_checks.json", encoder_checks))
    print("contrastive", json.dumps(results["contrastive"], indent=1))
    print("probe", json.dumps(results["probe"], indent=1))
    timings["encoder_checks"] = time.perf_counter() - t

    # Users: Latent DPO on each backbone; CAA from the same pairs
    t = time.perf_counter()
    user_pairs = {}
    for name in args.users:
        pairs = preference_pairs_from_pool(pool, get_scorer(name))
        user_pairs[name] = pairs.shuffle(seed=args.seed).select(range(min(args.max_pairs, len(pairs))))
    users_dir = stages / "users"  # per backbone: each trained embedding, then its users.json last (a finished stage)
    results["users"] = {}
    for backbone_name, model in (("clap", trained), ("untrained", untrained)):
        stage = users_dir / backbone_name
        if (stage / "users.json").is_file():
            print(f"reusing {stage}", flush=True)
            REUSED.append(f"users/{backbone_name}")
            results["users"][backbone_name] = json.loads((stage / "users.json").read_text())
            for name in args.users:
                model.load_preference(stage / name, preference_id=name, overwrite=True)
            continue
        cache = LatentCache(model, tokenizer)
        cache.encode_pool(pool)
        trained_users = results["users"][backbone_name] = {}
        for name in args.users:
            # The trained scale (target_kl=None): every target departure is this user's mean times a factor.
            config = LatentDPOConfig(
                output_dir=str(work / "users" / backbone_name / name), report_to=[], seed=args.seed, target_kl=None
            )
            trainer = LatentDPOTrainer(
                model, config, train_dataset=user_pairs[name], processing_class=tokenizer, latent_cache=cache
            )
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
            model.load_preference(trainer.model, preference_id=name, overwrite=True)
            model.preferences.get(name).save_pretrained(stage / name)
            trained_users[name] = {
                "pairs": len(user_pairs[name]),
                "train_seconds": seconds,
                "posterior_separation": trainer.posterior_separation,
                "departure": departure_of(trainer, model),
            }
        write_json_atomic(trained_users, stage / "users.json")
    timings["users"] = time.perf_counter() - t

    # Generation in fp32 (sampling gains nothing from bf16) with the trained latent modules; perplexity under the
    # bf16 base for every method alike.
    generator = PrefAlignForCausalLM.from_pretrained(backbone_dir, base_model=base).eval()
    for user in args.users:
        generator.load_preference(trained.preferences.get(user), preference_id=user, overwrite=True)
    layout = trained.layout
    # The untrained backbone's users cannot move (no signal): their z is exactly 0, so they *are* the base model.
    untrained_moves = {}
    for user in args.users:
        ids = torch.tensor([tokenize_prompt(tokenizer, splits["test"][0]["prompt"])])
        untrained_moves[user] = float(untrained.preference_latents(ids, None, user).abs().max())
    results["untrained_user_latent_max_abs"] = untrained_moves

    def user_rows(settings: list[tuple[str | None, float]], model: PrefAlignForCausalLM = generator):
        def rows(ids, mask, c):
            user, strength = settings[c]
            if user is None:
                return {"latents": torch.zeros(ids.shape[0], model.config.latent_dim)}
            return {"latents": strength * model.preference_latents(ids, mask, user)}

        return rows

    def caa_generate(layer: int):
        return steering_caa_generate(base, layout, layer)

    def caa_rows(settings: list[tuple[str, int, float]]):
        def rows(ids, mask, c):
            user, layer, multiplier = settings[c]
            return {"offsets": (multiplier * caa_vectors[user][layer]).expand(ids.shape[0], -1)}

        return rows

    def point(responses, prompts, samples, user, base_reward=0.0, **setting):
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        reward = float(get_scorer(user)(texts).mean())
        return {
            **setting,
            "reward": reward,
            "gain": reward - base_reward,
            "perplexity": perplexity_under(bf16_base, tokenizer, prompts, responses, samples),
        }

    # Validation: ours, one target departure for every user; CAA's layer x multiplier per user
    t = time.perf_counter()
    val_prompts = list(splits["val"]["prompt"])
    caa_layers = [int(x) for x in args.caa_layers.split(",")]
    multipliers = [float(x) for x in args.caa_multipliers.split(",")]
    target_kls = [float(x) for x in args.target_kls.split(",")]
    departures = {user: results["users"]["clap"][user]["departure"] for user in args.users}
    caa_vectors = {
        user: caa_vectors_for(bf16_base, layout, tokenizer, user_pairs[user], caa_layers, max_length)
        for user in args.users
    }

    def validate() -> dict[str, Any]:
        # (user, strength, target_kl): the trained scale (None), then each target departure
        settings = [(None, 0.0, None)] + [(user, 1.0, None) for user in args.users]
        settings += [(user, strength_for(departures[user], kl), kl) for kl in target_kls for user in args.users]
        ours_val = sample_rows(
            generator.generate,
            tokenizer,
            val_prompts,
            len(settings),
            user_rows([(user, strength) for user, strength, _ in settings]),
            args.val_samples,
            args,
            10_000,
            resume=stages / "val_ours.json",
        )
        val_base_ppl = perplexity_under(bf16_base, tokenizer, val_prompts, ours_val[0], args.val_samples)
        base_texts = [tokenizer.decode(r, skip_special_tokens=True) for r in ours_val[0]]
        base_reward = {user: stats(get_scorer(user)(base_texts).tolist()) for user in args.users}
        validation: dict[str, Any] = {
            "base_perplexity": val_base_ppl,
            "base_reward": base_reward,
            "ours": {},
            "caa": {},
        }
        for user in args.users:
            curve = [
                point(
                    ours_val[i],
                    val_prompts,
                    args.val_samples,
                    user,
                    base_reward[user]["mean"],
                    strength=st,
                    target_kl=kl,
                )
                for i, (u, st, kl) in enumerate(settings)
                if u == user
            ]
            validation["ours"][user] = {"curve": curve}
        targeted = {
            user: [p for p in validation["ours"][user]["curve"] if p["target_kl"] is not None] for user in args.users
        }
        chosen_kl = pick_target_kl(targeted, val_base_ppl, {u: base_reward[u]["std"] for u in args.users})
        validation["chosen_target_kl"] = chosen_kl
        for user in args.users:
            validation["ours"][user]["chosen"] = next(p for p in targeted[user] if p["target_kl"] == chosen_kl)
        for layer in caa_layers:
            caa_settings = [(user, layer, m) for user in args.users for m in multipliers]
            caa_val = sample_rows(
                caa_generate(layer),
                tokenizer,
                val_prompts,
                len(caa_settings),
                caa_rows(caa_settings),
                args.val_samples,
                args,
                10_000,
                resume=stages / f"val_caa_layer{layer}.json",
            )
            for (user, _, m), responses in zip(caa_settings, caa_val, strict=True):
                validation["caa"].setdefault(user, {"curve": []})["curve"].append(
                    point(
                        responses,
                        val_prompts,
                        args.val_samples,
                        user,
                        base_reward[user]["mean"],
                        layer=layer,
                        multiplier=m,
                    )
                )
        for user in args.users:
            validation["caa"][user]["chosen"] = pick_within_budget(validation["caa"][user]["curve"], val_base_ppl)
            print(
                user, "ours", validation["ours"][user]["chosen"], "caa", validation["caa"][user]["chosen"], flush=True
            )
        return validation

    validation = cached_stage(stages / "validation.json", validate)
    results["validation"] = validation
    timings["validation"] = time.perf_counter() - t

    # Test: base, ours at the validated target departure and at the trained scale, in one batch per prompt; CAA at
    # its validated setting, grouped by layer.
    t = time.perf_counter()
    test_prompts = list(splits["test"]["prompt"])
    chosen_kl = validation["chosen_target_kl"]
    results["target_kl"] = {"chosen_on_validation": chosen_kl, "library_default": LatentDPOConfig("unused").target_kl}
    settings = [(None, 0.0)] + [(user, strength_for(departures[user], chosen_kl)) for user in args.users]
    settings += [(user, 1.0) for user in args.users]
    ours_test = sample_rows(
        generator.generate,
        tokenizer,
        test_prompts,
        len(settings),
        user_rows(settings),
        args.samples,
        args,
        20_000,
        resume=stages / "test_ours.json",
    )
    responses = {"base": ours_test[0]}
    for index, ((user, _), rows) in enumerate(zip(settings[1:], ours_test[1:], strict=True)):
        responses[f"{'clap' if index < len(args.users) else 'clap_trained_scale'}/{user}"] = rows
    moving = [user for user in args.users if untrained_moves[user] != 0.0]
    for user in args.users:
        if user not in moving:
            responses[f"untrained/{user}"] = ours_test[0]  # z = 0 exactly: the base's own samples
    if moving:  # not expected (no signal), but then they are sampled like everyone else
        control = PrefAlignForCausalLM.from_base(base, tokenizer=tokenizer).eval()
        control.load_state_dict(untrained.latent_state_dict(), strict=False)
        for user in moving:
            control.load_preference(untrained.preferences.get(user), preference_id=user, overwrite=True)
        rows_of = sample_rows(
            control.generate,
            tokenizer,
            test_prompts,
            len(moving),
            user_rows([(u, 1.0) for u in moving], control),
            args.samples,
            args,
            20_000,
            resume=stages / "test_untrained.json",
        )
        for user, rows in zip(moving, rows_of, strict=True):
            responses[f"untrained/{user}"] = rows
    for layer in caa_layers:
        caa_settings = [
            (user, layer, validation["caa"][user]["chosen"]["multiplier"])
            for user in args.users
            if validation["caa"][user]["chosen"]["layer"] == layer
        ]
        if not caa_settings:
            continue
        caa_test = sample_rows(
            caa_generate(layer),
            tokenizer,
            test_prompts,
            len(caa_settings),
            caa_rows(caa_settings),
            args.samples,
            args,
            20_000,
            resume=stages / f"test_caa_layer{layer}.json",
        )
        for (user, _, _), rows in zip(caa_settings, caa_test, strict=True):
            responses[f"caa/{user}"] = rows
    generated = evaluate(responses, tokenizer, bf16_base, test_prompts, args.samples)
    timings["test_generation"] = time.perf_counter() - t
    base_texts = generated["base"]["texts"]
    table = {}
    for key, figures in generated.items():
        if key == "base":
            continue
        method, user = key.split("/")
        scorer = get_scorer(user)
        ours, reference = stats(scorer(figures["texts"]).tolist()), stats(scorer(base_texts).tolist())
        gain = ours["mean"] - reference["mean"]
        se = math.sqrt(ours["se"] ** 2 + reference["se"] ** 2)
        table.setdefault(user, {})[method] = {
            "reward": ours,
            "base_reward": reference,
            "gain": gain,
            "gain_se": se,
            "gain_in_se": gain / se if se > 0 else 0.0,
            "gain_in_base_sd": gain / reference["std"] if reference["std"] > 0 else 0.0,
            "perplexity_ratio": figures["perplexity"] / generated["base"]["perplexity"],
            "distinct_2": figures["distinct_2"],
            "ended_naturally": figures["ended_naturally"],
            "mean_words": figures["mean_words"],  # beside perplexity: near-empty answers pass a perplexity budget
            "example": figures["texts"][0],
        }
    results["test"] = {
        "base": {k: v for k, v in generated["base"].items() if k != "texts"} | {"example": base_texts[0]},
        "users": table,
    }
    results["clap_vs_untrained"] = clap_matters(table, args.users)

    # Neutral = base: greedy output and logits
    ids = torch.tensor([tokenize_prompt(tokenizer, test_prompts[0])])
    greedy = {"do_sample": False, "max_new_tokens": 40, "pad_token_id": tokenizer.pad_token_id}
    results["neutral_equals_base"] = all(
        torch.equal(generator.generate(input_ids=ids, **greedy), base.generate(input_ids=ids, **greedy))
        for ids in [torch.tensor([tokenize_prompt(tokenizer, p)]) for p in test_prompts[:8]]
    )
    timings["total"] = time.perf_counter() - run_start
    results["timings_seconds"] = timings
    results["reused_stages"] = REUSED
    results["machine"] = {"platform": platform.platform(), "threads": torch.get_num_threads()}
    results["versions"] = {"hf_prefalign": hf_prefalign.__version__, "torch": torch.__version__}
    output = Path(args.output)
    write_report(output, results, render(results))
    print(render(results))


def clap_matters(table: dict, users: list[str]) -> dict[str, float]:
    """Mean over users of (gain / base SD) for the CLaP backbone minus the untrained one, with an SE from the users'
    per-sample SEs (independent samples)."""
    diffs, variances = [], []
    for user in users:
        a, b = table[user]["clap"], table[user]["untrained"]
        sd = a["base_reward"]["std"] or 1.0
        diffs.append((a["reward"]["mean"] - b["reward"]["mean"]) / sd)
        variances.append((a["reward"]["se"] ** 2 + b["reward"]["se"] ** 2) / sd**2)
    mean = sum(diffs) / len(diffs)
    se = math.sqrt(sum(variances)) / len(diffs)
    return {"mean_standardised_difference": mean, "se": se, "in_se": mean / se if se else 0.0}


def render_validation(results: dict) -> list[str]:
    """The validation sweeps every chosen setting came from: each user's reward-vs-perplexity points, ours and CAA's."""
    validation = results.get("validation")
    if not validation:
        return []
    base_perplexity = validation["base_perplexity"]

    def cell(point: dict, chosen: dict) -> str:
        text = f"{point['reward']:.3f} ({100 * (point['perplexity'] / base_perplexity - 1):+.0f}%)"
        return f"**{text}**" if point == chosen else text

    users = list(validation["ours"])

    def ours_label(point: dict) -> str:  # runs before the target departure existed swept a strength dial
        if "target_kl" not in point:
            return f"ours x{point['strength']:g}"
        return "ours, trained scale" if point["target_kl"] is None else f"ours KL {point['target_kl']:g}"

    ours_keys = [ours_label(p) for p in validation["ours"][users[0]]["curve"]]
    caa_keys = [(p["layer"], p["multiplier"]) for p in validation["caa"][users[0]]["curve"]]
    settings = results["settings"]
    rule = (
        "ours: one target KL (nats/token) for every user, the best mean standardised gain with every user within "
        "+15%; CAA: per user, the best reward within +15%"
        if "chosen_target_kl" in validation
        else "best reward within +15%, else the lowest perplexity"
    )
    lines = [
        "",
        f"### Validation sweeps ({settings['val_prompts']} prompts x {settings['val_samples']} samples): reward "
        f"(perplexity vs base); bold: chosen ({rule})",
        "",
        "| user | "
        + " | ".join(ours_keys)
        + " | "
        + " | ".join(f"CAA L{layer} x{m:g}" for layer, m in caa_keys)
        + " |",
        "|---|" + "---:|" * (len(ours_keys) + len(caa_keys)),
    ]
    for user in users:
        ours, caa = validation["ours"][user], validation["caa"][user]
        lines.append(
            f"| {user} | "
            + " | ".join(cell(p, ours["chosen"]) for p in ours["curve"])
            + " | "
            + " | ".join(cell(p, caa["chosen"]) for p in caa["curve"])
            + " |"
        )
    return lines


def render(results: dict) -> str:
    lines = ["<!-- generated by examples/preference_space_evidence.py; do not edit by hand -->", ""]
    lines += [
        "### Encoder alone, held-out probe pool",
        "",
        "| backbone | contrastive accuracy (x chance) | NLL gain/token with own z |",
        "|---|---:|---:|",
    ]
    for name, c in results["contrastive"].items():
        lines.append(f"| {name} | {c['accuracy']:.3f} ({c['x_chance']:.2f}x) | {c['nll_gain_per_token']:+.3f} |")
    lines += [
        "",
        "### Ridge probe from posterior means (held-out R^2)",
        "",
        "| attribute | " + " | ".join(results["probe"]) + " |",
        "|---|" + "---:|" * len(results["probe"]),
    ]
    for attribute in ATTRIBUTES:
        lines.append(
            f"| {attribute} | "
            + " | ".join(f"{p[attribute]['r2_heldout']:.2f}" for p in results["probe"].values())
            + " |"
        )
    lines += [
        "",
        f"### Users on {results['settings']['test_prompts']} test prompts x {results['settings']['samples']} samples (gain over the base model)",
        "",
    ]
    lines += [
        "| user | method | reward (base) | gain +- SE | gain / SE | gain / base SD | perplexity vs base | distinct-2 | ended naturally | mean words |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for user, methods in results["test"]["users"].items():
        for method, f in methods.items():
            lines.append(
                f"| {user} | {method} | {f['reward']['mean']:.3f} ({f['base_reward']['mean']:.3f}) | {f['gain']:+.3f} +- {f['gain_se']:.3f} | "
                f"{f['gain_in_se']:+.1f} | {f['gain_in_base_sd']:+.2f} | {100 * (f['perplexity_ratio'] - 1):+.1f}% | {f['distinct_2']:.3f} | {f['ended_naturally']:.2f} | "
                f"{f.get('mean_words', float('nan')):.1f} |"
            )
    lines += render_validation(results)
    c = results["clap_vs_untrained"]
    base = results["test"]["base"]
    lines += [
        "",
        f"Base model: perplexity {base['perplexity']:.2f}, distinct-2 {base['distinct_2']:.3f}, answers ended naturally {base['ended_naturally']:.2f}, mean words {base.get('mean_words', float('nan')):.1f}.",
        f"CLaP vs untrained backbone, mean standardised user gain difference: {c['mean_standardised_difference']:+.3f} +- {c['se']:.3f} ({c['in_se']:+.1f} SE).",
        f"Neutral greedy output identical to the base on 8 test prompts: {results['neutral_equals_base']}.",
    ]
    if "target_kl" in results:
        kl = results["target_kl"]
        lines.append(
            f"Ours (`clap`): every user at target_kl = {kl['chosen_on_validation']:g} nats/token (chosen on validation; "
            f"the library default is {kl['library_default']}); `clap_trained_scale`: the scale training left (strength 1, "
            "target_kl=None)."
        )
    lines += [
        "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings_seconds"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
