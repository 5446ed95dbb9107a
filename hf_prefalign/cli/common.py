"""What more than one `hf-prefalign` subcommand uses: `UsageError`, the `--dtype` / `--use_cpu` fields, argument
parsing, and the loaders and checks of models, datasets and checkpoints.

The command modules (`hf_prefalign.cli.commands`) call these through this module (`common._load_base(...)`), so a
test that patches one here reaches every command.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import field
from pathlib import Path

from _hf_prefalign_cli import COMMANDS


logger = logging.getLogger(__name__)


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
# Helpers
# ----------------------------------------------------------------------
def _command_parser(command: str, dataclass_types: tuple) -> argparse.ArgumentParser:
    """A `PrefAlignParser` over `dataclass_types` for `command` (`hf_prefalign.cli.main.make_command_parser` picks
    each command's dataclasses)."""
    from hf_prefalign.cli.parser import PrefAlignParser  # imports trl: only once a subcommand parses

    return PrefAlignParser(dataclass_types, prog=f"hf-prefalign {command}", description=COMMANDS[command])


def _parse(command: str, dataclass_types: tuple, argv: list[str]) -> tuple:
    """Parse `argv` into `dataclass_types` with `trl.TrlParser` (`--config file.yaml` sets defaults that flags
    override; see `hf_prefalign.cli.parser`); mistakes raise `UsageError`."""
    parser = _command_parser(command, dataclass_types)
    parsed = parser.parse_args_and_config(argv)
    # The `--config` flag itself comes back as an extra namespace after the dataclasses: drop it.
    return tuple(parsed[: len(dataclass_types)])


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
