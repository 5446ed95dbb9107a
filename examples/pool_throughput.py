"""Measure response-pool sampling throughput on the embedded default model (responses per second).

python examples/pool_throughput.py [--num-prompts 32] [--output-json docs/pool_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from hf_prefalign import ResponsePoolConfig, build_response_pool, load_bundled_prompts, load_default_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--num-responses", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--output-json", default="docs/pool_throughput.json")
    args = parser.parse_args()
    base, tokenizer = load_default_base()
    prompts = load_bundled_prompts().select(range(args.num_prompts))
    rows = []
    for batch_size in args.batch_size:
        config = ResponsePoolConfig(
            num_responses=args.num_responses, max_new_tokens=args.max_new_tokens, batch_size=batch_size
        )
        start = time.perf_counter()
        pool = build_response_pool(base, tokenizer, prompts, config)
        seconds = time.perf_counter() - start
        responses = len(pool) * args.num_responses
        rows.append(
            {
                "batch_size_prompts": batch_size,
                "responses": responses,
                "seconds": seconds,
                "responses_per_second": responses / seconds,
            }
        )
        print(f"batch of {batch_size} prompts x {args.num_responses}: {responses / seconds:.2f} responses/s")
    result = {
        "machine": {"platform": platform.platform(), "cpu_threads": torch.get_num_threads()},
        "settings": {k: v for k, v in vars(args).items() if k != "output_json"},
        "runs": rows,
    }
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
