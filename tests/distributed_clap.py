"""CLaP on a tiny model in every process of a `torch.distributed.run` launch; `test_distributed.py` runs it.

`python -m torch.distributed.run --nproc_per_node 2 tests/distributed_clap.py OUT` (gloo, CPU) checks, in one launch:
which prompt groups each process's dataloader yields, an uninterrupted run, a run resumed from its mid-epoch
checkpoint, and the CLI's `clap`. Rank 0 writes `OUT/results.json`; every process writes `OUT/writes-<rank>.json`,
the folders it saved a backbone to.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from datasets import Dataset
from helpers import LATENT_DIM, PAPER_DESIGN

from hf_prefalign import PrefAlignForCausalLM, save_response_pool
from hf_prefalign.testing import make_tiny_base, make_tiny_tokenizer
from hf_prefalign.trainer import CLaPConfig, CLaPTrainer


NUM_PROMPTS = 6  # with 2 prompts a step, 3 steps an epoch: the checkpoint at step 2 falls mid-epoch
MAX_STEPS = 4
SAVE_STEPS = 2


def make_pool() -> Dataset:
    """Distinct prompts with 3 distinct responses each: equal groups, so a mean over one process's responses
    averaged over processes equals the mean over all responses of the step."""
    rows = []
    for i in range(NUM_PROMPTS):
        responses = [f"w{10 + i} w{30 + 5 * k} w{60 + i} w{31 + 5 * k}" for k in range(3)]
        rows.append({"prompt": f"w{5 + i} w{50 + i}", "responses": responses})
    return Dataset.from_list(rows)


def make_backbone() -> PrefAlignForCausalLM:
    """A tiny llama backbone (no dropout) whose posteriors are sharp (std e^-10): the reparameterised samples are the
    means to ~1e-5, so runs that draw their noise in different orders (one process or two) compute the same step."""
    model = PrefAlignForCausalLM.from_base(make_tiny_base("llama"), latent_dim=LATENT_DIM, **PAPER_DESIGN)
    head = model.latent_encoder.to_gaussian
    with torch.no_grad():
        torch.manual_seed(3)
        torch.nn.init.normal_(head.weight, std=0.05)
        torch.nn.init.normal_(head.bias, std=0.05)
        head.weight[LATENT_DIM:] = 0.0
        head.bias[LATENT_DIM:] = -20.0
    return model


def make_trainer(output_dir: str | os.PathLike, per_device_train_batch_size: int) -> CLaPTrainer:
    config = CLaPConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=per_device_train_batch_size,
        max_steps=MAX_STEPS,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        logging_steps=1,
        optim="sgd",  # Adam would turn the float32 noise of near-zero gradients into whole steps
        learning_rate=1e-2,
        kl_weight=0.1,
        contrastive_num_negatives=None,  # all the other responses: no draw of negatives
        responses_per_step=None,
        seed=7,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
    )
    return CLaPTrainer(make_backbone(), config, train_dataset=make_pool(), processing_class=make_tiny_tokenizer())


def epoch_batches(trainer: CLaPTrainer) -> list[dict[str, int]]:
    """The prompt groups of each batch of an epoch of the trainer's dataloader: prompt tokens -> sequences."""
    batches = []
    for batch in trainer.get_train_dataloader():
        groups = batch["group_index"].tolist()
        is_prompt = (batch["labels"] == -100) & batch["attention_mask"].bool()
        prompts = [str(ids[keep].tolist()) for ids, keep in zip(batch["input_ids"], is_prompt, strict=True)]
        batches.append({prompts[groups.index(g)]: groups.count(g) for g in sorted(set(groups))})
    return batches


def step_logs(trainer: CLaPTrainer) -> list[dict[str, float]]:
    return [log for log in trainer.state.log_history if "loss/nll" in log]


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])
    writes = []
    save_pretrained = PrefAlignForCausalLM.save_pretrained

    def recording_save(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        if is_main_process:
            writes.append(os.fspath(save_directory))
        return save_pretrained(self, save_directory, *args, is_main_process=is_main_process, **kwargs)

    PrefAlignForCausalLM.save_pretrained = recording_save

    uninterrupted = make_trainer(out / "uninterrupted", per_device_train_batch_size=1)
    sharding = [None] * dist.get_world_size()
    dist.all_gather_object(sharding, epoch_batches(uninterrupted))
    uneven = make_trainer(out / "uneven", per_device_train_batch_size=1)
    uneven.train_dataset = uneven.train_dataset.select(range(NUM_PROMPTS - 1))  # 5 prompts for 2 processes
    uneven_sharding = [None] * dist.get_world_size()
    dist.all_gather_object(uneven_sharding, epoch_batches(uneven))
    uninterrupted.train()
    resumed = make_trainer(out / "resumed", per_device_train_batch_size=1)
    resumed.train(resume_from_checkpoint=str(out / "uninterrupted" / f"checkpoint-{SAVE_STEPS}"))

    # The CLI, as `accelerate launch -m hf_prefalign.cli clap ...` runs it (its tokenizer is the tiny one).
    from hf_prefalign.cli.main import main as cli_main

    base_dir = out / "base"
    if rank == 0:
        make_tiny_base("qwen2").save_pretrained(base_dir)
        save_response_pool(make_pool(), out / "pool")
    dist.barrier()
    transformers.AutoTokenizer.from_pretrained = lambda *args, **kwargs: make_tiny_tokenizer()
    cli_args = ["--pool", str(out / "pool"), "--model", str(base_dir), "--output_dir", str(out / "cli")]
    cli_args += [
        "--max_steps",
        "2",
        "--save_steps",
        "1",
        "--use_cpu",
        "true",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
    ]
    code = cli_main(["clap", *cli_args, "--latent_dim", "4", "--eval_fraction", "0.33"])

    try:  # one prompt for two processes
        CLaPTrainer(
            make_backbone(),
            uninterrupted.args,
            train_dataset=make_pool().select([0]),
            processing_class=make_tiny_tokenizer(),
        )
        too_few_prompts = None
    except ValueError as err:
        too_few_prompts = str(err)

    (out / f"writes-{rank}.json").write_text(json.dumps(writes))
    if rank == 0:
        results = {
            "world_size": dist.get_world_size(),
            "sharding": sharding,
            "uneven_sharding": uneven_sharding,
            "uninterrupted": step_logs(uninterrupted),
            "resumed": step_logs(resumed),
            "cli_exit_code": code,
            "too_few_prompts": too_few_prompts,
        }
        (out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
