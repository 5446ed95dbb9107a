"""Entry point of the `hf-prefalign` console script.

It lives outside the `hf_prefalign` package on purpose: importing the package registers its model with transformers'
auto classes (as `import hf_prefalign` promises), which imports torch and takes seconds, and `hf-prefalign --help` /
`--version` must answer at once. The commands themselves run in `hf_prefalign.cli.main`, imported only then.

`hf-prefalign <command> --help` lists the flags of the trainers' configs (`TrainingArguments` fields), which cannot
be read without importing torch. So the first help page builds every command's parser and caches a description of
them (`cli_help-<key>.json` under `$HF_PREFALIGN_CACHE`, else `$XDG_CACHE_HOME/hf_prefalign`); later help pages are
rendered from it by argparse itself, without importing the package. The key hashes the package's sources and the
versions of Python, torch, transformers, trl, peft, accelerate and datasets, so an edit or an upgrade rebuilds it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


COMMANDS = {
    "quickstart": "the whole method on the embedded default model: pool, CLaP, two users, side-by-side generations",
    "pool": "sample a response pool (K responses per prompt) from a model",
    "clap": "train a PrefAlign backbone with CLaP on a response pool",
    "align": "align one user with Latent DPO (a preference dataset, or a named scorer over a pool), many users into "
    "a bank (a dataset with a user_id column, or a folder of <user_id>.jsonl files), or build one user from liked "
    "examples without training (--from_examples)",
    "generate": "generate with a backbone, optionally for a user (--preference_id)",
    "push": "upload a saved backbone, preference embedding or bank to the Hub",
    "pull": "download a backbone, preference embedding or bank from the Hub",
    "env": "print versions and where the embedded default model is",
}


def package_version() -> str:
    """The installed `hf-prefalign` version, read from the package metadata (no import of the package)."""
    try:
        return version("hf-prefalign")
    except PackageNotFoundError:
        return "unknown (not installed)"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-prefalign",
        description="Individual preference alignment for Hugging Face causal LMs (CLaP + Latent DPO).",
        epilog="Run `hf-prefalign <command> --help` for a command's options.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"hf-prefalign {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, help_text in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


# ----------------------------------------------------------------------
# Cached help pages of the subcommands
# ----------------------------------------------------------------------
_KEYED_PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")


def _cache_dir() -> Path:
    # as `hf_prefalign.integrations.embedded.default_cache_dir`, which cannot be imported here
    if env := os.environ.get("HF_PREFALIGN_CACHE"):
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "hf_prefalign"


def help_cache_path() -> Path | None:
    """Where the help pages of this installation are cached; `None` when the package cannot be found."""
    spec = importlib.util.find_spec("hf_prefalign")  # a top-level package: located, not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    digest = hashlib.sha256(sys.version.encode())
    for package in _KEYED_PACKAGES:
        try:
            digest.update(f"{package}={version(package)};".encode())
        except PackageNotFoundError:
            digest.update(f"{package}=-;".encode())
    root = Path(next(iter(spec.submodule_search_locations)))
    for path in [Path(__file__), *sorted(root.rglob("*.py"))]:
        digest.update(path.name.encode() + path.read_bytes())
    return _cache_dir() / f"cli_help-{digest.hexdigest()[:20]}.json"


def parser_spec(parser: argparse.ArgumentParser) -> dict | None:
    """What `parser.format_help()` depends on, as JSON; `None` for a parser this module cannot redraw."""
    if parser._mutually_exclusive_groups or not isinstance(parser.formatter_class, type):
        return None
    if getattr(argparse, parser.formatter_class.__name__, None) is not parser.formatter_class:
        return None
    groups = []
    for group in parser._action_groups:
        actions = []
        for action in group._group_actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.option_strings or action.nargs not in (None, 0, "?", "*", "+"):
                return None  # positionals, fixed counts: not needed by these commands
            actions.append(
                {
                    "option_strings": action.option_strings,
                    "dest": action.dest,
                    "nargs": action.nargs,
                    "metavar": list(action.metavar) if isinstance(action.metavar, tuple) else action.metavar,
                    "default": None if action.default is None else str(action.default),
                    "choices": None if action.choices is None else [str(choice) for choice in action.choices],
                    "required": action.required,
                    "help": action.help,
                }
            )
        groups.append({"title": group.title, "description": group.description, "actions": actions})
    return {
        "prog": parser.prog,
        "usage": parser.usage,
        "description": parser.description,
        "epilog": parser.epilog,
        "formatter_class": parser.formatter_class.__name__,
        "add_help": parser.add_help,
        "groups": groups,
    }


def parser_from_spec(spec: dict) -> argparse.ArgumentParser:
    """A parser that formats the same help page as the one [`parser_spec`] described (it parses nothing useful)."""
    parser = argparse.ArgumentParser(
        prog=spec["prog"],
        usage=spec["usage"],
        description=spec["description"],
        epilog=spec["epilog"],
        formatter_class=getattr(argparse, spec["formatter_class"]),
        add_help=spec["add_help"],
    )
    defaults = {group.title: group for group in parser._action_groups}
    for group_spec in spec["groups"]:
        group = defaults.get(group_spec["title"]) or parser.add_argument_group(
            group_spec["title"], group_spec["description"]
        )
        for action in group_spec["actions"]:
            options = {
                "dest": action["dest"],
                "default": action["default"],
                "required": action["required"],
                "help": action["help"],
            }
            if action["nargs"] == 0:
                options.update(action="store_const", const=True)
            else:
                metavar = action["metavar"]
                options.update(
                    nargs=action["nargs"],
                    choices=action["choices"],
                    metavar=tuple(metavar) if isinstance(metavar, list) else metavar,
                )
            group.add_argument(*action["option_strings"], **options)
    return parser


def cached_help_page(command: str) -> str | None:
    """`command`'s help page from the cache; `None` when there is no usable cache for this installation."""
    path = help_cache_path()
    if path is None or not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))[command]
        return parser_from_spec(spec).format_help()
    except (OSError, ValueError, KeyError, TypeError, argparse.ArgumentError):
        return None  # unreadable or from an incompatible writer: rebuilt by the live page


def save_help_cache(specs: dict[str, dict]) -> None:
    """Write the help pages' descriptions for the next `--help` (best effort: a read-only cache is no error)."""
    path = help_cache_path()
    if path is None:
        return
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        staging.write_text(json.dumps(specs), encoding="utf-8")
        os.replace(staging, path)
        for stale in path.parent.glob("cli_help-*.json"):
            if stale != path:
                stale.unlink(missing_ok=True)


def _help_page(command: str) -> str:
    """`command`'s help page: from the cache, or from the live parsers (then cached for every command)."""
    page = cached_help_page(command)
    if page is not None:
        return page
    from hf_prefalign.cli.main import make_command_parser

    parser = make_command_parser(command)
    specs = {command: parser_spec(parser)}
    try:  # the imports are paid for: describe the other commands too
        specs.update({name: parser_spec(make_command_parser(name)) for name in COMMANDS if name != command})
    except Exception:  # a command whose parser cannot be built now: no cache, this page still prints
        specs = {}
    if specs and all(spec is not None for spec in specs.values()):
        save_help_cache(specs)
    return parser.format_help()


def _asks_for_help(args: list[str]) -> bool:
    for arg in args:
        if arg == "--":
            return False
        if arg in ("-h", "--help"):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    """Run `hf-prefalign` with `argv` (default: the command line); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"hf-prefalign {package_version()}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        parser.error(f"unknown command {command!r} (choose from {', '.join(COMMANDS)})")
    if _asks_for_help(rest):
        print(_help_page(command), end="")
        return 0
    from hf_prefalign.cli.main import run

    return run(command, rest)


if __name__ == "__main__":
    sys.exit(main())
