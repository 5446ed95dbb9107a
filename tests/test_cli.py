"""The `hf-prefalign` console script."""

from __future__ import annotations

import pytest

from hf_prefalign.cli.main import main


def test_env_reports_versions_and_the_default_model(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "- transformers: " in out
    assert "- embedded default model: " in out


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["frobnicate"])
    assert excinfo.value.code == 2
