"""Evidence that CLaP gives z meaning, on the embedded default model (SmolLM2-135M-Instruct).

Builds (or reuses) a response pool from the bundled chat prompts (K responses each), trains a CLaP backbone on the
first 90% of the prompts, and measures on the held-out 10%:

- contrastive accuracy: the own latent (posterior mean) ranked first among the prompt's K latents (chance 1/K);
- active latent dimensions (mean KL(q(z|x,y) || N(0, I)) above 0.01 nat);
- distinct-2 of responses decoded under different z from the prior vs under one z (same sampling settings), and how
  often greedy decoding under different z gives different responses;
- NLL of held-out responses with the posterior mean vs with z = 0.

Writes the figures to JSON (default docs/clap_results.json) with wall times of pool sampling and of the CLaP training
loop (one-time costs, reported separately).

    python examples/clap_evidence.py                      # full run (about 45 min on 2 cores)
    python examples/clap_evidence.py --num-prompts 40 --max-steps 20 --output-json ""   # a quick look
    python examples/clap_evidence.py --backbone outputs/clap/backbone --posterior-refinement-steps 1  # re-evaluate
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import transformers

import hf_prefalign
from hf_prefalign import (
    CLaPConfig,
    CLaPTrainer,
    PrefAlignForCausalLM,
    ResponsePoolConfig,
    build_response_pool,
    load_bundled_prompts,
    load_default_base,
    load_response_pool,
    save_response_pool,
)
from hf_prefalign.data.prompts import tokenize_prompt


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Unique n-grams / all n-grams over a set of texts (whitespace tokens)."""
    grams = [tuple(words[i : i + n]) for text in texts for words in [text.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


@torch.no_grad()
def decode(model, tokenizer, prompt, latents: torch.Tensor, **settings) -> list[str]:
    """Decode `prompt` once per row of `latents`."""
    ids = torch.tensor([tokenize_prompt(tokenizer, prompt)], device=model.device).repeat(latents.shape[0], 1)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), latents=latents, **settings)
    return [t.strip() for t in tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)]


@torch.no_grad()
def active_dimensions(model, tokenizer, pool, threshold: float) -> tuple[int, list[float]]:
    """Count latent dimensions whose mean KL(q(z|x,y) || N(0, I)) over the pool's responses exceeds `threshold`."""
    kls = []
    for row in pool:
        prompt_ids = tokenize_prompt(tokenizer, row["prompt"])
        seqs = [
            prompt_ids + tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for r in row["responses"]
        ]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), 1
        response_mask = mask.clone()
        response_mask[:, : len(prompt_ids)] = 0
        posterior = model.posterior(ids.to(model.device), mask.to(model.device), response_mask.to(model.device))
        kls.append(posterior.kl_to_standard_normal().cpu())
    per_dim = torch.cat(kls).mean(0)
    return int((per_dim > threshold).sum()), per_dim.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="outputs/clap", help="pool, backbone and trainer outputs")
    parser.add_argument("--output-json", default="docs/clap_results.json")
    parser.add_argument("--output-table", default="docs/clap_results.md", help="Markdown table of the figures")
    parser.add_argument("--num-prompts", type=int, default=360, help="bundled prompts used (the last 10%% held out)")
    parser.add_argument("--num-responses", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--pool-batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--encoder-blocks-learning-rate", type=float, default=None)
    parser.add_argument("--num-epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--prompts-per-step", type=int, default=1)
    parser.add_argument("--responses-per-step", type=int, default=None)
    parser.add_argument("--negatives", type=int, default=3, help="contrastive negatives per response in training")
    parser.add_argument("--kl-weight", type=float, default=1.0)
    parser.add_argument("--kl-warmup", type=float, default=0.0, help="KL annealing steps (or fraction of steps)")
    parser.add_argument("--contrastive-latents", choices=["sample", "mean"], default="sample")
    parser.add_argument("--gradient-skip-path", action="store_true")
    parser.add_argument("--posterior-init-logvar", type=float, default=0.0, help="see PrefAlignConfig")
    parser.add_argument(
        "--posterior-refinement-steps",
        type=int,
        default=0,
        help="evaluate (and save the backbone) with this many gradient steps on the posterior mean; the encoder alone "
        "is evaluated too (see PrefAlignConfig)",
    )
    parser.add_argument("--posterior-refinement-step-size", type=float, default=3.0)
    parser.add_argument("--backbone", default=None, help="evaluate this trained backbone instead of training one")
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.7,
        help="sampling temperature of the distinct-n check (1.0 saturates it)",
    )
    parser.add_argument("--num-latents", type=int, default=4, help="z per held-out prompt for the distinct-n check")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    output_dir = Path(args.output_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    base, tokenizer = load_default_base()
    base.to(device)

    # 1. Response pool (one-time cost; reused when present).
    prompts = load_bundled_prompts().select(range(args.num_prompts))
    pool_dir = output_dir / f"pool-{args.num_prompts}x{args.num_responses}-{args.max_new_tokens}tok"
    sampling_seconds = None
    if pool_dir.is_dir():
        pool = load_response_pool(pool_dir)
        print(f"reusing the pool in {pool_dir}")
    else:
        start = time.perf_counter()
        pool = build_response_pool(
            base,
            tokenizer,
            prompts,
            ResponsePoolConfig(
                num_responses=args.num_responses,
                max_new_tokens=args.max_new_tokens,
                batch_size=args.pool_batch_size,
                seed=args.seed,
            ),
        )
        sampling_seconds = time.perf_counter() - start
        save_response_pool(pool, pool_dir)
        print(
            f"sampled {len(pool) * args.num_responses} responses in {sampling_seconds:.0f}s "
            f"({len(pool) * args.num_responses / sampling_seconds:.2f} responses/s)"
        )
    num_train = int(round(0.9 * len(pool)))
    train_pool, heldout_pool = pool.select(range(num_train)), pool.select(range(num_train, len(pool)))

    # 2. CLaP training (one-time cost per base model), or a backbone trained before.
    if args.backbone is None:
        model = PrefAlignForCausalLM.from_base(
            base, tokenizer=tokenizer, posterior_init_logvar=args.posterior_init_logvar
        )
    else:
        model = PrefAlignForCausalLM.from_pretrained(args.backbone, base_model=base, is_trainable=True)
    config = CLaPConfig(
        output_dir=str(output_dir / "trainer"),
        learning_rate=args.learning_rate,
        encoder_blocks_learning_rate=args.encoder_blocks_learning_rate,
        num_train_epochs=args.num_epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.prompts_per_step,
        responses_per_step=args.responses_per_step,
        contrastive_num_negatives=args.negatives,
        kl_weight=args.kl_weight,
        kl_warmup_steps=args.kl_warmup,
        contrastive_latents=args.contrastive_latents,
        gradient_skip_path=args.gradient_skip_path,
        logging_steps=10,
        save_strategy="no",
        seed=args.seed,
        use_cpu=device == "cpu",
    )
    trainer = CLaPTrainer(
        model, args=config, train_dataset=train_pool, eval_dataset=heldout_pool, processing_class=tokenizer
    )
    if args.backbone is None:
        start = time.perf_counter()
        train_output = trainer.train()
        training = {
            "seconds": time.perf_counter() - start,
            "steps": train_output.global_step,
            "final_logs": [log for log in trainer.state.log_history if "loss/nll" in log][-3:],
        }
        training_settings = {
            key: getattr(args, key)
            for key in ("learning_rate", "num_epochs", "responses_per_step", "negatives", "contrastive_latents")
        }
    else:  # what the backbone's own training recorded
        summary = model.training_summary or {}
        recorded = summary.get("settings", {})
        training = {"seconds": summary.get("train_seconds"), "steps": summary.get("steps"), "reused": args.backbone}
        training_settings = {
            "learning_rate": recorded.get("learning_rate"),
            "num_epochs": recorded.get("num_train_epochs"),
            "responses_per_step": recorded.get("responses_per_step"),
            "negatives": recorded.get("contrastive_num_negatives"),
            "contrastive_latents": recorded.get("contrastive_latents"),
        }
    training["seconds_per_step"] = (training["seconds"] or 0) / max(training["steps"] or 0, 1)
    model.eval()

    # 3. Held-out evidence: the encoder alone, then (if asked) the refined posterior that the backbone keeps.
    model.config.posterior_refinement_steps = 0
    encoder_metrics = trainer.evaluate()
    metrics = encoder_metrics
    refinement_seconds = None
    if args.posterior_refinement_steps > 0:
        model.config.posterior_refinement_steps = args.posterior_refinement_steps
        model.config.posterior_refinement_step_size = args.posterior_refinement_step_size
        start = time.perf_counter()
        metrics = trainer.evaluate()
        refinement_seconds = time.perf_counter() - start
    active, per_dim_kl = active_dimensions(model, tokenizer, heldout_pool, config.active_dim_threshold)
    sample = {
        "do_sample": True,
        "top_k": 50,
        "temperature": args.temperature,
        "max_new_tokens": args.max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
    }
    greedy = {"do_sample": False, "max_new_tokens": args.max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    across, within, greedy_distinct, greedy_all_different = [], [], [], 0
    generator = torch.Generator().manual_seed(args.seed)
    for row in heldout_pool:
        latents = torch.randn(args.num_latents, model.config.latent_dim, generator=generator).to(device)
        across.append(distinct_n(decode(model, tokenizer, row["prompt"], latents, **sample)))
        within.append(
            distinct_n(decode(model, tokenizer, row["prompt"], latents[:1].repeat(args.num_latents, 1), **sample))
        )
        texts = decode(model, tokenizer, row["prompt"], latents, **greedy)
        greedy_distinct.append(distinct_n(texts))
        greedy_all_different += len(set(texts)) == len(texts)
    model.save_pretrained(output_dir / "backbone")
    tokenizer.save_pretrained(output_dir / "backbone")

    k = args.num_responses
    results = {
        "machine": {
            "device": device,
            "cpu_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        },
        "versions": {
            "hf_prefalign": hf_prefalign.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "settings": {key: value for key, value in vars(args).items() if key not in ("output_dir", "output_json")},
        "pool": {
            "prompts": len(pool),
            "train_prompts": len(train_pool),
            "heldout_prompts": len(heldout_pool),
            "responses_per_prompt": k,
            "sampling_seconds": sampling_seconds,
            "responses_per_second": None if sampling_seconds is None else len(pool) * k / sampling_seconds,
        },
        "training": training,
        "training_settings": training_settings,
        "posterior": {
            "refinement_steps": args.posterior_refinement_steps,
            "refinement_step_size": args.posterior_refinement_step_size,
            "refined_evaluation_seconds": refinement_seconds,
        },
        "heldout": {
            "contrastive_accuracy": metrics["eval_contrastive/accuracy"],
            "chance": 1 / k,
            "accuracy_over_chance": metrics["eval_contrastive/accuracy"] * k,
            "contrastive_accuracy_encoder_only": encoder_metrics["eval_contrastive/accuracy"],
            "nll_posterior_mean_encoder_only": encoder_metrics["eval_nll/posterior"],
            "active_dims": active,
            "latent_dim": model.config.latent_dim,
            "per_dim_kl": per_dim_kl,
            "nll_posterior_mean": metrics["eval_nll/posterior"],
            "nll_zero_latent": metrics["eval_nll/zero_latent"],
            "distinct2_across_z_sampled": sum(across) / len(across),
            "distinct2_within_z_sampled": sum(within) / len(within),
            "distinct2_across_z_greedy": sum(greedy_distinct) / len(greedy_distinct),
            "greedy_all_different_fraction": greedy_all_different / len(heldout_pool),
        },
    }
    print(json.dumps({key: results[key] for key in ("pool", "heldout")}, indent=2)[:3000])
    print(f"training loop: {training['seconds']}s for {training['steps']} steps")
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"written to {args.output_json}")
    if args.output_table:
        Path(args.output_table).write_text(render_table(results))
        print(f"written to {args.output_table}")


def render_table(results: dict) -> str:
    """The figures of one run as a Markdown page (generated; do not edit by hand)."""
    held, pool, training = results["heldout"], results["pool"], results["training"]
    settings, trained = results["settings"], results["training_settings"]
    refinement = results["posterior"]
    k = pool["responses_per_prompt"]
    rate = pool["responses_per_second"]
    refined = refinement["refinement_steps"] > 0
    posterior_name = (
        f"encoder + {refinement['refinement_steps']} refinement step(s) of length {refinement['refinement_step_size']}"
        if refined
        else "encoder"
    )
    lines = [
        "<!-- generated by examples/clap_evidence.py; do not edit -->",
        "# CLaP on SmolLM2-135M-Instruct: measured",
        "",
        f"Device: {results['machine']['device']} ({results['machine']['cpu_threads']} threads). "
        f"Pool: {pool['prompts']} bundled prompts x {k} responses "
        f"({settings['max_new_tokens']} new tokens max); CLaP trained on {pool['train_prompts']} prompts, "
        f"evaluated on the {pool['heldout_prompts']} held-out ones. Settings: lr {trained['learning_rate']}, "
        f"{trained['num_epochs']} epoch(s), {trained['responses_per_step'] or 'all'} responses per step, "
        f"{trained['negatives']} contrastive negatives per response "
        f"(scored with the posterior {'means' if trained.get('contrastive_latents') == 'mean' else 'samples'}). "
        f"Posterior: {posterior_name}.",
        "",
        "| held-out measure | value | target |",
        "| --- | ---: | --- |",
        f"| contrastive accuracy (own z ranked first of {k}) | "
        f"{held['contrastive_accuracy']:.3f} ({held['accuracy_over_chance']:.2f}x chance {held['chance']:.3f}) | "
        ">= 3x chance |",
    ]
    if refined:
        lines.append(
            f"| contrastive accuracy, encoder alone | {held['contrastive_accuracy_encoder_only']:.3f} "
            f"({held['contrastive_accuracy_encoder_only'] * k:.2f}x chance) | |"
        )
    lines += [
        f"| active latent dimensions (KL > 0.01 nat) | {held['active_dims']} / {held['latent_dim']} | > half |",
        f"| distinct-2 across {settings['num_latents']} prior z (sampled, T={settings.get('temperature', 1.0)}) | {held['distinct2_across_z_sampled']:.3f} | > within one z |",
        f"| distinct-2 within one z (sampled, T={settings.get('temperature', 1.0)}) | {held['distinct2_within_z_sampled']:.3f} | |",
        f"| distinct-2 across {settings['num_latents']} prior z (greedy) | {held['distinct2_across_z_greedy']:.3f} | |",
        f"| prompts whose greedy responses under {settings['num_latents']} z all differ | {held['greedy_all_different_fraction']:.2f} | |",
        f"| NLL of responses, posterior mean z | {held['nll_posterior_mean']:.4f} | < NLL with z = 0 |",
    ]
    if refined:
        lines.append(f"| NLL of responses, encoder-alone mean z | {held['nll_posterior_mean_encoder_only']:.4f} | |")
    lines += [
        f"| NLL of responses, z = 0 | {held['nll_zero_latent']:.4f} | |",
        "",
        "| one-time cost (wall time) | value |",
        "| --- | ---: |",
        "| pool sampling | "
        + (
            "reused"
            if pool["sampling_seconds"] is None
            else f"{pool['sampling_seconds']:.0f} s ({rate:.2f} responses/s)"
        )
        + " |",
        f"| CLaP training loop | {training['seconds']:.0f} s ({training['steps']} steps, "
        f"{training['seconds_per_step']:.1f} s/step)"
        + (" (recorded by the reused backbone)" if training.get("reused") else "")
        + " |",
    ]
    if refined:
        lines.append(
            f"| held-out evaluation with the refined posterior | {refinement['refined_evaluation_seconds']:.0f} s "
            f"({pool['heldout_prompts']} prompts x {k} responses, {k * k} scorings each) |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
