"""`hf-prefalign align`: one user with Latent DPO, many users into a bank, or one user from liked examples."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from hf_prefalign.cli import common
from hf_prefalign.cli.common import UsageError


@dataclass
class AlignArguments:
    backbone: str = field(metadata={"help": "A CLaP backbone folder or Hub repo."})
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "A TRL preference dataset: .jsonl/.json file, saved dataset folder, or Hub id.",
            "aliases": ["--dataset_name"],
        },
    )
    scorer: str | None = field(default=None, metadata={"help": "Instead of --dataset: a named scorer ranking --pool."})
    pool: str | None = field(default=None, metadata={"help": "The response pool that --scorer ranks."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a Hub dataset."})
    from_examples: str | None = field(
        default=None,
        metadata={
            "help": "Instead of --dataset / --scorer: a .jsonl file of `prompt` / `response` rows the user liked "
            "(`liked: false` marks disliked ones); builds the embedding from their posteriors, with no training."
        },
    )
    users_per_batch: int = field(
        default=4096,  # many_users.DEFAULT_USERS_PER_BATCH, not imported: the CLI parses its flags without torch
        metadata={
            "help": "When --dataset holds many users (a `user_id` column, or a folder of <user_id>.jsonl files): "
            "users trained together in one batched step; the bank of all of them goes to --output_dir."
        },
    )
    num_shards: int | None = field(
        default=None,
        metadata={
            "help": "Many users across processes: this process aligns shard --shard_index of --num_shards (users "
            "split by id) into the sharded bank in --output_dir, skipping users already there (a rerun finishes what "
            "is missing). Under `torchrun` / `accelerate launch`, RANK / WORLD_SIZE are used when these are not set."
        },
    )
    shard_index: int | None = field(default=None, metadata={"help": "This process's shard (with --num_shards)."})
    dtype: str = common._dtype_field("the backbone's base")

    def __post_init__(self):
        common._check_dtype(self.dtype)


def _arguments() -> tuple[type, ...]:
    """`align`'s flags: `AlignArguments` and `LatentDPOConfig` (which imports torch: only when asked)."""
    from hf_prefalign import LatentDPOConfig

    return (AlignArguments, LatentDPOConfig)


def _align(argv: list[str]) -> int:
    from hf_prefalign import LatentDPOTrainer, load_response_pool
    from hf_prefalign.data.pairs import preference_pairs_from_pool
    from hf_prefalign.scorers import get_scorer

    args, config = common._parse("align", _arguments(), argv)
    resume_requested = bool(config.resume_from_checkpoint)
    common._resume(config)
    sources = [args.dataset, args.scorer, args.from_examples]
    if sum(source is not None for source in sources) != 1:
        raise UsageError(
            "give either --dataset (a preference dataset), --scorer with --pool, or --from_examples (liked examples)"
        )
    if args.from_examples is not None:
        return _align_from_examples(args, config)
    if args.scorer is not None:
        if args.pool is None:
            raise UsageError("--scorer needs --pool (the response pool it ranks)")
        dataset = preference_pairs_from_pool(load_response_pool(args.pool), get_scorer(args.scorer))
    else:
        dataset = _load_preference_data(args.dataset, args.dataset_split)
    if isinstance(dataset, dict) or "user_id" in dataset.column_names:
        if resume_requested:
            raise UsageError("--resume_from_checkpoint does not apply to many users (no checkpoints are written)")
        return _align_users(args, config, dataset)
    model, tokenizer = common._load_backbone(args.backbone, args.dtype, common._device(config.use_cpu))
    trainer = LatentDPOTrainer(model, config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_preference(config.output_dir)
    print(f"saved the preference embedding ({trainer.num_pairs} pairs) to {config.output_dir}")
    return 0


def _load_preference_data(source: str, split: str = "train"):
    """A preference dataset (see `_load_dataset`), or `{user_id: dataset}` for a folder of `<user_id>.jsonl` /
    `<user_id>.json` files (one user per file; an empty file is a user without pairs)."""
    from datasets import Dataset

    from hf_prefalign.utils.paths import validate_preference_id

    path = Path(source)
    if not path.is_dir() or any((path / name).is_file() for name in ("state.json", "dataset_dict.json")):
        return common._load_dataset(source, split)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".jsonl", ".json"))
    if not files:
        raise FileNotFoundError(f"{path} holds neither a saved dataset nor per-user .jsonl/.json files.")
    users = {}
    for file in files:
        try:
            validate_preference_id(file.stem)
        except ValueError as err:
            raise ValueError(f"{file.name}: the file name is the user id. {err}") from None
        if not file.read_text(encoding="utf-8").strip():
            users[file.stem] = Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
            continue
        common._check_json(file)
        users[file.stem] = Dataset.from_json(str(file))
    return users


def _align_users(args: AlignArguments, config, dataset) -> int:
    """`align` on many users' pairs (a `user_id` column or a folder of per-user files): a bank in --output_dir."""
    from hf_prefalign import align_users

    output = Path(config.output_dir)
    if output.is_dir() and any(output.iterdir()) and not (output / "bank.json").is_file():
        raise FileExistsError(f"{output} holds something other than a preference bank; choose another --output_dir.")
    total = len(dataset) if isinstance(dataset, dict) else len(dataset.unique("user_id"))
    model, tokenizer = common._load_backbone(args.backbone, args.dtype, common._device(config.use_cpu))
    if args.num_shards is not None or args.shard_index is not None or "WORLD_SIZE" in os.environ:
        bank = align_users(
            model,
            dataset,
            config,
            processing_class=tokenizer,
            users_per_batch=args.users_per_batch,
            bank_directory=output,
            num_shards=args.num_shards,
            shard_index=args.shard_index,
        )
        print(f"aligned {len(bank)} users into the sharded bank at {output} (users already there were skipped)")
        return 0
    bank = align_users(model, dataset, config, processing_class=tokenizer, users_per_batch=args.users_per_batch)
    bank.save(output)
    skipped = f" ({total - len(bank)} skipped: no usable pair)" if total > len(bank) else ""
    print(f"saved a bank of {len(bank)} users{skipped} to {output}")
    return 0


def _align_from_examples(args: AlignArguments, config) -> int:
    """`align --from_examples FILE`: the embedding from the examples' posteriors, written like a trained one."""
    from hf_prefalign import PreferenceEmbedding
    from hf_prefalign.preference.personalisation import read_examples

    if config.resume_from_checkpoint:
        raise UsageError("--resume_from_checkpoint does not apply to --from_examples (nothing is trained)")
    if args.pool is not None:
        raise UsageError("--pool goes with --scorer, not with --from_examples")
    source = Path(args.from_examples)
    if source.is_file() and not source.read_text(encoding="utf-8").strip():
        raise ValueError(f"{source} holds no examples: give at least one prompt/response row the user liked.")
    examples = common._load_dataset(args.from_examples, args.dataset_split)
    read_examples(examples)  # a bad file is reported before the backbone loads
    model, tokenizer = common._load_backbone(args.backbone, args.dtype, common._device(config.use_cpu))
    embedding = PreferenceEmbedding.from_examples(
        model, tokenizer, examples, rank=config.prior_rank, target_kl=config.target_kl
    )
    embedding.save_pretrained(config.output_dir)
    record = embedding.config.training
    print(
        f"saved the preference embedding ({record['liked']} liked, {record['disliked']} disliked examples, no "
        f"training) to {config.output_dir}"
    )
    return 0
