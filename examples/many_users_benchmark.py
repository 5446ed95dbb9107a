"""Many users in one run: users per second and peak memory of many-user Latent DPO at U = 10 ... 10,000 simulated
users, against one LatentDPOTrainer per user, and the time of an online update of one user of a saved bank.

python examples/many_users_benchmark.py [--sizes 10 100 1000 10000] [--threads 1 2] [--full] [--quick]

The latent cache is synthetic, at the sizes of the default backbone (SmolLM2-135M: F = 576 prompt features,
Z = 32): a pool of 256 preference pairs with random prompt features and random chosen / rejected posteriors, each
pair usable in both orientations. Simulated user u draws a taste (a random direction in z), 8-32 pairs of the pool,
and orients each pair by its taste, so users share pairs but disagree on many. Their pairs are text rows (`prompt
17`, `response 17a`, ...) that a `LatentCache` subclass maps to the synthetic latents, so every public entry point
runs as it would on a real backbone, minus the encoder (whose cost is once per distinct text, before any user).

Measured, each size in a fresh process (peak memory is the process' maximum resident set):
- `train`: MultiUserLatentDPOTrainer on the shared latent table (the math and its bookkeeping);
- `prepare`: the rest of `align_users` (reading the users' rows, one `user_id` dataset, encoding distinct pairs
  once, initial priors, the bank), measured as `align_users` with `num_train_epochs=0`;
- `write`: `bank.save` (one folder per user, cards included), for sizes up to `--write-up-to`;
- the baseline: one `LatentDPOTrainer` per user (construction, `train()`, `save_preference`) for `--baseline-users`,
  extrapolated linearly;
- updates: `update_user` (5 steps on 8 new pairs, warm start, in-place save) on the bank of the size given by
  `--update-on`.

Sizes above `--full-epochs-up-to` run 1 epoch instead of the default 10 unless `--full`; the JSON says which. Every
size runs on one thread (`torch.set_num_threads(1)`); the largest also on each of `--threads` (default 1 and 2: the
issue's goal is for 2 cores). Writes docs/many_users.json and the table in docs/personalisation.md ("Many users in
one run").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from hf_prefalign import (
    LatentCache,
    LatentDPOConfig,
    LatentDPOTrainer,
    MultiUserLatentDPOTrainer,
    PrefAlignForCausalLM,
    PreferenceEmbeddingConfig,
    align_users,
    update_user,
)
from hf_prefalign.trainer.many_users import DEFAULT_USERS_PER_BATCH


ROOT = Path(__file__).resolve().parent.parent
FEATURE_DIM, LATENT_DIM, POOL_PAIRS = 576, 32, 256
TABLE_START, TABLE_END = "<!-- many-users-table:start -->", "<!-- many-users-table:end -->"


# ----------------------------------------------------------------------
# The synthetic world
# ----------------------------------------------------------------------
def synthetic_table(pairs: int = POOL_PAIRS, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows 0..P-1: pair p as (a chosen, b rejected); rows P..2P-1: the same pairs the other way round."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(pairs, FEATURE_DIM, generator=generator)
    mean_a, mean_b = (torch.randn(pairs, LATENT_DIM, generator=generator) for _ in range(2))
    logvar_a, logvar_b = (-1.0 + 0.3 * torch.randn(pairs, LATENT_DIM, generator=generator) for _ in range(2))
    return {
        "features": torch.cat([features, features]),
        "chosen_mean": torch.cat([mean_a, mean_b]),
        "chosen_logvar": torch.cat([logvar_a, logvar_b]),
        "rejected_mean": torch.cat([mean_b, mean_a]),
        "rejected_logvar": torch.cat([logvar_b, logvar_a]),
    }


def simulated_user(index: int, table: dict[str, torch.Tensor], low: int = 8, high: int = 32) -> list[int]:
    """User `index`: `low`-`high` pairs of the pool, each oriented by the user's random taste (a direction in z)."""
    pairs = len(table["features"]) // 2
    generator = torch.Generator().manual_seed(10_000 + index)
    taste = torch.randn(LATENT_DIM, generator=generator)
    size = int(torch.randint(low, high + 1, (1,), generator=generator))
    chosen = torch.randperm(pairs, generator=generator)[:size]
    prefers_a = ((table["chosen_mean"][chosen] - table["rejected_mean"][chosen]) @ taste) > 0  # rows < P: a over b
    return torch.where(prefers_a, chosen, chosen + pairs).tolist()


def simulated_users(count: int, table: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {f"user{index:05d}": simulated_user(index, table) for index in range(count)}


def row_text(row: int, pairs: int = POOL_PAIRS) -> dict[str, str]:
    pair, flipped = row % pairs, row >= pairs
    a, b = f"response {pair}a", f"response {pair}b"
    return {"prompt": f"prompt {pair}", "chosen": b if flipped else a, "rejected": a if flipped else b}


class SyntheticLatentCache(LatentCache):
    """A `LatentCache` whose entries are the synthetic table: `prompt p` with `response pa` / `response pb`."""

    def __init__(self, model: PrefAlignForCausalLM, table: dict[str, torch.Tensor]):
        self.fingerprint = model.fingerprint()
        self.encoder_sequences = 0
        self.table = table

    def pair_latents(self, prompts, chosen, rejected) -> dict[str, torch.Tensor]:
        pairs = len(self.table["features"]) // 2
        rows = [int(p.split()[1]) + (pairs if c.endswith("b") else 0) for p, c in zip(prompts, chosen, strict=True)]
        index = torch.tensor(rows)
        return {name: column[index] for name, column in self.table.items()}


def synthetic_backbone() -> PrefAlignForCausalLM:
    """A 1-layer random Llama with SmolLM2-135M's hidden size, as the identity the users belong to (never run)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=FEATURE_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=64,
    )
    return PrefAlignForCausalLM.from_base(LlamaForCausalLM(config), latent_dim=LATENT_DIM).eval()


def config(output_dir: str, **overrides: Any) -> LatentDPOConfig:
    settings = {"output_dir": output_dir, "report_to": [], "disable_tqdm": True, "use_cpu": True}
    return LatentDPOConfig(**{**settings, **overrides})


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


# ----------------------------------------------------------------------
# One size (a fresh process)
# ----------------------------------------------------------------------
def run_size(
    count: int, epochs: float, write: bool, updates: int, baseline: int, pool: int, threads: int = 1
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    table = synthetic_table(pool)
    users = simulated_users(count, table)
    model = synthetic_backbone()
    cache = SyntheticLatentCache(model, table)
    template = PreferenceEmbeddingConfig(
        latent_dim=LATENT_DIM, feature_dim=FEATURE_DIM, backbone_fingerprint=cache.fingerprint
    )
    rows = [{**row_text(r, pool), "user_id": user} for user, own in users.items() for r in own]
    dataset = Dataset.from_list(rows)
    work = Path(tempfile.mkdtemp(prefix="many-users-"))
    result: dict[str, Any] = {
        "users": count,
        "threads": threads,
        "epochs": epochs,
        "user_pairs": len(rows),
        "pairs_per_user": round(len(rows) / count, 2),
    }

    before = _peak_rss_mb()
    wall, cpu = time.perf_counter(), time.process_time()
    trainer = MultiUserLatentDPOTrainer(config(str(work), num_train_epochs=epochs), table, users, template)
    trainer.train()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    steps = sum(e.config.training["steps"] for e in trainer.embeddings.values())
    pair_steps = len(rows) * epochs  # every epoch passes each user's pairs once
    result["train"] = {
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "users_per_s_wall": round(count / wall, 2),
        "users_per_s_cpu": round(count / cpu, 2),
        "user_steps": steps,
        "pair_steps_per_s_cpu": round(pair_steps / cpu, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "peak_rss_increase_mb": round(_peak_rss_mb() - before, 1),
    }
    del trainer

    wall, cpu = time.perf_counter(), time.process_time()
    bank = align_users(model, dataset, config(str(work), num_train_epochs=0), latent_cache=cache)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    result["prepare"] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "users_per_s_cpu": round(count / cpu, 1)}
    if write:
        wall, cpu = time.perf_counter(), time.process_time()
        bank.save(work / "bank")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        result["write"] = {
            "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3),
            "users_per_s_wall": round(count / wall, 1),
        }
    if updates:
        if not write:
            bank.save(work / "bank")
        times = []
        for index in range(updates):
            user = sorted(users)[(index * 7919) % count]
            fresh = simulated_user(count + index, table)[:8]  # another simulated user's pairs: new to this one
            new_pairs = Dataset.from_list([row_text(r, pool) for r in fresh])
            start = time.perf_counter()
            update_user(model, work / "bank", user, new_pairs, config(str(work), max_steps=5), latent_cache=cache)
            times.append(time.perf_counter() - start)
        result["update"] = {
            "bank_users": count,
            "updates": updates,
            "mean_s": round(sum(times) / len(times), 4),
            "max_s": round(max(times), 4),
            "new_pairs": 8,
            "steps": 5,
        }
    if baseline:
        datasets = {
            user: Dataset.from_list([row_text(r, pool) for r in users[user]]) for user in sorted(users)[:baseline]
        }
        wall, cpu = time.perf_counter(), time.process_time()
        for user, own in datasets.items():
            single = LatentDPOTrainer(
                model, config(str(work / user), num_train_epochs=epochs), train_dataset=own, latent_cache=cache,
                processing_class=_NoTokenizer(),
            )  # fmt: skip
            single.train()
            single.save_preference(work / "one-by-one" / user)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        result["one_by_one"] = {
            "users": baseline,
            "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3),
            "users_per_s_wall": round(baseline / wall, 3),
            "users_per_s_cpu": round(baseline / cpu, 3),
        }
    return result


class _NoTokenizer:
    """LatentDPOTrainer asks for a tokenizer; with every latent cached (synthetic), nothing is tokenized."""

    pad_token_id = 0


# ----------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------
def table_markdown(result: dict[str, Any]) -> str:
    lines = [
        "| users | threads | epochs | pairs / user | train (CPU s) | users/s (train, CPU) | users/s (train, wall) | "
        "+ prepare (CPU s) | + write bank (s) | peak memory (MB, +training) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in result["runs"]:
        write = f"{run['write']['wall_s']:.1f}" if "write" in run else "-"
        lines.append(
            f"| {run['users']:,} | {run.get('threads', 1)} | {run['epochs']:g} | {run['pairs_per_user']:.1f} | "
            f"{run['train']['cpu_s']:.2f} | {run['train']['users_per_s_cpu']:,.1f} | "
            f"**{run['train']['users_per_s_wall']:,.1f}** | {run['prepare']['cpu_s']:.2f} | {write} | "
            f"{run['train']['peak_rss_mb']:,.0f} (+{run['train']['peak_rss_increase_mb']:,.0f}) |"
        )
    one = result.get("one_by_one")
    if one:
        lines.append(
            f"| {one['users']} one by one (`LatentDPOTrainer`) | 1 | {one['epochs']:g} | {one['pairs_per_user']:.1f} | "
            f"{one['cpu_s']:.2f} | {one['users_per_s_cpu']:.2f} | **{one['users_per_s_wall']:.2f}** | | | |"
        )
    return "\n".join(lines)


def write_docs(result: dict[str, Any], json_path: Path, page: Path) -> None:
    json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    text = page.read_text(encoding="utf-8")
    if TABLE_START in text and TABLE_END in text:
        head, rest = text.split(TABLE_START, 1)
        tail = rest.split(TABLE_END, 1)[1]
        page.write_text(f"{head}{TABLE_START}\n{table_markdown(result)}\n{TABLE_END}{tail}", encoding="utf-8")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--full", action="store_true", help="the default 10 epochs at every size")
    parser.add_argument("--full-epochs-up-to", type=int, default=10000)
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="torch threads; more than 1 only at the largest size"
    )
    parser.add_argument("--write-up-to", type=int, default=1000)
    parser.add_argument("--update-on", type=int, default=1000, help="bank size for the update timing")
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--baseline-users", type=int, default=10)
    parser.add_argument("--pool", type=int, default=POOL_PAIRS)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, in this process, nothing written")
    parser.add_argument("--output-json", default=str(ROOT / "docs" / "many_users.json"))
    parser.add_argument("--page", default=str(ROOT / "docs" / "personalisation.md"))
    parser.add_argument("--worker", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:  # one size, in its own process: print its result
        print(json.dumps(run_size(**args.worker)))
        return {}
    if args.quick:
        args.sizes, args.pool, args.updates, args.baseline_users, args.update_on = [3, 6], 16, 1, 2, 6
        args.threads = [1]
    default_epochs = LatentDPOConfig.__dataclass_fields__["num_train_epochs"].default
    start = time.perf_counter()
    runs = []
    plan = [(count, 1) for count in args.sizes] + [(max(args.sizes), n) for n in args.threads if n > 1]
    for count, threads in plan:
        full = args.full or count <= args.full_epochs_up_to
        job = {
            "threads": threads,
            "count": count,
            "epochs": default_epochs if full else 1.0,
            "write": count <= args.write_up_to and threads == 1,
            "updates": args.updates if count == args.update_on and threads == 1 else 0,
            "baseline": args.baseline_users if count == min(args.sizes) and threads == 1 else 0,
            "pool": args.pool,
        }
        if args.quick:
            run = run_size(**job)
        else:
            command = [sys.executable, __file__, "--worker", json.dumps(job)]
            environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            done = subprocess.run(command, check=True, capture_output=True, text=True, env=environment)
            run = json.loads(done.stdout.strip().splitlines()[-1])
        runs.append(run)
        print(
            f"U={count:>6}, {threads} thread(s): {run['train']['users_per_s_wall']:>9.1f} users/s (train, wall), "
            f"{run['train']['users_per_s_cpu']:>9.1f} (CPU), {run['epochs']:g} epochs, "
            f"prepare {run['prepare']['cpu_s']:.2f}s, peak {run['train']['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    baseline_run = next(run for run in runs if "one_by_one" in run)
    one = baseline_run["one_by_one"]
    largest = max(runs, key=lambda run: run["users"])
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {
            "feature_dim": FEATURE_DIM,
            "latent_dim": LATENT_DIM,
            "pool_pairs": args.pool,
            "pairs_per_user": "8-32, uniform",
            "per_device_train_batch_size": 64,
            "num_latent_samples": 16,
            "prior_rank": 8,
            "users_per_batch": DEFAULT_USERS_PER_BATCH,
        },
        "runs": runs,
        "one_by_one": {
            **one,
            "epochs": baseline_run["epochs"],
            "pairs_per_user": baseline_run["pairs_per_user"],
            "extrapolated_hours_for_largest": round(largest["users"] / one["users_per_s_wall"] / 3600, 2),
        },
        "update": next((run["update"] for run in runs if "update" in run), None),
        "benchmark_wall_s": round(time.perf_counter() - start, 1),
    }
    if not args.quick:
        write_docs(result, Path(args.output_json), Path(args.page))
    return result


if __name__ == "__main__":
    main()
