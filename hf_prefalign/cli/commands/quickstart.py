"""`hf-prefalign quickstart`: the whole method on the embedded default model (`hf_prefalign.quickstart`)."""

from __future__ import annotations

from hf_prefalign.cli import common


def _arguments() -> tuple[type, ...]:
    """`quickstart`'s flags: the fields of `QuickstartConfig` (which imports torch: only when asked)."""
    from hf_prefalign.quickstart import QuickstartConfig

    return (QuickstartConfig,)


def _quickstart(argv: list[str]) -> int:
    from hf_prefalign.quickstart import run_quickstart

    (config,) = common._parse("quickstart", _arguments(), argv)
    run_quickstart(config)
    return 0
