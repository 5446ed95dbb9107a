"""The benchmark script (examples/benchmark.py): --quick mode (every code path on a tiny model, no figures asserted)
and its pieces (CAA hook, oracle, validation selection, targets, budgets)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch


BENCHMARK_PATH = Path(__file__).resolve().parent.parent / "examples" / "benchmark.py"


@pytest.fixture(scope="module")
def benchmark():
    sys.path.insert(0, str(BENCHMARK_PATH.parent))  # as `python examples/benchmark.py` does: steering_baselines
    spec = importlib.util.spec_from_file_location("prefalign_benchmark", BENCHMARK_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)
    sys.path.remove(str(BENCHMARK_PATH.parent))


def test_quick_run_records_every_figure_and_can_reuse_its_pool_and_backbone(benchmark, tmp_path):
    results = benchmark.main(["--quick", "--output_dir", str(tmp_path / "run")])
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (tmp_path / "run" / "benchmarks.md").is_file()
    args = benchmark.BenchmarkArguments(quick=True)
    users, budgets = args.users, [str(b) for b in args.budget_list]
    assert written["mode"] == "quick"
    for key in ("machine", "versions", "settings", "one_time", "neutral", "serving", "targets", "estimate_seconds"):
        assert key in written, key
    assert set(written["one_time"]) == {"pool", "clap", "latent_cache", "prefix_generation_check"}
    assert set(written["users"]) == set(users)
    assert written["oracles"]["best_of_4"]["oracle"] is True
    for user in users:
        record = written["users"][user]
        assert record["pairs_available"] > 0
        assert list(record["budgets"]) == budgets, "one entry per budget"
        for budget, entry in record["budgets"].items():
            assert entry["pairs"] == min(int(budget), record["pairs_available"])
            assert set(entry["methods"]) == set(benchmark.METHODS)
            for method, figures in entry["methods"].items():
                missing = [key for key in benchmark.FIGURE_KEYS if key not in figures]
                assert not missing, (user, budget, method, missing)
                assert set(figures["reward"]) >= {"mean", "std", "n", "se"}
            lora = entry["methods"]["lora_dpo"]["selection"]
            assert lora["learning_rate"] in args.lora_learning_rate_list
            assert [p["setting"] for p in lora["validation_curve"]] == args.lora_learning_rate_list
            caa = entry["methods"]["caa"]["selection"]
            assert caa["layer"] in written["caa_grid"]["layers"]
            assert caa["multiplier"] in args.caa_multiplier_list
            assert set(written["ratios"][user][budget]) >= {"time_ours_over_lora", "size_ours_over_lora"}
        oracle = record["oracles"]["best_of_4"]
        assert (
            oracle["needs_reward_at_inference"]
            and oracle["reward"]["n"] == record["budgets"][budgets[0]]["methods"]["latent_dpo"]["reward"]["n"]
        )
        for method in benchmark.METHODS:
            assert [p["budget"] for p in written["sample_efficiency"][user][method]] == args.budget_list
        for neutral in ("base", "latent_z0", "base_validation"):
            assert user in written["neutral"][neutral]["reward"]
    for key in benchmark.SERVING_KEYS:
        assert written["serving"][key]["tokens_per_second"] > 0
    assert written["serving"]["rows"] == args.serving_users
    assert [row["id"] for row in results["targets"]] == [
        "time",
        "gain_vs_lora_dpo",
        "gain_vs_caa",
        "perplexity",
        "artefact",
        "throughput_vs_base",
        "throughput_vs_lora",
    ]
    assert all(isinstance(row["met"], bool) for row in written["targets"])
    assert set(written["plot_data"]) == set(users)
    markdown = (tmp_path / "run" / "benchmarks.md").read_text()
    assert "## Targets" in markdown and "Quick mode" in markdown
    for budget in budgets:
        assert f"## Budget: {budget} pairs per user" in markdown
    assert "oracle" in markdown
    if written["versions"]["matplotlib"]:
        assert (tmp_path / "run" / "reward_vs_time.png").is_file()
        assert (tmp_path / "run" / "sample_efficiency.png").is_file()

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
            "--budgets",
            "3",
            "--latent_repeats",
            "1",
        ]
    )
    assert again["one_time"]["pool"]["reused"] == str(work / "pool")
    assert again["one_time"]["clap"]["reused"] == str(work / "backbone")
    assert list(again["users"]["concise"]["budgets"]) == ["3"]
    assert set(again["users"]["concise"]["budgets"]["3"]["methods"]) == set(benchmark.METHODS)


def test_a_killed_quick_run_resumes_without_redoing_finished_users(benchmark, tmp_path, monkeypatch, capsys):
    """`--resume` reads back the pool, backbone, neutral samples and every finished (user, budget) of the killed run
    in the same work folder, and computes only what is missing."""
    run_module = sys.modules["benchmarking.run"]
    train_latent_dpo = run_module.train_latent_dpo
    trained, killing = [], [True]

    class Killed(BaseException):
        pass

    def dies_at_the_second_user(setup, cache, user, *args, **kwargs):
        if user == "concise" and killing[0]:
            raise Killed  # the kill
        trained.append(user)
        return train_latent_dpo(setup, cache, user, *args, **kwargs)

    argv = ["--quick", "--work_dir", str(tmp_path / "work"), "--users", "positive", "concise", "--budgets", "3"]
    argv += ["--latent_repeats", "1"]
    monkeypatch.setattr(run_module, "train_latent_dpo", dies_at_the_second_user)
    with pytest.raises(Killed):
        benchmark.main([*argv, "--output_dir", str(tmp_path / "first")])
    (finished,) = (tmp_path / "work" / "stages").glob("*/users/positive/budget-3.json")
    assert trained == ["positive"]
    capsys.readouterr()
    killing[0] = False

    resumed = benchmark.main([*argv, "--output_dir", str(tmp_path / "resumed"), "--resume"])
    out = capsys.readouterr().out
    assert trained == ["positive", "concise"], "only the unfinished user is trained again"
    assert "pool: resuming" in out and "neutral.json" in out
    assert resumed["one_time"]["clap"]["resumed"] and resumed["one_time"]["pool"]["resumed"]
    assert resumed["users"]["positive"]["budgets"]["3"] == json.loads(finished.read_text())["entry"]
    assert set(resumed["users"]["concise"]["budgets"]["3"]["methods"]) == set(benchmark.METHODS)
    assert "prefix_generation_check" in resumed["one_time"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ('{"latent_dpo": {"num_train_epochs": 10}}', "different numbers of epochs"),
        ('{"lora_dpo": {"max_steps": 3}}', "changes how many pairs or steps"),
        ('{"prefix_dpo": {"max_length": 16}}', "changes how many pairs or steps"),
        ('{"lora_dpo": {"learning_rate": 1e-4}}', "lora_learning_rates"),
        ('{"caa": {"learning_rate": 1e-4}}', "no trainer config"),
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


# ----------------------------------------------------------------------
# The pieces of benchmark v2, without a run
# ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(benchmark):
    tokenizer = benchmark.make_quick_tokenizer()
    base = benchmark.make_quick_base(len(tokenizer), seed=0)
    ids = torch.tensor([tokenizer("good day the cat")["input_ids"]])
    return base, tokenizer, ids


def test_prompts_sampled_together_get_what_each_gets_alone(benchmark, tiny):
    """Several prompts per call (left-padded): each row's mask covers exactly its prompt and the rows come back to
    their prompts; the perplexity of rows from several prompts in one pass is the one of a pass per row."""
    base, tokenizer, _ = tiny
    prompt_ids = [tokenizer(text)["input_ids"] for text in ("good day the cat", "sad", "the cat loves a great day")]
    calls = []

    def read(ids):  # a token that depends on which tokens, and how many, are read
        return 3 + (sum(ids) + 7 * len(ids)) % 40

    def echo(input_ids, attention_mask, max_new_tokens, **kwargs):  # answers what its mask lets it read
        calls.append(input_ids.shape[0])
        answer = [read(row[mask == 1].tolist()) for row, mask in zip(input_ids, attention_mask, strict=True)]
        return torch.cat([input_ids, torch.tensor(answer)[:, None].expand(-1, max_new_tokens)], dim=1)

    args = benchmark.BenchmarkArguments(quick=True, samples_per_prompt=2, generation_batch_size=6)
    together = benchmark.sample_responses(echo, prompt_ids, tokenizer, args)
    expected = [[[read(ids)] * args.max_new_tokens] * 2 for ids in prompt_ids]
    assert calls == [6] and together == expected
    args.generation_batch_size = 5  # two prompts, then one
    assert benchmark.sample_responses(echo, prompt_ids, tokenizer, args) == expected and calls[1:] == [4, 2]

    rows = [[[5, 6, 7], [8]], [[9, 10]], [[11, 12, 13, 14], [15, 16]]]
    pooled = benchmark.base_perplexity(base, prompt_ids, rows, rows_per_call=6)
    assert math.isfinite(pooled)
    assert pooled == pytest.approx(benchmark.base_perplexity(base, prompt_ids, rows, rows_per_call=1), rel=1e-4)


def test_caa_hook_changes_outputs_and_a_zero_vector_leaves_the_base_unchanged(benchmark, tiny):
    import steering_baselines

    from hf_prefalign.models.prefalign.architectures import get_decoder_layout

    base, _, ids = tiny
    layout = get_decoder_layout(base.config.model_type)
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        with steering_baselines.caa_steering(base, layout, 1, torch.zeros(base.config.hidden_size)):
            zero = base(input_ids=ids).logits
        vector = torch.randn(base.config.hidden_size, generator=torch.Generator().manual_seed(0))
        with steering_baselines.caa_steering(base, layout, 1, vector):
            steered = base(input_ids=ids).logits
        after = base(input_ids=ids).logits
    assert torch.equal(zero, plain), "a zero CAA vector is the base"
    assert not torch.allclose(steered, plain), "a CAA vector changes the outputs"
    assert torch.equal(after, plain), "the hook is removed when the block ends"

    generate = steering_baselines.caa_generate(base, layout, 1)
    settings = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": 3, "do_sample": False}
    assert torch.equal(generate(torch.zeros(1, base.config.hidden_size), **settings), base.generate(**settings))


def test_caa_vectors_are_chosen_minus_rejected_and_both_scripts_share_them(benchmark, tiny):
    import preference_space_evidence  # noqa: F401  (still imports: the shared CAA code moved, not duplicated)
    import steering_baselines
    from datasets import Dataset

    from hf_prefalign.models.prefalign.architectures import get_decoder_layout

    base, tokenizer, _ = tiny
    layout = get_decoder_layout(base.config.model_type)
    assert benchmark.caa_vectors_for is steering_baselines.caa_vectors_for
    assert preference_space_evidence.caa_vectors_for is steering_baselines.caa_vectors_for
    pairs = Dataset.from_list(
        [
            {"prompt": "the cat", "chosen": "good great", "rejected": "bad awful"},
            {"prompt": "a dog", "chosen": "happy", "rejected": "sad poor"},
        ]
    )
    vectors = steering_baselines.caa_vectors_for(base, layout, tokenizer, pairs, [1, 2], max_length=32)
    assert set(vectors) == {1, 2} and vectors[1].shape == (base.config.hidden_size,)
    swapped = pairs.rename_columns({"chosen": "rejected", "rejected": "chosen"})
    flipped = steering_baselines.caa_vectors_for(base, layout, tokenizer, swapped, [1], max_length=32)
    torch.testing.assert_close(flipped[1], -vectors[1])
    same = pairs.map(lambda row: {"rejected": row["chosen"]})
    assert float(steering_baselines.caa_vectors_for(base, layout, tokenizer, same, [1], 32)[1].abs().max()) == 0


def test_oracle_picks_the_highest_reward_sample_of_each_group(benchmark):
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(12, generator=generator).tolist()
    picked = benchmark.best_of_n_indices(rewards, 4)
    assert len(picked) == 3
    for group, index in enumerate(picked):
        assert index in range(4 * group, 4 * group + 4)
        assert rewards[index] == max(rewards[4 * group : 4 * group + 4])
    with pytest.raises(ValueError, match="groups of 4"):
        benchmark.best_of_n_indices(rewards[:5], 4)


def test_oracle_reranks_responses_by_the_users_scorer(benchmark):
    tokenizer = benchmark.make_quick_tokenizer()
    words = ["good", "bad", "the", "great", "sad", "cat", "love", "awful"]
    candidates = [[[tokenizer.convert_tokens_to_ids(w)] for w in words]]  # one prompt, 8 one-word responses

    def scorer(texts):  # the user likes words in alphabetical order
        return torch.tensor([-float(sorted(words).index(t)) for t in texts])

    kept = benchmark.best_of_n_responses(candidates, tokenizer, scorer, 4)
    texts = [tokenizer.decode(r) for r in kept[0]]
    assert texts == [min(words[:4]), min(words[4:])]


def test_validation_selection_never_sees_the_test_prompts(benchmark):
    args = benchmark.BenchmarkArguments(quick=True)
    _, train, validation, test, _ = benchmark.split_prompts(args)
    assert len(validation) == args.num_validation and len(test) == args.num_heldout
    keys = {name: {json.dumps(p) for p in part} for name, part in (("t", train), ("v", validation), ("x", test))}
    assert not keys["v"] & keys["x"] and not keys["v"] & keys["t"] and not keys["x"] & keys["t"]

    seen = []
    rewards = {1e-5: 0.1, 5e-5: 0.9, 2e-4: 0.5, 5e-4: 2.0}
    perplexities = {1e-5: 10.0, 5e-5: 11.0, 2e-4: 10.5, 5e-4: 30.0}

    def evaluate(lr, ids):
        seen.append(ids)
        return {"reward": rewards[lr], "perplexity": perplexities[lr]}

    validation_ids = [[i] for i in range(len(validation))]
    chosen, curve = benchmark.select_on_validation(list(rewards), evaluate, validation_ids, 10.0, 1.15)
    assert all(ids is validation_ids for ids in seen) and len(seen) == len(rewards)
    best_allowed = max((lr for lr in rewards if perplexities[lr] <= 1.15 * 10.0), key=rewards.get)
    assert chosen == best_allowed != max(rewards, key=rewards.get), "over the perplexity budget is skipped"
    assert [p["setting"] for p in curve] == list(rewards)
    # Nothing within the budget: the lowest-perplexity setting.
    chosen, _ = benchmark.select_on_validation(list(rewards), evaluate, validation_ids, 1.0, 1.15)
    assert chosen == min(perplexities, key=perplexities.get)


def _synthetic_results(num_users: int, budgets: list[int]) -> dict:
    """A results dict shaped like a run's, every target met by construction (gains, times, sizes, throughput)."""

    def figures(seconds: float, reward: float, size: int, ppl: float) -> dict:
        return {
            "train_seconds": seconds,
            "reward": {"mean": reward, "se": 0.1, "n": 8},
            "artefact_bytes": size,
            "weights_bytes": size,
            "perplexity": ppl,
        }

    users = {}
    for u in range(num_users):
        users[f"user{u}"] = {
            "budgets": {
                str(b): {
                    "pairs": b,
                    "methods": {
                        "latent_dpo": figures(0.01, 1.0, 10, 10.0),
                        "lora_dpo": figures(10.0, 1.0, 10_000, 10.0),
                        "prefix_dpo": figures(10.0, 0.5, 1_000, 10.0),
                        "caa": figures(0.1, 0.5, 100, 10.0),
                        "from_examples": figures(0.001, 0.2, 10, 10.0),
                    },
                }
                for b in budgets
            },
            "oracles": {"best_of_4": figures(0.0, 100.0, 0, 10.0)},
        }
    return {
        "users": users,
        "neutral": {"base": {"perplexity": 10.0}},
        "serving": {
            "rows": 64,
            "ours_mixed_batch": {"tokens_per_second": 100.0},
            "base_batch": {"tokens_per_second": 100.0},
            "lora_mixed_batch": {"tokens_per_second": 50.0},
        },
    }


def _met(benchmark, results: dict) -> dict[str, bool]:
    return {row["id"]: row["met"] for row in benchmark.targets(results)}


def test_targets_from_a_synthetic_results_dict(benchmark):
    budgets = [16, 64, 256]
    results = _synthetic_results(6, budgets)
    assert all(_met(benchmark, results).values())

    def methods(user: int, budget: int) -> dict:
        return results["users"][f"user{user}"]["budgets"][str(budget)]["methods"]

    # Time: one user at the smallest budget at 2/100 of LoRA-DPO's time misses "every user and budget".
    methods(3, budgets[0])["latent_dpo"]["train_seconds"] = 0.02 * methods(3, budgets[0])["lora_dpo"]["train_seconds"]
    assert not _met(benchmark, results)["time"]

    # Gain vs LoRA-DPO: allowed 1 SE below; one user 2 SE below is fine (5 of 6), two are not.
    results = _synthetic_results(6, budgets)
    se = math.sqrt(2) * 0.1
    methods(0, budgets[-1])["lora_dpo"]["reward"]["mean"] += 0.5 * se
    assert _met(benchmark, results)["gain_vs_lora_dpo"], "within one standard error"
    methods(1, budgets[-1])["lora_dpo"]["reward"]["mean"] += 2 * se
    assert _met(benchmark, results)["gain_vs_lora_dpo"], "5 of 6 users"
    methods(2, budgets[-1])["lora_dpo"]["reward"]["mean"] += 2 * se
    row = {r["id"]: r for r in benchmark.targets(results)}["gain_vs_lora_dpo"]
    assert not row["met"] and row["users_met"] == 4 and row["users_needed"] == 5
    # ... and only the largest budget counts.
    results = _synthetic_results(6, budgets)
    for user in range(6):
        methods(user, budgets[0])["lora_dpo"]["reward"]["mean"] += 10
    assert _met(benchmark, results)["gain_vs_lora_dpo"]

    # Gain vs CAA: 4 of 6 users.
    results = _synthetic_results(6, budgets)
    for user in range(2):
        methods(user, budgets[-1])["caa"]["reward"]["mean"] = (
            methods(user, budgets[-1])["latent_dpo"]["reward"]["mean"] + 0.01
        )
    assert _met(benchmark, results)["gain_vs_caa"]
    methods(2, budgets[-1])["caa"]["reward"]["mean"] = methods(2, budgets[-1])["latent_dpo"]["reward"]["mean"] + 0.01
    assert not _met(benchmark, results)["gain_vs_caa"]

    # Perplexity, artefact size, throughput.
    results = _synthetic_results(6, budgets)
    methods(4, budgets[1])["latent_dpo"]["perplexity"] = 1.2 * results["neutral"]["base"]["perplexity"]
    methods(5, budgets[2])["latent_dpo"]["artefact_bytes"] = methods(5, budgets[2])["lora_dpo"]["artefact_bytes"] // 50
    results["serving"]["ours_mixed_batch"]["tokens_per_second"] = (
        0.8 * results["serving"]["base_batch"]["tokens_per_second"]
    )
    met = _met(benchmark, results)
    assert not met["perplexity"] and not met["artefact"] and not met["throughput_vs_base"]
    assert met["throughput_vs_lora"] == (
        results["serving"]["ours_mixed_batch"]["tokens_per_second"]
        >= results["serving"]["lora_mixed_batch"]["tokens_per_second"]
    )
    # The oracle is in no target: a huge oracle reward changed none of the rows above.
    assert all("oracle" not in row["target"] for row in benchmark.targets(results))


def test_budgets_and_grids_are_parsed_and_checked(benchmark):
    args = benchmark.BenchmarkArguments(quick=True, budgets="2,5,9", lora_learning_rates="1e-5,2e-4")
    assert args.budget_list == [2, 5, 9] and args.lora_learning_rate_list == [1e-5, 2e-4]
    full = benchmark.BenchmarkArguments()
    assert full.budget_list == [16, 64, 256] and full.lora_learning_rate_list == [1e-5, 5e-5, 2e-4, 5e-4]
    assert len(full.users) == 6 and full.serving_users == 64
    for bad in ("16,x", "0,16", "64,16"):
        with pytest.raises(ValueError, match="budgets"):
            benchmark.BenchmarkArguments(quick=True, budgets=bad)
