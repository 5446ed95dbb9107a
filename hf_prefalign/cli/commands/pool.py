"""`hf-prefalign pool`: sample a response pool (K responses per prompt) from a model."""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_prefalign.cli import common


@dataclass
class PoolArguments:
    output_dir: str = field(metadata={"help": "Where the pool is saved (datasets' save_to_disk)."})
    prompts: str = field(
        default="bundled",
        metadata={"help": "'bundled', a .jsonl/.json file with a 'prompt' column, or a saved dataset folder."},
    )
    model: str = field(
        default="embedded",
        metadata={
            "help": "'embedded' (SmolLM2-135M-Instruct) or a model path/id.",
            "aliases": ["--model_name_or_path"],
        },
    )
    num_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    dtype: str = common._dtype_field("the model")
    use_cpu: bool = common._use_cpu_field()

    def __post_init__(self):
        common._check_dtype(self.dtype)


def _arguments() -> tuple[type, ...]:
    """`pool`'s flags: `PoolArguments` and `ResponsePoolConfig` (which imports torch: only when asked)."""
    from hf_prefalign import ResponsePoolConfig

    return (PoolArguments, ResponsePoolConfig)


def _pool(argv: list[str]) -> int:
    from hf_prefalign import build_response_pool, load_bundled_prompts, save_response_pool

    args, config = common._parse("pool", _arguments(), argv)
    prompts = load_bundled_prompts() if args.prompts == "bundled" else common._load_dataset(args.prompts)
    if args.num_prompts:
        prompts = prompts.select(range(min(args.num_prompts, len(prompts))))
    model, tokenizer = common._load_base(args.model, args.dtype, common._device(args.use_cpu))
    pool = build_response_pool(model, tokenizer, prompts, config)
    save_response_pool(pool, args.output_dir)
    print(f"saved a pool of {len(pool)} prompts x {config.num_responses} responses to {args.output_dir}")
    return 0
