"""The examples in examples/ run: with `--tiny`, or on the tiny stand-ins of tests/snippet_env.py."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from snippet_env import patch_tiny_world


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run_script(name: str, argv: list[str], monkeypatch) -> dict:
    """Run `examples/<name>` as `python examples/<name> *argv` would, in this process."""
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *argv])
    return runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_trainer_finetuning_example_stops_resumes_and_reloads(tmp_path, monkeypatch):
    module = runpy.run_path(str(EXAMPLES / "trainer_finetuning.py"))
    result = module["main"](["--tiny", "--output_dir", str(tmp_path / "run")])
    assert result["first_run_steps"] == 4, "the callback stops the first run half-way"
    assert result["checkpoints"] == ["checkpoint-4"]
    assert result["final_step"] == 8, "the resumed run continues from the checkpoint to the end"
    assert [row["step"] for row in result["evaluations"][:4]] == [2, 4, 6, 8]
    assert result["base_included"] and result["reloaded_identical"]


def test_quickstart_then_serve_users_examples(tmp_path, monkeypatch, capsys):
    """examples/quickstart.py writes a run (tiny stand-ins); examples/serve_users.py serves its two users."""
    patch_tiny_world(monkeypatch, tmp_path)
    run = tmp_path / "quickstart"
    _run_script(
        "quickstart.py", ["--output_dir", str(run), "--fast", "--num_prompts", "8", "--num_heldout", "2"], monkeypatch
    )
    out = capsys.readouterr().out
    assert "[4/4] generating: neutral / concise / detailed" in out
    assert (run / "users" / "concise" / "model.safetensors").is_file()

    _run_script("serve_users.py", ["--run", str(run), "--max-new-tokens", "4"], monkeypatch)
    out = capsys.readouterr().out
    for tag in ("[detailed]", "[neutral]", "[concise]", "[pipeline, detailed]", "[pipeline, concise]"):
        assert tag in out, f"{tag} missing from serve_users output:\n{out}"


def test_bank_scale_benchmark_measures_both_layouts(tmp_path):
    module = runpy.run_path(str(EXAMPLES / "bank_scale_benchmark.py"))
    argv = ["--sizes", "12", "40", "--users-per-shard", "16", "--lookups", "5", "--folders-up-to", "12"]
    results = module["main"]([*argv, "--no-docs", "--same-process", "--workdir", str(tmp_path)])
    rows = {(row["layout"], row["users"]): row for row in results["rows"]}
    assert set(rows) == {("sharded", 12), ("folders", 12), ("sharded", 40)}
    assert rows[("sharded", 40)]["files"] == 4, "bank.json + three shards of 16, 16 and 8 users"
    assert rows[("folders", 12)]["files"] >= 2 * 12 + 1
    assert rows[("sharded", 40)]["batch_rows"] == 35, "64 rows, or as many users as the bank has not read yet"
    for row in rows.values():
        assert row["lookups"] == 5 and 0 < row["lookup_p50_ms"] <= row["lookup_p99_ms"]
    assert not list(tmp_path.iterdir()), "the banks are deleted"
