"""Fine-tuning through the Trainer machinery: CLaP with the base LM unfrozen, evaluation, checkpoints, callbacks, resume.

`CLaPTrainer` is a `transformers.Trainer`, so everything a Trainer user knows applies. This example trains a backbone
with recipe (b) of the paper, the base LM unfrozen next to the latent modules, and uses:

- its own optimizer: one AdamW with two parameter groups (a small learning rate for the pretrained base, a larger
  one for the new latent modules), handed over with `optimizers=(optimizer, None)`;
- periodic evaluation on held-out prompts (`eval_strategy`, CLaP's metrics with the `eval_` prefix), checkpoints
  (`save_strategy`, `save_total_limit`) and `load_best_model_at_end`;
- two `TrainerCallback`s: one records the evaluations, the other stops the first run half-way, as a pre-empted job
  would be stopped;
- `train(resume_from_checkpoint=True)` on a fresh model: the last checkpoint restores the latent modules, the whole
  base, the optimizer and the data order;
- `save_model`: a checkpoint with a trained base holds the base in `base_model/`, and it reloads with
  `AutoModelForCausalLM.from_pretrained`.

    python examples/trainer_finetuning.py [--output_dir outputs/trainer_finetuning] [--tiny]

By default it runs on the embedded SmolLM2-135M-Instruct with a pool sampled from the bundled prompts (24 training
and 4 held-out prompts, 4 responses each, 24 steps; each checkpoint holds the whole 135M-parameter base and its
optimizer state, about 1.6 GB). `--tiny` uses a tiny random Llama and a word-level tokenizer built in code instead,
and runs in seconds (the tests run it).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
)

from hf_prefalign import (
    CLaPConfig,
    CLaPTrainer,
    PrefAlignForCausalLM,
    build_response_pool,
    load_bundled_prompts,
    load_default_base,
)
from hf_prefalign.testing import make_tiny_base, make_word_level_tokenizer


# ----------------------------------------------------------------------
# Callbacks
# ----------------------------------------------------------------------
class EvaluationHistory(TrainerCallback):
    """Keeps every evaluation's CLaP metrics (the Trainer passes them to `on_evaluate`)."""

    KEYS = ("eval_loss", "eval_contrastive/accuracy", "eval_nll/posterior", "eval_nll/zero_latent")

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.rows.append({"step": state.global_step, **{k: metrics[k] for k in self.KEYS if k in (metrics or {})}})


class StopAtStep(TrainerCallback):
    """Ends training after `step` optimizer steps, with a checkpoint: a stand-in for a job that gets pre-empted."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True
        return control


# ----------------------------------------------------------------------
# Base model: the embedded default, or a tiny random one for tests
# ----------------------------------------------------------------------
def tiny_base(seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A 2-layer Llama over a word-level tokenizer of the bundled prompts' words (with a chat template)."""
    words = sorted(
        {
            word
            for row in load_bundled_prompts()
            for message in row["prompt"]
            for word in message["content"].lower().replace("?", " ? ").replace(".", " . ").replace(",", " , ").split()
        }
    )
    vocab = ["<pad>", "<bos>", "<eos>", "<unk>", "user", "assistant", *words]
    tokenizer = make_word_level_tokenizer(vocab, lowercase=True, split_punctuation=True, unk_token="<unk>")
    base = make_tiny_base("llama", seed, vocab_size=len(vocab), num_hidden_layers=2, pad_token_id=0)
    return base, tokenizer


def load_base(tiny: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return tiny_base() if tiny else load_default_base()


def make_optimizer(model: PrefAlignForCausalLM, base_lr: float, latent_lr: float) -> torch.optim.Optimizer:
    """AdamW with a small learning rate for the pretrained base and a larger one for the new latent modules."""
    latent = list(model.latent_parameters())
    latent_ids = {id(p) for p in latent}
    base = [p for p in model.parameters() if p.requires_grad and id(p) not in latent_ids]
    return torch.optim.AdamW([{"params": base, "lr": base_lr}, {"params": latent, "lr": latent_lr}])


# ----------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/trainer_finetuning")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead of the embedded one")
    parser.add_argument("--train_prompts", type=int, default=None, help="default 24 (tiny: 8)")
    parser.add_argument("--eval_prompts", type=int, default=4)
    parser.add_argument("--num_responses", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=None, help="default 24 (tiny: 8)")
    parser.add_argument("--eval_steps", type=int, default=None, help="default 6 (tiny: 2); checkpoints every 2x")
    parser.add_argument("--base_lr", type=float, default=1e-5, help="learning rate of the unfrozen base")
    parser.add_argument("--latent_lr", type=float, default=5e-4, help="learning rate of the latent modules")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train_prompts = args.train_prompts or (8 if args.tiny else 24)
    max_new_tokens = args.max_new_tokens or (8 if args.tiny else 24)
    eval_steps = args.eval_steps or (2 if args.tiny else 6)
    output = Path(args.output_dir)
    shutil.rmtree(output, ignore_errors=True)  # the example always starts from scratch
    torch.manual_seed(args.seed)

    # 1. Data: a response pool sampled from the base; the last bundled prompts are the held-out split.
    base, tokenizer = load_base(args.tiny)
    prompts = load_bundled_prompts()
    pool = build_response_pool(
        base,
        tokenizer,
        prompts.select(range(train_prompts + args.eval_prompts)),
        num_responses=args.num_responses,
        max_new_tokens=max_new_tokens,
        seed=args.seed,
    )
    train_pool = pool.select(range(train_prompts))
    eval_pool = pool.select(range(train_prompts, len(pool)))
    del base  # the pool is sampled; every run below starts from a freshly loaded base

    # 2. Trainer settings: recipe (b), the base unfrozen; evaluate every `eval_steps`, keep the best checkpoint.
    config = CLaPConfig(
        output_dir=str(output / "checkpoints"),
        freeze_base=False,
        max_steps=train_prompts,  # one epoch: one prompt (all its responses) per step
        responses_per_step=4,
        contrastive_num_negatives=3,
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=2 * eval_steps,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",  # eval_loss, lower is better
        logging_steps=eval_steps,
        seed=args.seed,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
    )

    def make_trainer(callbacks: list[TrainerCallback]) -> CLaPTrainer:
        base, tokenizer = load_base(args.tiny)
        model = PrefAlignForCausalLM.from_base(base, tokenizer=tokenizer, freeze_base=False)
        return CLaPTrainer(
            model=model,
            args=config,
            train_dataset=train_pool,
            eval_dataset=eval_pool,
            processing_class=tokenizer,
            callbacks=callbacks,
            optimizers=(make_optimizer(model, args.base_lr, args.latent_lr), None),  # scheduler: the Trainer's
        )

    # 3. First run, stopped half-way by a callback (as if the job were pre-empted).
    history = EvaluationHistory()
    stop_at = max(2 * eval_steps, (train_prompts // (2 * eval_steps)) * eval_steps)
    start = time.perf_counter()
    first = make_trainer([history, StopAtStep(stop_at)])
    first.train()
    checkpoints = sorted(p.name for p in (output / "checkpoints").glob("checkpoint-*"))
    print(f"first run stopped at step {first.state.global_step}; checkpoints: {checkpoints}")

    # 4. Resume on a fresh model: the last checkpoint restores latent modules, base, optimizer and scheduler.
    second = make_trainer([history])
    second.train(resume_from_checkpoint=True)
    seconds = time.perf_counter() - start
    print(f"resumed and finished at step {second.state.global_step} ({seconds:.1f}s for both runs)")
    print("evaluations (NLL per token, with z from the posterior and with z = 0):")
    print(f"{'step':>6} {'eval loss':>10} {'contrastive acc':>16} {'NLL z~q':>9} {'NLL z=0':>9}")
    for row in history.rows:
        print(
            f"{row['step']:>6} {row['eval_loss']:>10.3f} {row['eval_contrastive/accuracy']:>16.3f} "
            f"{row['eval_nll/posterior']:>9.3f} {row['eval_nll/zero_latent']:>9.3f}"
        )
    metrics = second.evaluate()  # the model is now the best checkpoint's (load_best_model_at_end)
    print(f"best checkpoint: {second.state.best_model_checkpoint}; its eval loss now {metrics['eval_loss']:.3f}")

    # 5. Save and reload: a backbone with a trained base carries the base in base_model/.
    backbone_dir = output / "backbone"
    second.save_model(str(backbone_dir))
    reloaded = AutoModelForCausalLM.from_pretrained(backbone_dir).eval()
    trained = second.model.eval()
    batch = tokenizer(["Describe a rainy afternoon."], return_tensors="pt")
    z = torch.randn(1, trained.config.latent_dim)
    with torch.no_grad():
        same = torch.allclose(trained(**batch, latents=z).logits, reloaded(**batch, latents=z).logits, atol=1e-5)
    print(
        f"saved {backbone_dir} (base included: {(backbone_dir / 'base_model').is_dir()}); "
        f"reloaded with AutoModelForCausalLM: {type(reloaded).__name__}, identical logits: {same}"
    )
    return {
        "first_run_steps": first.state.global_step,
        "final_step": second.state.global_step,
        "checkpoints": checkpoints,
        "evaluations": history.rows,
        "final_metrics": metrics,
        "reloaded_identical": same,
        "base_included": (backbone_dir / "base_model").is_dir(),
    }


if __name__ == "__main__":
    main()
