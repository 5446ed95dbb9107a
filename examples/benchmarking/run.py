"""The run: every stage in order, from the one-time artefacts to the reports, and `main`."""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import os
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from steering_baselines import caa_generate

from benchmarking.arguments import DOCS_DIR, REPO_ROOT, BenchmarkArguments, make_parser
from benchmarking.caa_and_examples import caa_vectors_timed, default_caa_layers, from_examples_timed, save_caa_vector
from benchmarking.duration import _minutes, calibrate, estimate_seconds
from benchmarking.environment import machine, versions
from benchmarking.evaluation import VALIDATION_SEED_OFFSET, base_perplexity, evaluate_generations, sample_responses
from benchmarking.fairness import check_fair_comparison, method_config_kwargs, pairs_fingerprint, to_trl_format
from benchmarking.methods import EPOCH_METHODS, METHODS, ORACLES, TRL_METHODS
from benchmarking.prefix_tuning import check_prefix_generation, generate_with_prefix
from benchmarking.report import write_reports
from benchmarking.selection import best_of_n_responses, select_on_validation
from benchmarking.serving import serving_benchmark
from benchmarking.setting_up import Setup, check_same_base, resolve_base, split_prompts
from benchmarking.targets import ratios, sample_efficiency, targets
from benchmarking.training import train_latent_dpo, train_trl_dpo
from hf_prefalign import (
    CLaPConfig,
    CLaPTrainer,
    LatentCache,
    PrefAlignForCausalLM,
    ResponsePoolConfig,
    build_response_pool,
    load_response_pool,
    save_response_pool,
)
from hf_prefalign.data.pairs import preference_pairs_from_pool
from hf_prefalign.data.prompts import tokenize_prompt, tokenize_response
from hf_prefalign.scorers import get_scorer
from hf_prefalign.utils.precision import resolve_dtype
from hf_prefalign.utils.serialization import write_json_atomic


def output_paths(args: BenchmarkArguments) -> dict[str, Path]:
    if args.output_dir is None and not args.quick:
        folder = DOCS_DIR / "benchmarks"
        return {
            "json": folder / "results.json",
            "markdown": DOCS_DIR / "benchmarks.md",
            "reward_vs_time": folder / "reward_vs_time.png",
            "sample_efficiency": folder / "sample_efficiency.png",
        }
    folder = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="prefalign-bench-"))
    return {
        "json": folder / "results.json",
        "markdown": folder / "benchmarks.md",
        "reward_vs_time": folder / "reward_vs_time.png",
        "sample_efficiency": folder / "sample_efficiency.png",
    }


def stage_folder(args: BenchmarkArguments, work: Path, backbone: PrefAlignForCausalLM, pool: Dataset) -> Path:
    """Where a run writes its finished stages: keyed by every setting that changes a figure, the backbone's weights
    and the pool's texts, so `--resume` never reads a stage of another run."""
    ignored = ("output_dir", "estimate_only", "resume", "pool", "backbone")
    settings = {key: value for key, value in asdict(args).items() if key not in ignored}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(backbone.fingerprint().encode())
    digest.update(json.dumps(pool.to_dict(), sort_keys=True, default=str).encode())
    return work / "stages" / digest.hexdigest()[:16]


def resumed_stage(args: BenchmarkArguments, path: Path) -> Any | None:
    """The stage written at `path` by an earlier run, with `--resume`; else `None` (compute it)."""
    if not (args.resume and path.is_file()):
        return None
    print(f"[benchmark] resuming: reusing {path}")
    return json.loads(path.read_text())


def run_benchmark(args: BenchmarkArguments) -> dict[str, Any]:
    """Run the benchmark described by `args`; returns the results (also written to disk)."""
    run_start = time.perf_counter()
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL trainers report usage unless told not to
    # Refuse unfair settings before anything expensive runs.
    plans = {}
    for method in EPOCH_METHODS:
        kwargs = method_config_kwargs(args, method, "unused")
        plans[method] = {**kwargs, "overridden": list(args.overrides().get(method, {}))}
    check_fair_comparison(plans)
    scorers = {name: get_scorer(name) for name in args.users}  # fail early on an unknown scorer
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("[benchmark] matplotlib is not installed: no plots; their data goes into results.json ('plot_data')")
    paths = output_paths(args)
    work = (
        Path(args.work_dir)
        if args.work_dir
        else (paths["json"].parent / "work" if args.quick else REPO_ROOT / "outputs" / "benchmark")
    )
    if not args.estimate_only:
        work.mkdir(parents=True, exist_ok=True)
    mode = "quick" if args.quick else "full"
    print(f"[benchmark] {mode} run; work folder {work}; results to {paths['json'].parent}")
    resumed_backbone = args.resume and args.backbone is None and (work / "backbone" / "config.json").is_file()
    if resumed_backbone:  # trained by the run being resumed
        args.backbone = str(work / "backbone")

    # Base, prompts, calibration and the estimate
    base_reference, tokenizer = resolve_base(args, work)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    setup = Setup(base_reference=base_reference, tokenizer=tokenizer, dtype=resolve_dtype(args.precision))
    reused_pool, train_prompts, validation_prompts, heldout_prompts, source = split_prompts(args)
    setup.heldout_prompts = heldout_prompts
    setup.data = {
        "prompt_source": source,
        "base_dtype": str(setup.dtype).removeprefix("torch."),
        "train_prompts": len(train_prompts),
        "heldout_prompts": len(heldout_prompts),
        "validation_prompts": len(validation_prompts),
        "samples_per_validation_prompt": args.validation_samples,
        "samples_per_heldout_prompt": args.samples_per_prompt,
    }
    reference_base = setup.load_base()
    response_tokens = None
    if reused_pool is not None:  # the pairs' real length decides a DPO step's cost
        lengths = [len(tokenize_response(tokenizer, r)) for rows in reused_pool["responses"][:16] for r in rows]
        response_tokens = sum(lengths) / max(len(lengths), 1)
    calib = calibrate(reference_base, tokenizer, heldout_prompts[0], args, response_tokens)
    estimate = estimate_seconds(args, calib, reference_base.config.num_hidden_layers)
    stages = ", ".join(f"{k} {_minutes(v)}" for k, v in estimate.items() if k != "total")
    print(f"[benchmark] estimated duration: about {_minutes(estimate['total'])} ({stages}); rough, +-50%")
    if args.estimate_only:
        return {"estimate_seconds": estimate, "calibration": calib}

    # 1. One-time: the response pool
    if reused_pool is not None:
        train_pool = reused_pool
        setup.one_time["pool"] = {"reused": args.pool, "seconds": None}
    elif args.resume and (work / "pool.json").is_file():  # sampled by the run being resumed
        train_pool = load_response_pool(work / "pool")
        if list(train_pool["prompt"]) != list(train_prompts):
            raise ValueError(f"--resume: the pool in {work / 'pool'} was sampled for other prompts than this run's.")
        recorded = json.loads((work / "pool.json").read_text())
        setup.one_time["pool"] = {"reused": None, "seconds": recorded["seconds"], "resumed": True}
        print(f"[1/6] pool: resuming with {work / 'pool'}")
    else:
        print(f"[1/6] pool: sampling {args.num_responses} responses for each of {len(train_prompts)} prompts")
        start = time.perf_counter()
        train_pool = build_response_pool(
            reference_base,
            tokenizer,
            Dataset.from_dict({"prompt": train_prompts}),
            ResponsePoolConfig(
                num_responses=args.num_responses,
                max_new_tokens=args.pool_max_new_tokens,
                batch_size=8,
                seed=args.seed,
            ),
        )
        setup.one_time["pool"] = {"reused": None, "seconds": time.perf_counter() - start}
        save_response_pool(train_pool, work / "pool")
        write_json_atomic({"seconds": setup.one_time["pool"]["seconds"]}, work / "pool.json")
    setup.train_pool = train_pool
    setup.one_time["pool"].update(prompts=len(train_pool), responses=sum(len(r) for r in train_pool["responses"]))

    # 2. One-time: the CLaP backbone
    if args.backbone is not None:
        print(f"[2/6] CLaP: reusing {args.backbone}")
        backbone = PrefAlignForCausalLM.from_pretrained(args.backbone, base_model=setup.load_base())
        summary = backbone.training_summary or {}
        setup.one_time["clap"] = {
            "reused": None if resumed_backbone else args.backbone,
            "seconds": summary.get("train_seconds") if resumed_backbone else None,
            "recorded_train_seconds": summary.get("train_seconds"),
        }
        if resumed_backbone:
            setup.one_time["clap"]["resumed"] = True
    else:
        print(f"[2/6] CLaP: training the backbone on {len(train_pool)} prompts")
        backbone = PrefAlignForCausalLM.from_base(
            setup.load_base(), tokenizer=tokenizer, **({"latent_dim": 8} if args.quick else {})
        )
        clap_args = CLaPConfig(  # the library's defaults (docs/preference_space.md), PCA start included
            output_dir=str(work / "clap-trainer"),
            learning_rate=args.clap_learning_rate,
            num_train_epochs=args.clap_epochs,
            responses_per_step=4 if args.quick else 8,
            save_strategy="no",
            logging_steps=5,
            seed=args.seed,
            use_cpu=True,
            report_to="none",
            disable_tqdm=True,
        )
        trainer = CLaPTrainer(model=backbone, args=clap_args, train_dataset=train_pool, processing_class=tokenizer)
        start = time.perf_counter()
        trainer.train()
        setup.one_time["clap"] = {"reused": None, "seconds": time.perf_counter() - start}
        del trainer
        backbone.save_pretrained(work / "backbone")
        tokenizer.save_pretrained(work / "backbone")
    backbone.eval()
    setup.one_time["clap"].update(fingerprint=backbone.fingerprint(), latent_dim=backbone.config.latent_dim)
    check_same_base(backbone, reference_base)
    setup.backbone = backbone
    base = backbone.get_base_model()  # frozen and identical to the baselines' starting point: scores perplexity
    del reference_base
    gc.collect()

    # 3. One-time for Latent DPO: the frozen encoder over the pool
    print("[3/6] latent cache: encoding the pool once for every user")
    cache = LatentCache(backbone, tokenizer, cache_dir=None)
    start = time.perf_counter()
    cache.encode_pool(train_pool)
    setup.one_time["latent_cache"] = {"seconds": time.perf_counter() - start, "sequences": cache.encoder_sequences}

    # 4. Users: per pair budget, the same pairs for every method, then each method
    heldout_ids = [tokenize_prompt(tokenizer, p) for p in heldout_prompts]
    validation_ids = [tokenize_prompt(tokenizer, p) for p in validation_prompts]
    evaluation: dict[str, Any] = {}
    stages = stage_folder(args, work, backbone, train_pool)
    neutral = resumed_stage(args, stages / "neutral.json")
    if neutral is None:
        print("[4/6] neutral models on the test prompts (and the base on the validation prompts)")
        with backbone.disable_latent():
            responses = sample_responses(backbone.generate, heldout_ids, tokenizer, args)
            validation_base = sample_responses(
                backbone.generate, validation_ids, tokenizer, args, args.validation_samples, VALIDATION_SEED_OFFSET
            )
            # The oracle's candidates: best_of base samples per test slot, reranked per user below.
            oracle_candidates = sample_responses(
                backbone.generate, heldout_ids, tokenizer, args, args.best_of * args.samples_per_prompt
            )
        evaluation["base"] = evaluate_generations(
            responses, tokenizer, scorers, base_perplexity(base, heldout_ids, responses)
        )
        evaluation["base_validation"] = evaluate_generations(
            validation_base, tokenizer, scorers, base_perplexity(base, validation_ids, validation_base)
        )
        responses = sample_responses(backbone.generate, heldout_ids, tokenizer, args)  # z = 0, the prior's mean
        evaluation["latent_z0"] = evaluate_generations(
            responses, tokenizer, scorers, base_perplexity(base, heldout_ids, responses)
        )
        neutral = {"evaluation": evaluation, "oracle_candidates": oracle_candidates}
        write_json_atomic(neutral, stages / "neutral.json")
    evaluation, oracle_candidates = neutral["evaluation"], neutral["oracle_candidates"]
    validation_ppl = evaluation["base_validation"]["perplexity"]
    num_layers = base.config.num_hidden_layers
    caa_layers = args.caa_layer_list or default_caa_layers(num_layers)
    if max(caa_layers) >= num_layers:
        raise ValueError(f"`caa_layers` {caa_layers} must be below the base's {num_layers} decoder layers.")
    caa_grid = [(layer, m) for layer in caa_layers for m in args.caa_multiplier_list]

    def test_figures(generate: Callable[..., Any], user: str, scorer: Any) -> dict[str, Any]:
        rows = sample_responses(generate, heldout_ids, tokenizer, args)
        figures = evaluate_generations(rows, tokenizer, {user: scorer}, base_perplexity(base, heldout_ids, rows))
        figures["reward"] = figures["reward"][user]
        return figures

    def validation_point(generate: Callable[..., Any], ids: list[list[int]], scorer: Any) -> dict[str, float]:
        rows = sample_responses(generate, ids, tokenizer, args, args.validation_samples, VALIDATION_SEED_OFFSET)
        texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for group in rows for r in group]
        return {"reward": float(scorer(texts).float().mean()), "perplexity": base_perplexity(base, ids, rows)}

    def caa_generate_with(vector: torch.Tensor, layer: int) -> Callable[..., Any]:
        steer = caa_generate(base, backbone.layout, layer)
        return lambda **kwargs: steer(vector.expand(kwargs["input_ids"].shape[0], -1), **kwargs)

    def lora_on_validation(
        runs: dict[float, Any], user: str, pairs: Dataset, tag: str, scorer: Any, lr: float, ids: list[list[int]]
    ) -> dict[str, float]:
        """Train LoRA-DPO at one learning rate of the grid (kept in `runs`) and score it on the validation prompts."""
        figures, directory, model = train_trl_dpo(setup, "lora_dpo", user, pairs, args, work, f"{tag}/lr-{lr:g}", lr)
        runs[lr] = (figures, directory)
        point = validation_point(model.generate, ids, scorer)
        del model
        gc.collect()
        return point

    def caa_on_validation(
        vectors: dict[int, torch.Tensor], scorer: Any, setting: tuple[int, float], ids: list[list[int]]
    ) -> dict[str, float]:
        layer, multiplier = setting
        return validation_point(caa_generate_with(multiplier * vectors[layer], layer), ids, scorer)

    users: dict[str, Any] = {}
    largest = str(args.budget_list[-1])
    embedding_dirs, lora_dirs = [], []
    for user, scorer in scorers.items():
        all_pairs = preference_pairs_from_pool(train_pool, scorer)
        record: dict[str, Any] = {"pairs_available": len(all_pairs), "budgets": {}}
        for budget in args.budget_list:
            pairs = all_pairs.select(range(min(budget, len(all_pairs))))
            trl_pairs = to_trl_format(pairs)
            fingerprint = pairs_fingerprint(pairs)
            check_fair_comparison(
                {
                    "latent_dpo": {**plans["latent_dpo"], "pairs": fingerprint},
                    **{m: {**plans[m], "pairs": pairs_fingerprint(trl_pairs)} for m in TRL_METHODS},
                    "caa": {"pairs": fingerprint},
                    "from_examples": {"pairs": fingerprint},
                }
            )
            tag = f"budget-{budget}"
            done = resumed_stage(args, stages / "users" / user / f"{tag}.json")
            if done is not None and done["entry"]["pairs_fingerprint"] == fingerprint:
                if str(budget) == largest:
                    embedding_dirs.append(Path(done["artefacts"]["latent_dpo"]))
                    lora_dirs.append(Path(done["artefacts"]["lora_dpo"]))
                if done["prefix_generation_check"] is not None:
                    setup.one_time.setdefault("prefix_generation_check", done["prefix_generation_check"])
                record["budgets"][str(budget)] = done["entry"]
                continue
            entry: dict[str, Any] = {"budget": budget, "pairs": len(pairs), "pairs_fingerprint": fingerprint}
            entry["methods"] = methods = {}
            artefacts: dict[str, str] = {}
            print(f"[4/6] user '{user}', budget {budget}: {len(pairs)} pairs")

            # Latent DPO (ours)
            figures, directory = train_latent_dpo(setup, cache, user, pairs, args, work, tag)
            artefacts["latent_dpo"] = str(directory)
            if str(budget) == largest:
                embedding_dirs.append(directory)
            backbone.load_preference(directory, preference_id=user, overwrite=True)
            figures.update(test_figures(functools.partial(backbone.generate, preference_id=user), user, scorer))
            methods["latent_dpo"] = figures

            # LoRA-DPO: one run per learning rate of the grid, the rate chosen on the validation prompts
            lora_runs: dict[float, tuple[dict[str, Any], Path]] = {}
            chosen_lr, curve = select_on_validation(
                args.lora_learning_rate_list,
                functools.partial(lora_on_validation, lora_runs, user, trl_pairs, tag, scorer),
                validation_ids,
                validation_ppl,
                args.perplexity_budget,
            )
            figures, directory = lora_runs[chosen_lr]
            from peft import PeftModel

            model = PeftModel.from_pretrained(setup.load_base(), directory).eval()
            figures.update(test_figures(model.generate, user, scorer))
            figures["selection"] = {"learning_rate": chosen_lr, "validation_curve": curve}
            figures["train_seconds_grid_total"] = sum(f["train_seconds"] for f, _ in lora_runs.values())
            methods["lora_dpo"] = figures
            artefacts["lora_dpo"] = str(directory)
            if str(budget) == largest:
                lora_dirs.append(directory)
            del model
            gc.collect()

            # Prefix-tuning DPO
            figures, directory, model = train_trl_dpo(setup, "prefix_dpo", user, trl_pairs, args, work, tag)
            if "prefix_generation_check" not in setup.one_time:
                setup.one_time["prefix_generation_check"] = check_prefix_generation(model, heldout_ids[0])
            figures.update(test_figures(functools.partial(generate_with_prefix, model), user, scorer))
            methods["prefix_dpo"] = figures
            del model
            gc.collect()

            # CAA: the activation pass is its training; layer and multiplier chosen on the validation prompts
            vectors, seconds, memory = caa_vectors_timed(setup, pairs, caa_layers, args)
            (layer, multiplier), curve = select_on_validation(
                caa_grid,
                functools.partial(caa_on_validation, vectors, scorer),
                validation_ids,
                validation_ppl,
                args.perplexity_budget,
            )
            path = save_caa_vector(vectors[layer], layer, multiplier, work / "users" / user / tag / "caa")
            figures = {
                "train_seconds": seconds,
                "train_seconds_all": [seconds],
                "steps": 0,
                **memory,
                "artefact_bytes": path.stat().st_size,
                "weights_bytes": path.stat().st_size,
                "trainable_parameters": vectors[layer].numel(),
                "final_loss": None,
                "learning_rate": None,
                "selection": {"layer": layer, "multiplier": multiplier, "validation_curve": curve},
            }
            figures.update(test_figures(caa_generate_with(multiplier * vectors[layer], layer), user, scorer))
            methods["caa"] = figures

            # From examples (ours, no training): the encoder over the chosen (liked) and rejected (disliked) responses
            directory = work / "users" / user / tag / "from_examples"
            figures, embedding = from_examples_timed(setup, cache, pairs, directory)
            backbone.load_preference(embedding, preference_id=f"{user}-from-examples", overwrite=True)
            figures.update(
                test_figures(functools.partial(backbone.generate, preference_id=f"{user}-from-examples"), user, scorer)
            )
            methods["from_examples"] = figures
            for method, figures in methods.items():
                figures["gain"] = figures["reward"]["mean"] - evaluation["base"]["reward"][user]["mean"]
                print(f"    {method}: {figures['train_seconds']:.3f} s, reward {figures['reward']['mean']:.3f}")
            record["budgets"][str(budget)] = entry
            write_json_atomic(
                {
                    "entry": entry,
                    "artefacts": artefacts,
                    "prefix_generation_check": setup.one_time.get("prefix_generation_check"),
                },
                stages / "users" / user / f"{tag}.json",
            )

        # The oracle ceiling: best of `best_of` base samples per slot, by the user's own reward (needs it at inference)
        oracle = best_of_n_responses(oracle_candidates, tokenizer, scorer, args.best_of)
        figures = evaluate_generations(oracle, tokenizer, {user: scorer}, base_perplexity(base, heldout_ids, oracle))
        figures["reward"] = figures["reward"][user]
        figures.update(oracle=True, needs_reward_at_inference=True, samples_reranked=args.best_of)
        record["oracles"] = {"best_of_4": figures}
        users[user] = record

    # 5. Serving
    print(f"[5/6] serving: {args.serving_users} users in one batch, {args.serving_max_new_tokens} tokens per row")
    serving = serving_benchmark(setup, heldout_ids, embedding_dirs, lora_dirs, args)

    # 6. Reports
    results = {
        "mode": mode,
        "base_model": base_reference,
        "machine": machine(),
        "versions": versions(),
        "settings": asdict(args),
        "methods": {
            method: {
                "label": label,
                "learning_rate": None if method == "lora_dpo" else plans.get(method, {}).get("learning_rate"),
            }
            for method, label in METHODS.items()
        },
        "oracles": {name: {"label": label, "oracle": True} for name, label in ORACLES.items()},
        "budgets": args.budget_list,
        "caa_grid": {"layers": caa_layers, "multipliers": args.caa_multiplier_list},
        "lora_learning_rate_grid": args.lora_learning_rate_list,
        "data": setup.data,
        "one_time": setup.one_time,
        "neutral": evaluation,
        "users": users,
        "ratios": ratios(users),
        "sample_efficiency": sample_efficiency(users),
        "serving": serving,
        "estimate_seconds": estimate,
        "calibration": calib,
    }
    results["targets"] = targets(results)
    results["total_seconds"] = time.perf_counter() - run_start
    results["peak_rss_mb_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("[6/6] writing reports")
    write_reports(results, paths, args)
    print(
        f"[benchmark] done in {_minutes(results['total_seconds'])} (estimated {_minutes(estimate['total'])}); "
        f"results in {paths['json']}"
    )
    if args.pool is None or args.backbone is None:
        pool_path, backbone_path = args.pool or work / "pool", args.backbone or work / "backbone"
        print(f"[benchmark] rerun without rebuilding: --pool {pool_path} --backbone {backbone_path}")
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    (args,) = make_parser().parse_args_into_dataclasses(args=argv)
    return run_benchmark(args)
