"""The benchmark script (examples/benchmark.py) in --quick mode: every code path on a tiny model, no numbers asserted."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest


BENCHMARK_PATH = Path(__file__).resolve().parent.parent / "examples" / "benchmark.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("prefalign_benchmark", BENCHMARK_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_quick_run_records_every_figure_and_can_reuse_its_pool_and_backbone(benchmark, tmp_path):
    results = benchmark.main(["--quick", "--output_dir", str(tmp_path / "run")])
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (tmp_path / "run" / "benchmarks.md").is_file()
    users = ["positive", "negative", "concise"]
    assert written["mode"] == "quick"
    for key in ("machine", "versions", "settings", "one_time", "neutral", "serving", "targets", "estimate_seconds"):
        assert key in written, key
    assert set(written["one_time"]) == {"pool", "clap", "latent_cache", "prefix_generation_check"}
    assert set(written["users"]) == set(users)
    for user in users:
        record = written["users"][user]
        assert record["pairs"] > 0
        assert set(record["methods"]) == set(benchmark.METHODS)
        for method, figures in record["methods"].items():
            missing = [key for key in benchmark.FIGURE_KEYS if key not in figures]
            assert not missing, (user, method, missing)
            assert set(figures["reward"]) >= {"mean", "std", "n", "se"}
        assert set(written["ratios"][user]) >= {"time_ours_over_lora", "size_ours_over_lora"}
        for neutral in ("base", "latent_z0"):
            assert user in written["neutral"][neutral]["reward"]
    for key in benchmark.SERVING_KEYS:
        assert written["serving"][key]["tokens_per_second"] > 0
    assert len(results["targets"]) == 8
    markdown = (tmp_path / "run" / "benchmarks.md").read_text()
    assert "## Targets" in markdown and "Quick mode" in markdown

    # The one-time artefacts of the first run are reused, not rebuilt.
    work = tmp_path / "run" / "work"
    again = benchmark.main(
        [
            "--quick",
            "--output_dir",
            str(tmp_path / "again"),
            "--pool",
            str(work / "pool"),
            "--backbone",
            str(work / "backbone"),
            "--users",
            "concise",
            "--latent_repeats",
            "1",
        ]
    )
    assert again["one_time"]["pool"]["reused"] == str(work / "pool")
    assert again["one_time"]["clap"]["reused"] == str(work / "backbone")
    assert set(again["users"]["concise"]["methods"]) == set(benchmark.METHODS)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ('{"latent_dpo": {"num_train_epochs": 10}}', "different numbers of epochs"),
        ('{"lora_dpo": {"max_steps": 3}}', "changes how many pairs or steps"),
        ('{"prefix_dpo": {"max_length": 16}}', "changes how many pairs or steps"),
    ],
)
def test_unfair_settings_are_refused_before_anything_runs(benchmark, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        benchmark.main(["--quick", "--output_dir", str(tmp_path), "--method_overrides", overrides])
    assert not (tmp_path / "work").exists()


def test_different_pairs_across_methods_are_refused(benchmark):
    plans = {
        "latent_dpo": {"num_train_epochs": 1, "pairs": "a" * 64},
        "lora_dpo": {"num_train_epochs": 1, "pairs": "b" * 64},
    }
    with pytest.raises(ValueError, match="different preference pairs"):
        benchmark.check_fair_comparison(plans)
    plans["lora_dpo"]["pairs"] = "a" * 64
    benchmark.check_fair_comparison(plans)


def test_quick_mode_refuses_to_write_under_docs(benchmark):
    with pytest.raises(ValueError, match="refuses to write under docs"):
        benchmark.main(["--quick", "--output_dir", str(BENCHMARK_PATH.parent.parent / "docs" / "benchmarks")])
