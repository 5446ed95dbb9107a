"""The examples in examples/ run: with `--tiny`, or on the tiny stand-ins of tests/snippet_env.py."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_pool
from snippet_env import patch_tiny_world

from hf_prefalign import CLaPConfig, CLaPTrainer, PrefAlignForCausalLM
from hf_prefalign.testing import make_tiny_base, make_tiny_tokenizer
from hf_prefalign.trainer.clap_init import init_latent_space_from_pool, own_latent_log_likelihood_gain


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
    assert "[4/4] generating: neutral / concise / negative" in out
    assert (run / "users" / "concise" / "model.safetensors").is_file()

    _run_script("serve_users.py", ["--run", str(run), "--max-new-tokens", "4"], monkeypatch)
    out = capsys.readouterr().out
    for tag in ("[negative]", "[neutral]", "[concise]", "[pipeline, negative]", "[pipeline, concise]"):
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


def test_evidence_contrastive_check_scores_each_response_token_once(monkeypatch):
    """The evidence script's check and the PCA start's calibration compute the same own-z likelihood gain (a check
    that shifted logits and labels twice scored each position against the token two ahead)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the script imports its sibling examples
    evidence = runpy.run_path(str(EXAMPLES / "preference_space_evidence.py"))
    tokenizer = make_tiny_tokenizer()
    model = PrefAlignForCausalLM.from_base(make_tiny_base("llama"), latent_dim=4).eval()
    pool = make_tiny_pool(num_prompts=8, seed=5)
    prepared = CLaPTrainer._prepare_dataset(pool, tokenizer, CLaPConfig(output_dir="unused", report_to=[]), "train")
    init_latent_space_from_pool(model, prepared, tokenizer.pad_token_id, adapter_scale=1.0)
    torch.nn.init.normal_(model.latent_adapter.weight, std=0.5)  # a decoder that z visibly changes
    check = evidence["contrastive_accuracy"](model, tokenizer, pool, max_length=256)
    (gain,) = own_latent_log_likelihood_gain(model, prepared, tokenizer.pad_token_id, (1.0,)).values()
    assert gain != 0
    assert check["nll_gain_per_token"] == pytest.approx(gain, rel=1e-4, abs=1e-6)
