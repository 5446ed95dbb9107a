"""A bank of a million users: open time, lookup latency, memory and disk of the sharded `PreferenceBank` layout.

python examples/bank_scale_benchmark.py [--sizes 1000 100000 1000000] [--users-per-shard 4096] [--lookups 200]
                                        [--folders-up-to 1000] [--workdir DIR] [--no-docs]

Users are synthetic, at the sizes of the default backbone (SmolLM2-135M: latent_dim 32, feature_dim 576, rank 8:
5,184 fp32 parameters, about 20 KB each) with random parameters. For each size U:
- build: the bank is written as it grows in production, by appending: chunks of `--users-per-shard` new users, each
  chunk one `bank.save(directory, layout="sharded")` into the same folder (one new shard, the index replaced);
- in a fresh process (so memory is the bank's, not the builder's): `PreferenceBank.load` (open time, resident memory
  after it), then `--lookups` cold `bank.get` of distinct random users (p50 / p99 latency: one `get_slice` read of
  the user's row, its sha256 and finiteness checks, an embedding built), then the resident memory again;
- disk: bytes and files of the bank folder.
On the largest size it also times a mixed-user batch: `bank.latents` for 64 rows of 64 distinct random users (and 8
rows of them mixes of two users), cold (users read from their shards) and warm (users cached).
Sizes up to `--folders-up-to` are measured in the folder-per-user layout too, for comparison. `--same-process`
measures in the building process (quick checks: no fresh interpreter, memory includes the build).

Writes docs/bank_scale.json and the table in docs/bank_scale.md (between the markers). Everything runs on one thread
(`torch.set_num_threads(1)`); run it with `nice -n 19` beside other work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from hf_prefalign import PreferenceBank, PreferenceEmbedding, PreferenceEmbeddingConfig


ROOT = Path(__file__).resolve().parent.parent
LATENT_DIM, FEATURE_DIM, RANK = 32, 576, 8
FINGERPRINT = "b" * 64
BATCH_ROWS = 64
TABLE_START, TABLE_END = "<!-- bank-scale-table:start -->", "<!-- bank-scale-table:end -->"


def synthetic_user(index: int) -> PreferenceEmbedding:
    """User `index`: random parameters (seeded by its index), at the default backbone's sizes."""
    generator = torch.Generator().manual_seed(index)
    config = PreferenceEmbeddingConfig(
        latent_dim=LATENT_DIM,
        feature_dim=FEATURE_DIM,
        backbone_fingerprint=FINGERPRINT,
        rank=RANK,
        training={"method": "synthetic", "pairs": 16},
    )
    embedding = PreferenceEmbedding(config)
    with torch.no_grad():
        for parameter in embedding.parameters():
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return embedding


def user_id(index: int) -> str:
    return f"user-{index:07d}"


def build(directory: Path, users: int, layout: str, users_per_shard: int) -> float:
    """Write a bank of `users` synthetic users; returns the seconds it took."""
    start = time.perf_counter()
    if layout == "folders":
        bank = PreferenceBank(FINGERPRINT, LATENT_DIM, FEATURE_DIM)
        for index in range(users):
            bank.add(user_id(index), synthetic_user(index))
        bank.save(directory)
        return time.perf_counter() - start
    for first in range(0, users, users_per_shard):  # append, one shard at a time
        chunk = PreferenceBank(FINGERPRINT, LATENT_DIM, FEATURE_DIM)
        for index in range(first, min(first + users_per_shard, users)):
            chunk.add(user_id(index), synthetic_user(index))
        chunk.save(directory, layout="sharded", users_per_shard=users_per_shard)
    return time.perf_counter() - start


def disk_usage(directory: Path) -> tuple[int, int]:
    """(bytes, files) under `directory`."""
    size = files = 0
    for folder, _, names in os.walk(directory):
        for name in names:
            size += os.stat(os.path.join(folder, name)).st_size
            files += 1
    return size, files


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(directory: Path, lookups: int, batch: bool, seed: int = 0) -> dict[str, Any]:
    """Open the bank, time cold lookups and (with `batch`) a mixed-user batch; run in a fresh process."""
    torch.set_num_threads(1)
    rss_before = _rss_mb()
    start = time.perf_counter()
    bank = PreferenceBank(FINGERPRINT, LATENT_DIM, FEATURE_DIM)
    ids = bank.load(directory)
    open_s = time.perf_counter() - start
    rss_open = _rss_mb()
    rng = random.Random(seed)
    chosen = rng.sample(ids, min(lookups, len(ids)))
    latencies = []
    for preference_id in chosen:
        start = time.perf_counter()
        bank.get(preference_id)
        latencies.append(time.perf_counter() - start)
    result: dict[str, Any] = {
        "users": len(ids),
        "open_s": open_s,
        "lookups": len(chosen),
        "lookup_p50_ms": 1e3 * _percentile(latencies, 0.5),
        "lookup_p99_ms": 1e3 * _percentile(latencies, 0.99),
        "rss_open_mb": rss_open - rss_before,
        "rss_after_lookups_mb": _rss_mb() - rss_before,
    }
    if batch:
        rows: list[Any] = []
        picked = set(chosen)  # users not read yet, so the first batch is cold
        while len(rows) < BATCH_ROWS and len(picked) < len(ids):
            candidate = rng.choice(ids)
            if candidate not in picked:
                picked.add(candidate)
                rows.append(candidate)
        for i in range(0, min(16, len(rows) - 1), 2):  # 8 rows become mixes of two batch users
            rows[i] = {rows[i]: 0.5, rows[i + 1]: 0.5}
        features = torch.randn(len(rows), FEATURE_DIM)  # (B, F)
        start = time.perf_counter()
        latents = bank.latents(rows, features)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        again = bank.latents(rows, features)
        warm = time.perf_counter() - start
        assert torch.equal(latents, again) and latents.shape == (len(rows), LATENT_DIM)
        result.update({"batch_rows": len(rows), "batch_cold_ms": 1e3 * cold, "batch_warm_ms": 1e3 * warm})
    return result


def measure_in_subprocess(directory: Path, lookups: int, batch: bool) -> dict[str, Any]:
    command = [sys.executable, __file__, "--measure", str(directory), "--lookups", str(lookups)]
    if batch:
        command.append("--batch")
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| layout | users | build (s) | disk (MB) | files | open (s) | lookup p50 (ms) | lookup p99 (ms) "
        "| RSS after open (MB) | RSS after lookups (MB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['layout']} | {r['users']:,} | {r['build_s']:.1f} | {r['disk_bytes'] / 2**20:,.1f} | "
            f"{r['files']:,} | {r['open_s']:.3f} | {r['lookup_p50_ms']:.2f} | {r['lookup_p99_ms']:.2f} | "
            f"{r['rss_open_mb']:.1f} | {r['rss_after_lookups_mb']:.1f} |"
        )
    batches = [r for r in rows if "batch_cold_ms" in r]
    for r in batches:
        lines.append("")
        lines.append(
            f"Mixed-user batch from the {r['users']:,}-user {r['layout']} bank: {r['batch_rows']} rows of "
            f"{r['batch_rows']} distinct users (8 rows mixing two of them), `bank.latents` cold (users read from "
            f"their shards) {r['batch_cold_ms']:.1f} ms, warm (users cached) {r['batch_warm_ms']:.1f} ms."
        )
    return "\n".join(lines)


def write_docs(results: dict[str, Any]) -> None:
    (ROOT / "docs" / "bank_scale.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    page = ROOT / "docs" / "bank_scale.md"
    text = page.read_text(encoding="utf-8")
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    page.write_text(f"{head}{TABLE_START}\n{table(results['rows'])}\n{TABLE_END}{tail}", encoding="utf-8")


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000, 1_000_000])
    parser.add_argument("--users-per-shard", type=int, default=4096)
    parser.add_argument("--lookups", type=int, default=200)
    parser.add_argument("--folders-up-to", type=int, default=1_000, help="also measure folders up to this size")
    parser.add_argument("--workdir", type=Path, default=None, help="where banks are built (a temporary folder)")
    parser.add_argument("--no-docs", action="store_true", help="print the results, write no docs")
    parser.add_argument(
        "--same-process", action="store_true", help="measure here (quick checks; RSS includes the build)"
    )
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--batch", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.lookups, args.batch)))
        return None

    workdir = Path(tempfile.mkdtemp(prefix="bank-scale-", dir=args.workdir))
    rows = []
    largest = max(args.sizes)
    try:
        for users in sorted(args.sizes):
            layouts = ["sharded"] + (["folders"] if users <= args.folders_up_to else [])
            for layout in layouts:
                directory = workdir / f"{layout}-{users}"
                build_s = build(directory, users, layout, args.users_per_shard)
                disk_bytes, files = disk_usage(directory)
                row = {"layout": layout, "build_s": build_s, "disk_bytes": disk_bytes, "files": files}
                batch = users == largest and layout == "sharded"
                measured = measure if args.same_process else measure_in_subprocess
                row.update(measured(directory, args.lookups, batch))
                rows.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(directory)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results = {
        "sizes": sorted(args.sizes),
        "users_per_shard": args.users_per_shard,
        "user": {"latent_dim": LATENT_DIM, "feature_dim": FEATURE_DIM, "rank": RANK},
        "threads": 1,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "rows": rows,
    }
    if not args.no_docs:
        write_docs(results)
    print(table(rows))
    return results


if __name__ == "__main__":
    main()
