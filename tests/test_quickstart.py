"""The main job end to end on the embedded default model, at a tiny size, and its resume behaviour."""

from __future__ import annotations

import json

import pytest

from hf_prefalign.cli.main import main


@pytest.mark.slow
def test_quickstart_runs_end_to_end_and_resumes(tmp_path, capsys):
    argv = [
        "quickstart",
        "--output_dir",
        str(tmp_path / "run"),
        "--num_prompts",
        "6",
        "--num_heldout",
        "1",
        "--num_responses",
        "4",
        "--max_new_tokens",
        "8",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[neutral]" in out and "[concise]" in out and "[negative]" in out
    assert "mean reward of each user's scorer" in out
    state = json.loads((tmp_path / "run" / "quickstart.json").read_text())
    backbone = json.loads((tmp_path / "run" / "backbone" / "config.json").read_text())
    # The library's defaults are the recipe: hidden-state encoder, residual adapter, PCA start.
    assert backbone["encoder_type"] == "hidden_states" and backbone["adapter_type"] == "residual"
    assert "training_summary" not in backbone  # provenance is not architecture
    summary = json.loads((tmp_path / "run" / "backbone" / "training_summary.json").read_text())
    assert summary["latent_init"]["responses"] == 5 * 4
    assert set(state["stages"]) == {"pool", "clap", "users", "generate"}
    generate = state["stages"]["generate"]
    assert 0 < generate["seconds"] <= state["seconds"]
    # Per column: mean words and how many of the held-out answers stopped before the token cap.
    assert set(generate["words"]) == set(generate["natural_endings"]) == {"neutral", "concise", "negative"}
    assert all(0 <= n <= generate["prompts"] == 1 for n in generate["natural_endings"].values())
    assert "ended" in out and "words" in out
    for folder in ("pool", "backbone", "users/concise", "users/negative"):
        assert (tmp_path / "run" / folder).is_dir()

    assert main(argv) == 0  # a rerun skips the finished stages
    out = capsys.readouterr().out
    assert "pool: reusing" in out and "CLaP: reusing" in out and "users: reusing" in out
