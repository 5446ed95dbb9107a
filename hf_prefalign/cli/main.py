"""The `hf-prefalign` subcommands (the console script's entry point, `_hf_prefalign_cli.main`, dispatches here).

Each subcommand parses its dataclasses with `trl.TrlParser` (a `transformers.HfArgumentParser`), so every config
field is a flag, and `--config file.yaml` sets defaults that flags override, its `env:` mapping sets environment
variables (unknown keys are refused). Heavy modules are imported only by the subcommand that runs;
`hf-prefalign --help` and `--version` never import this package, nor does `hf-prefalign <command> --help` once its
page is cached (see `_hf_prefalign_cli`, which builds it here with `make_command_parser`). User mistakes print one
line and a hint (exit 2 for usage errors, 1 for failures); tracebacks are for bugs.

This module is the dispatcher: each command is a module of `hf_prefalign.cli.commands` (its argument dataclasses
and its runner), and what several commands share is in `hf_prefalign.cli.common`.
"""

from __future__ import annotations

import argparse
import os
import sys

from _hf_prefalign_cli import COMMANDS, main, make_parser
from hf_prefalign.cli import common
from hf_prefalign.cli.commands import align, clap, env, generate, hub, pool, quickstart
from hf_prefalign.cli.common import UsageError


def _arguments(command: str) -> tuple[type, ...]:
    """The dataclasses whose fields are `command`'s flags (the trainers' configs import torch: only when asked)."""
    return {
        "quickstart": quickstart._arguments,
        "pool": pool._arguments,
        "clap": clap._arguments,
        "align": align._arguments,
        "generate": generate._arguments,
        "push": hub._push_arguments,
        "pull": hub._pull_arguments,
    }[command]()


def make_command_parser(command: str, dataclass_types: tuple | None = None) -> argparse.ArgumentParser:
    """The parser of one subcommand: its help page, and (except `env`) a `PrefAlignParser` over its dataclasses."""
    if command == "env":
        return env._parser()
    dataclass_types = _arguments(command) if dataclass_types is None else dataclass_types
    return common._command_parser(command, dataclass_types)


_RUNNERS = {
    "quickstart": quickstart._quickstart,
    "pool": pool._pool,
    "clap": clap._clap,
    "align": align._align,
    "generate": generate._generate,
    "push": hub._push,
    "pull": hub._pull,
    "env": env._env,
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
