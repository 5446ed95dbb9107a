"""Entry point of the `hf-prefalign` console script.

It lives outside the `hf_prefalign` package on purpose: importing the package registers its model with transformers'
auto classes (as `import hf_prefalign` promises), which imports torch and takes seconds, and `hf-prefalign --help` /
`--version` must answer at once. The commands themselves run in `hf_prefalign.cli.main`, imported only then.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version


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
    from hf_prefalign.cli.main import run

    return run(command, rest)


if __name__ == "__main__":
    sys.exit(main())
