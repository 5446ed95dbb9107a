"""The argument parser of the `hf-prefalign` subcommands: `trl.TrlParser` with the CLI's error guarantees on top.

`hf_prefalign.cli.common` imports this module only when a subcommand parses its arguments (never for
`hf-prefalign --help` / `--version`, which do not import the package at all).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn

import yaml
from trl import TrlParser

from hf_prefalign.cli.common import UsageError


class PrefAlignParser(TrlParser):
    """[`~trl.TrlParser`] for one `hf-prefalign` subcommand: TRL's `--config` handling, with one-line usage errors.

    TRL's behaviour is kept as it is: `--config file.yaml` sets the defaults of the dataclasses' fields, command-line
    flags override them, and the file's `env:` mapping sets environment variables before the arguments are parsed.
    On top of it:

    - A YAML key is any long flag of the command without its dashes, aliases included (`model_name_or_path` for
      `model`, as in TRL's own YAML files); `TrlParser` matches only the fields' names. A key that names no flag
      is refused with its name, and so is a file that sets one setting twice (`model` and `model_name_or_path`).
    - `--config=FILE` works like `--config FILE`; a missing file, a second `--config` or a file that is not valid
      YAML is refused before anything is parsed.
    - Every parsing mistake (an unknown or missing flag, a value of the wrong type, a value a dataclass'
      `__post_init__` refuses) raises [`UsageError`] with one line, instead of argparse's usage dump and
      `SystemExit`: `hf_prefalign.cli.main.run` prints it with a hint and exits with status 2.

    Args:
        dataclass_types (`tuple[type, ...]`):
            The dataclasses whose fields become flags.
        **kwargs:
            Passed to [`~trl.TrlParser`] (`prog`, `description`).
    """

    def __init__(self, dataclass_types: Iterable[type], **kwargs) -> None:
        super().__init__(dataclass_types, **kwargs)
        self.add_argument(
            "--config",
            metavar="FILE",
            help="A YAML file of settings (keys: this command's flags without the dashes); command-line flags "
            "override it, and an `env:` mapping in it sets environment variables (TRL's --config).",
        )
        self._config_path: Path | None = None

    def error(self, message: str) -> NoReturn:
        """argparse reports its parsing errors here: one line, a usage error (exit 2), no usage dump."""
        raise UsageError(message)

    def parse_args_and_config(self, args: Iterable[str] | None = None, **kwargs) -> tuple:
        """[`~trl.TrlParser.parse_args_and_config`], after checking `--config`; its errors as [`UsageError`].

        Args:
            args (`list[str]`, *optional*, defaults to `sys.argv[1:]`):
                The command's arguments (after the subcommand's name).
            **kwargs:
                Passed to [`~trl.TrlParser.parse_args_and_config`].

        Returns:
            `tuple`: one instance of each dataclass, then a namespace holding the `--config` value.
        """
        args = list(sys.argv[1:] if args is None else args)
        # TRL reads `--config FILE` only: split `--config=FILE` in two.
        args = [part for arg in args for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
        positions = [index for index, arg in enumerate(args) if arg == "--config"]
        if len(positions) > 1:
            raise UsageError("--config is given more than once (give one file)")
        if positions:
            index = positions[0]
            if index + 1 >= len(args) or args[index + 1].startswith("--"):
                raise UsageError("--config needs a file")
            self._config_path = Path(args[index + 1])
            if not self._config_path.is_file():
                raise UsageError(f"the config file {self._config_path} does not exist")
        try:
            return super().parse_args_and_config(args, **kwargs)
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise UsageError(f"{self._config_path} is not valid YAML: {' '.join(str(err).split())}") from err
        except ValueError as err:  # unknown flags; TRL's checks of the file; a dataclass' __post_init__
            if "not used by the HfArgumentParser" in str(err):
                raise UsageError(f"unrecognized arguments: {str(err).split(':', 1)[1].strip()}") from err
            raise UsageError(str(err)) from err
        except TypeError as err:  # a value of the wrong type from the config file
            raise UsageError(f"invalid setting: {err}") from err

    def set_defaults_with_config(self, **kwargs) -> list[str]:
        """[`~trl.TrlParser.set_defaults_with_config`] with the YAML keys mapped to the fields they set.

        Raises:
            [`UsageError`]: a key names no flag of the command, or two keys set the same field.

        Returns:
            `list[str]`: empty (every key was used).
        """
        fields = self._fields_by_key()
        source = self._config_path or "the config file"
        unknown = sorted(str(key) for key in kwargs if key not in fields)
        if unknown:
            raise UsageError(f"unknown keys in {source}: {', '.join(unknown)}")
        keys_by_field: dict[str, list[str]] = {}
        for key in kwargs:
            keys_by_field.setdefault(fields[key], []).append(key)
        twice = [" and ".join(keys) for keys in keys_by_field.values() if len(keys) > 1]
        if twice:
            raise UsageError(f"{source} sets one setting twice: {'; '.join(twice)} (keep one)")
        return super().set_defaults_with_config(**{fields[key]: value for key, value in kwargs.items()})

    def _fields_by_key(self) -> dict[str, str]:
        # Every long flag without its dashes (`model`, `model_name_or_path`, `output-dir`) -> the field it sets.
        # Left out: `help`, `config`, and the `no_<field>` complements of boolean fields (they store the opposite
        # value, so `no_x: true` in a file would set x to true).
        fields = {}
        for action in self._actions:
            if action.dest in ("help", "config"):
                continue
            for option in action.option_strings:
                if option.startswith("--") and option[2:] != f"no_{action.dest}":
                    fields[option[2:]] = action.dest
        return fields


__all__ = ["PrefAlignParser"]
