"""The `hf-prefalign` console script: subcommands on tiny models, YAML configs, and one-line errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from helpers import make_tiny_pool, random_words
from hub_server import HubServer, hub_server_fixture  # noqa: F401  (provides the `hub_server` fixture)

from hf_prefalign import PrefAlignForCausalLM, PreferenceEmbedding, load_response_pool, save_response_pool
from hf_prefalign.cli.main import main
from hf_prefalign.testing import make_tiny_base, make_tiny_tokenizer


# Latent DPO flags that keep a CLI alignment run small and quiet.
QUICK_ALIGN = ["--num_train_epochs", "1", "--latent_cache_dir", "none", "--disable_tqdm", "true", "--use_cpu", "true"]


@pytest.fixture
def tiny_base_dir(tmp_path, monkeypatch):
    """A tiny Qwen2 base saved as a model path the CLI can load.

    transformers 5 rebuilds a tokenizer from the model type in `config.json` (a Qwen2 tokenizer pipeline around our
    word-level vocabulary tokenizes nothing), so the CLI's tokenizer loading is pointed at the tiny tokenizer.
    """
    path = tmp_path / "base"
    make_tiny_base("qwen2").save_pretrained(path)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: make_tiny_tokenizer())
    return path


@pytest.fixture
def tiny_backbone_dir(tiny_base_dir, tmp_path):
    model = PrefAlignForCausalLM.from_base(str(tiny_base_dir), latent_dim=8)
    with torch.no_grad():
        for parameter in model.latent_parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    path = tmp_path / "backbone"
    model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


def test_env_reports_versions_and_the_default_model(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "- transformers: " in out
    assert "- embedded default model: " in out


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("quickstart", "pool", "clap", "align", "generate", "push", "pull", "env"):
        assert command in out


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["frobnicate"])
    assert excinfo.value.code == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_pool_clap_align_generate_on_a_tiny_model(tiny_base_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    generator = torch.Generator().manual_seed(0)
    prompts.write_text("".join(json.dumps({"prompt": random_words(generator)}) + "\n" for _ in range(4)))
    assert (
        main(
            [
                "pool",
                "--model",
                str(tiny_base_dir),
                "--prompts",
                str(prompts),
                "--output_dir",
                str(tmp_path / "pool"),
                "--num_responses",
                "4",
                "--max_new_tokens",
                "12",
                "--batch_size",
                "2",
            ]
        )
        == 0
    )
    assert len(load_response_pool(tmp_path / "pool")) == 4

    config = tmp_path / "clap.yaml"
    config.write_text(
        f"output_dir: {tmp_path / 'clap'}\nmax_steps: 2\nlogging_steps: 1\n"
        "disable_tqdm: true\nuse_cpu: true\nsave_strategy: steps\nsave_steps: 1\n"
    )
    assert (
        main(
            [
                "clap",
                "--config",
                str(config),
                "--pool",
                str(tmp_path / "pool"),
                "--model",
                str(tiny_base_dir),
                "--contrastive_num_negatives",
                "1",
                "--posterior_refinement_steps",
                "1",
            ]
        )
        == 0
    )
    # The Trainer's checkpoints stay in --output_dir; the backbone folder holds the backbone and its tokenizer only.
    assert sorted(p.name for p in (tmp_path / "clap").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    backbone_files = {p.name for p in (tmp_path / "clap" / "backbone").iterdir()}
    assert {"model.safetensors", "config.json", "README.md", "tokenizer.json"} <= backbone_files
    assert not {"training_args.bin", "optimizer.pt", "trainer_state.json"} & backbone_files, backbone_files
    assert not [name for name in backbone_files if name.startswith("checkpoint-")]
    saved = json.loads((tmp_path / "clap" / "backbone" / "config.json").read_text())
    assert saved["posterior_refinement_steps"] == 1  # `align` below encodes with the refined posterior
    # No architecture flag: the config's defaults, the documented recipe.
    assert (saved["latent_dim"], saved["encoder_type"], saved["adapter_type"]) == (32, "hidden_states", "residual")

    assert (
        main(
            [
                "align",
                "--backbone",
                str(tmp_path / "clap" / "backbone"),
                "--scorer",
                "concise",
                "--pool",
                str(tmp_path / "pool"),
                "--output_dir",
                str(tmp_path / "alice"),
                *QUICK_ALIGN,
            ]
        )
        == 0
    )
    assert PreferenceEmbedding.from_pretrained(tmp_path / "alice").config.training["pairs"] > 0

    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--backbone",
                str(tmp_path / "clap" / "backbone"),
                "--prompt",
                "w5 w6",
                "--preference_id",
                "alice",
                "--preference",
                str(tmp_path / "alice"),
                "--max_new_tokens",
                "3",
            ]
        )
        == 0
    )
    assert "### w5 w6" in capsys.readouterr().out


# CLaP flags that keep a CLI training run to one quiet CPU step.
QUICK_CLAP = ["--max_steps", "1", "--disable_tqdm", "true", "--use_cpu", "true", "--save_strategy", "no"]


@pytest.fixture
def tiny_pool_dir(tmp_path):
    save_response_pool(make_tiny_pool(4, 4), tmp_path / "pool")
    return tmp_path / "pool"


def test_clap_sets_the_backbone_architecture(tiny_base_dir, tiny_pool_dir, tmp_path):
    architecture = {
        "latent_dim": 8,
        "encoder_type": "blocks",
        "num_encoder_layers": 1,
        "num_encoder_queries": 2,
        "adapter_type": "prefix",
        "num_prefix_slots": 2,
    }
    flags = [item for name, value in architecture.items() for item in (f"--{name}", str(value))]
    argv = ["clap", "--pool", str(tiny_pool_dir), "--model", str(tiny_base_dir), "--output_dir", str(tmp_path / "c")]
    assert main([*argv, *flags, "--contrastive_num_negatives", "1", *QUICK_CLAP]) == 0
    saved = json.loads((tmp_path / "c" / "backbone" / "config.json").read_text())
    assert {name: saved[name] for name in architecture} == architecture
    model = PrefAlignForCausalLM.from_pretrained(tmp_path / "c" / "backbone")
    assert model.latent_encoder.num_queries == 2 and model.config.adapter_type == "prefix"


def test_clap_architecture_flags_default_to_the_config():
    from dataclasses import fields

    from hf_prefalign import PrefAlignConfig
    from hf_prefalign.cli.commands.clap import _ARCHITECTURE_FIELDS, ClapArguments

    flags = {f.name: f for f in fields(ClapArguments) if f.name in _ARCHITECTURE_FIELDS}
    assert set(flags) == set(_ARCHITECTURE_FIELDS)
    for name, flag in flags.items():
        assert flag.default is None  # unset: the config decides
        default = getattr(PrefAlignConfig, name)
        if default is not None:  # the help quotes it
            assert f"PrefAlignConfig's {default!r}" in flag.metadata["help"], name


def test_clap_steering_layers_take_several_values(tiny_base_dir, tiny_pool_dir, tmp_path):
    argv = ["clap", "--pool", str(tiny_pool_dir), "--model", str(tiny_base_dir), "--output_dir", str(tmp_path / "c")]
    assert main([*argv, "--encoder_layer", "2", "--steering_layers", "1", "2", *QUICK_CLAP]) == 0
    saved = json.loads((tmp_path / "c" / "backbone" / "config.json").read_text())
    assert (saved["encoder_layer"], saved["steering_layers"]) == (2, [1, 2])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--latent_dim", "0"], "--latent_dim must be a positive integer, got 0."),
        (["--adapter_type", "lora"], "--adapter_type must be one of ('residual', 'prefix'), got 'lora'."),
        (["--encoder_type", "blocks", "--num_encoder_layers", "5"], "--num_encoder_layers=5 exceeds"),
        (["--steering_layers", "1", "3"], "--steering_layers must name decoder layers between 1 and 2"),
    ],
    ids=["not-positive", "unknown-choice", "deeper-than-the-base", "layer-out-of-range"],
)
def test_clap_architecture_mistakes_are_usage_errors(tiny_base_dir, tiny_pool_dir, tmp_path, capsys, flags, message):
    argv = ["clap", "--pool", str(tiny_pool_dir), "--model", str(tiny_base_dir), "--output_dir", str(tmp_path / "c")]
    assert main([*argv, *flags, *QUICK_CLAP]) == 2
    captured = capsys.readouterr().err
    err = captured.strip().splitlines()[-2:]  # after datasets' "Checking responses" bar, where the pool loaded
    assert err[0].startswith("hf-prefalign clap: error: ") and message in err[0], err
    assert err[1] == "hint: see `hf-prefalign clap --help`" and "Traceback" not in captured
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("flag", ["--dataset", "--dataset_name"])  # ours, and TRL's name
def test_align_from_a_preference_file(tiny_backbone_dir, tmp_path, flag):
    generator = torch.Generator().manual_seed(1)
    rows = [
        {"prompt": random_words(generator), "chosen": random_words(generator), "rejected": random_words(generator)}
        for _ in range(6)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert (
        main(
            [
                "align",
                "--backbone",
                str(tiny_backbone_dir),
                flag,
                str(data),
                "--output_dir",
                str(tmp_path / "bob"),
                *QUICK_ALIGN,
            ]
        )
        == 0
    )
    assert PreferenceEmbedding.from_pretrained(tmp_path / "bob").config.training["pairs"] == 6


def _user_rows(user: str, num: int, seed: int) -> list[dict[str, str]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {"prompt": random_words(generator), "chosen": random_words(generator), "rejected": random_words(generator)}
        | {"user_id": user}
        for _ in range(num)
    ]


def test_align_many_users_into_a_bank(tiny_backbone_dir, tmp_path, capsys):
    rows = _user_rows("alice", 5, 1) + _user_rows("bob", 3, 2) + [{**_user_rows("dave", 1, 3)[0], "rejected": "w5"}]
    rows[-1]["chosen"] = "w5"  # dave's only pair has chosen == rejected: skipped
    data = tmp_path / "users.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = [
        "align",
        "--backbone",
        str(tiny_backbone_dir),
        "--dataset",
        str(data),
        "--output_dir",
        str(tmp_path / "bank"),
    ]
    assert main([*argv, *QUICK_ALIGN, "--users_per_batch", "1"]) == 0
    assert "saved a bank of 2 users (1 skipped: no usable pair)" in capsys.readouterr().out
    index = json.loads((tmp_path / "bank" / "bank.json").read_text())
    assert index["preference_ids"] == ["alice", "bob"]
    assert PreferenceEmbedding.from_pretrained(tmp_path / "bank" / "bob").config.training["pairs"] == 3

    # A folder of <user_id>.jsonl files gives the same users (same pairs, same seeds)
    folder = tmp_path / "per-user"
    folder.mkdir()
    for user in ("alice", "bob"):
        lines = [
            json.dumps({k: v for k, v in row.items() if k != "user_id"}) for row in rows if row["user_id"] == user
        ]
        (folder / f"{user}.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "erin.jsonl").write_text("")  # a user without pairs
    argv = [
        "align",
        "--backbone",
        str(tiny_backbone_dir),
        "--dataset",
        str(folder),
        "--output_dir",
        str(tmp_path / "b2"),
    ]
    assert main([*argv, *QUICK_ALIGN]) == 0
    assert "saved a bank of 2 users (1 skipped" in capsys.readouterr().out
    for user in ("alice", "bob"):
        first = PreferenceEmbedding.from_pretrained(tmp_path / "bank" / user)
        second = PreferenceEmbedding.from_pretrained(tmp_path / "b2" / user)
        torch.testing.assert_close(first.bias, second.bias)


@pytest.mark.parametrize(
    ("name", "content", "extra", "code", "message"),
    [
        ("bad id!.jsonl", '{"prompt": "w5", "chosen": "w6", "rejected": "w7"}\n', [], 1, "the file name is the user id"),
        ("users.jsonl", '{"prompt": "w5", "chosen": "w6", "rejected": "w7", "user_id": "a/b"}\n', [], 1, "Row 0"),
        ("users.jsonl", '{"prompt": "w5", "chosen": "w6", "rejected": "w7", "user_id": "a"}\n',
         ["--resume_from_checkpoint", "true"], 2, "does not apply to many users"),
    ],
)  # fmt: skip
def test_many_user_mistakes_are_one_line_with_a_hint(
    tiny_backbone_dir, tmp_path, capsys, name, content, extra, code, message
):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / name).write_text(content)
    source = folder if name.startswith("bad") else folder / name
    (tmp_path / "out").mkdir()
    argv = [
        "align",
        "--backbone",
        str(tiny_backbone_dir),
        "--dataset",
        str(source),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    assert main([*argv, *QUICK_ALIGN, *extra]) == code
    err = capsys.readouterr().err.strip().splitlines()[-2:]  # after datasets' "Generating train split" bar
    assert message in err[0] and err[0].startswith("hf-prefalign align: error:") and err[1].startswith("hint:"), err


def test_many_users_refuse_an_output_folder_that_holds_something_else(tiny_backbone_dir, tmp_path, capsys):
    data = tmp_path / "users.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in _user_rows("alice", 2, 1)))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    argv = [
        "align",
        "--backbone",
        str(tiny_backbone_dir),
        "--dataset",
        str(data),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    assert main([*argv, *QUICK_ALIGN]) == 1
    assert "holds something other than a preference bank" in capsys.readouterr().err
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["align", "--backbone", "x", "--output_dir", "o"], 2, "give either --dataset"),
        (["align", "--backbone", "x", "--scorer", "positive", "--output_dir", "o"], 2, "--scorer needs --pool"),
        (["generate", "--backbone", "x"], 2, "give at least one --prompt"),
        (["push", "--repo_id", "me/x", "--path", "/nonexistent-folder"], 1, "holds no saved backbone"),
        (["align", "--backbone", "x", "--dataset", "/missing/pairs.jsonl", "--output_dir", "o"], 1, "No such file"),
    ],
)
def test_user_mistakes_are_one_line_with_a_hint(argv, code, message, capsys):
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert message in err[0]
    assert err[1].startswith("hint:")


def test_unknown_scorer_and_unknown_preference_id(tiny_backbone_dir, tmp_path, capsys):
    pool = make_tiny_pool(4, 4)
    save_response_pool(pool, tmp_path / "pool")
    assert (
        main(
            [
                "align",
                "--backbone",
                str(tiny_backbone_dir),
                "--scorer",
                "grumpy",
                "--pool",
                str(tmp_path / "pool"),
                "--output_dir",
                str(tmp_path / "u"),
            ]
        )
        == 1
    )
    assert "Unknown scorer 'grumpy'" in capsys.readouterr().err
    bank = tmp_path / "bank"
    model = PrefAlignForCausalLM.from_pretrained(tiny_backbone_dir)
    model.preferences.save(bank)
    assert (
        main(
            [
                "generate",
                "--backbone",
                str(tiny_backbone_dir),
                "--prompt",
                "w5",
                "--preference_id",
                "carol",
                "--preference",
                str(bank),
            ]
        )
        == 1
    )
    assert "Unknown preference id 'carol'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["pool", "clap", "align"])
@pytest.mark.parametrize("spelling", ["flag", "alias", "yaml-key", "yaml-alias"])
def test_trl_argument_names_are_aliases(tmp_path, command, spelling):
    from hf_prefalign import CLaPConfig, LatentDPOConfig, ResponsePoolConfig
    from hf_prefalign.cli.commands.align import AlignArguments
    from hf_prefalign.cli.commands.clap import ClapArguments
    from hf_prefalign.cli.commands.pool import PoolArguments
    from hf_prefalign.cli.common import _parse

    ours, trl = ("dataset", "dataset_name") if command == "align" else ("model", "model_name_or_path")
    key = trl if "alias" in spelling else ours
    argv = {"pool": [], "clap": ["--pool", "p"], "align": ["--backbone", "b"]}[command] + ["--output_dir", "o"]
    if spelling.startswith("yaml"):
        (tmp_path / "settings.yaml").write_text(f"{key}: the/source\n")
        argv += ["--config", str(tmp_path / "settings.yaml")]
    else:
        argv += [f"--{key}", "the/source"]
    dataclasses = {
        "pool": (PoolArguments, ResponsePoolConfig),
        "clap": (ClapArguments, CLaPConfig),
        "align": (AlignArguments, LatentDPOConfig),
    }[command]
    args, _ = _parse(command, dataclasses, argv)
    assert getattr(args, ours) == "the/source"


def _usage_error(capsys, command: str) -> str:
    """The one line a usage error prints (then the hint), never argparse's usage dump nor a traceback."""
    captured = capsys.readouterr().err
    err = captured.strip().splitlines()
    assert len(err) == 2 and err[1] == f"hint: see `hf-prefalign {command} --help`", captured
    assert err[0].startswith(f"hf-prefalign {command}: error: ") and "Traceback" not in captured, captured
    return err[0]


def test_a_yaml_file_that_sets_a_flag_and_its_alias_is_refused(tmp_path, capsys):
    config = tmp_path / "both.yaml"
    config.write_text("output_dir: x\nmodel: a/b\nmodel_name_or_path: c/d\n")
    assert main(["clap", "--config", str(config), "--pool", "p"]) == 2
    assert "sets one setting twice: model and model_name_or_path" in _usage_error(capsys, "clap")


def test_unknown_yaml_key_is_a_usage_error(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("output_dir: x\nlearning_rat: 0.1\nno_freeze_base: true\n")
    assert main(["align", "--config", str(config), "--backbone", "x"]) == 2
    # `no_freeze_base` is a flag, not a setting: as a key it would store the opposite of what it says
    assert f"unknown keys in {config}: learning_rat, no_freeze_base" in _usage_error(capsys, "align")


@pytest.mark.parametrize(
    ("content", "argv", "message"),
    [
        ("pool: p\nmax_steps: many\n", [], "invalid int value: 'many'"),
        ("- pool\n", [], "must contain a YAML mapping"),
        ("env: [A]\npool: p\n", [], "`env` field should be a dict"),
        ("output_dir: x\n", [], "the following arguments are required: --pool"),
        ("pool: p\n", ["--config", "other.yaml"], "--config is given more than once"),
        ("pool: p\n", ["--no_such_flag", "1"], "unrecognized arguments: ['--no_such_flag', '1']"),
    ],
    ids=["wrong-type", "not-a-mapping", "env-not-a-mapping", "missing-flag", "config-twice", "unknown-flag"],
)
def test_config_file_mistakes_are_one_line_usage_errors(tmp_path, capsys, content, argv, message):
    config = tmp_path / "settings.yaml"
    config.write_text(content)
    assert main(["clap", "--config", str(config), *argv]) == 2
    assert message in _usage_error(capsys, "clap")


def test_config_file_sets_defaults_flags_override_and_env_sets_variables(tmp_path, monkeypatch):
    from hf_prefalign import CLaPConfig
    from hf_prefalign.cli.commands.clap import ClapArguments
    from hf_prefalign.cli.common import _parse

    monkeypatch.setenv("HF_PREFALIGN_TEST_VARIABLE", "unset")  # restored after the test (the file's `env:` sets it)
    config = tmp_path / "settings.yaml"
    config.write_text(
        "env:\n  HF_PREFALIGN_TEST_VARIABLE: 7\npool: p\noutput_dir: o\nlearning_rate: 1.0e-3\nkl_weight: 0.25\n"
        "steering_layers: [1, 2]\n"
    )
    args, clap = _parse("clap", (ClapArguments, CLaPConfig), ["--config", str(config), "--kl_weight", "0.5"])
    assert (args.pool, args.steering_layers, clap.output_dir) == ("p", [1, 2], "o")
    assert (clap.learning_rate, clap.kl_weight) == (1e-3, 0.5)  # the flag overrides the file
    assert os.environ["HF_PREFALIGN_TEST_VARIABLE"] == "7"  # TRL's `env:` block


def test_quickstart_refuses_a_foreign_output_folder(tmp_path, capsys):
    (tmp_path / "something.txt").write_text("not ours")
    assert main(["quickstart", "--output_dir", str(tmp_path)]) == 1
    assert "pass --overwrite" in capsys.readouterr().err


def test_push_never_uploads_training_state(tiny_backbone_dir, hub_server: HubServer, capsys):
    (tiny_backbone_dir / "checkpoint-3").mkdir()
    (tiny_backbone_dir / "checkpoint-3" / "optimizer.pt").write_bytes(b"state")
    for name in ("optimizer.pt", "rng_state.pth", "training_args.bin", "trainer_state.json"):
        (tiny_backbone_dir / name).write_bytes(b"state")
    assert main(["push", "--repo_id", "owner/cli-backbone", "--path", str(tiny_backbone_dir), "--token", "hf_x"]) == 0
    assert "not uploading training state: checkpoint-3, optimizer.pt" in capsys.readouterr().out
    files = set(hub_server.files("owner/cli-backbone"))
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= files
    assert not [f for f in files if f.startswith("checkpoint-") or f.endswith((".pt", ".pth", ".bin"))], files
    assert "trainer_state.json" not in files


def test_help_and_version_import_neither_the_package_nor_torch():
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    probe = (
        "import sys, _hf_prefalign_cli as cli\n"
        "for argv in (['--help'], ['--version']):\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in ('hf_prefalign', 'torch', 'transformers') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, check=True, timeout=60
    ).stdout
    seconds = time.perf_counter() - start
    assert "HEAVY []" in out, out
    assert "hf-prefalign " in out and "usage: hf-prefalign" in out
    assert seconds < 5, f"{seconds:.1f}s"  # < 0.5 s on an idle machine; loose for loaded CI


def test_version_flag(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("hf-prefalign ")


def test_push_and_pull_have_their_own_help(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_PREFALIGN_CACHE", str(tmp_path))
    pages = {}
    for command in ("push", "pull"):
        assert main([command, "--help"]) == 0
        pages[command] = capsys.readouterr().out
    assert "--private" in pages["push"] and "--private" not in pages["pull"]
    assert "--subfolder" in pages["pull"] and "--subfolder" not in pages["push"]


def test_generate_sampling_flags(tiny_backbone_dir, capsys):
    argv = ["generate", "--backbone", str(tiny_backbone_dir), "--prompt", "w5 w6", "--max_new_tokens", "4"]
    sampled = [*argv, "--do_sample", "--temperature", "1.5", "--top_p", "0.9", "--num_return_sequences", "3"]
    assert main([*sampled, "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert "### w5 w6 (1/3)" in first and "### w5 w6 (3/3)" in first
    assert main([*sampled, "--seed", "3"]) == 0
    assert capsys.readouterr().out == first  # --seed makes sampling repeatable
    assert main([*argv, "--temperature", "0.7"]) == 2
    assert "add --do_sample" in capsys.readouterr().err


def test_the_yaml_example_of_the_cli_page_parses(tmp_path, monkeypatch):
    from pathlib import Path

    from hf_prefalign import CLaPConfig
    from hf_prefalign.cli.commands.clap import ClapArguments
    from hf_prefalign.cli.common import _parse

    page = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text(encoding="utf-8")
    example = page.split("```yaml\n", 1)[1].split("```", 1)[0]
    command = example.splitlines()[0].split(": ", 1)[1].split(" (", 1)[0].split()  # the command it names
    (tmp_path / "clap.yaml").write_text(example)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # restored after the test (the file's `env:` sets it)
    assert command[:2] == ["hf-prefalign", "clap"]
    args, clap = _parse("clap", (ClapArguments, CLaPConfig), command[2:])
    assert (args.model, args.steering_layers, clap.learning_rate) == ("Qwen/Qwen2.5-0.5B-Instruct", [8, 12], 1e-3)
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_the_commands_of_the_own_model_page_parse():
    import shlex
    from pathlib import Path

    from hf_prefalign import CLaPConfig, LatentDPOConfig, ResponsePoolConfig
    from hf_prefalign.cli.commands.align import AlignArguments
    from hf_prefalign.cli.commands.clap import ClapArguments
    from hf_prefalign.cli.commands.generate import GenerateArguments
    from hf_prefalign.cli.commands.hub import PushArguments
    from hf_prefalign.cli.commands.pool import PoolArguments
    from hf_prefalign.cli.common import UsageError, _parse

    dataclasses = {
        "pool": (PoolArguments, ResponsePoolConfig),
        "clap": (ClapArguments, CLaPConfig),
        "align": (AlignArguments, LatentDPOConfig),
        "generate": (GenerateArguments,),
        "push": (PushArguments,),
    }
    page = (Path(__file__).resolve().parent.parent / "docs" / "own_model.md").read_text(encoding="utf-8")
    block = page.split("## The same from the command line", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()]
    parsed = set()
    for command in commands:
        assert command[0] == "hf-prefalign", command
        argv = command[2:]
        if "--bf16" in argv and not torch.cuda.is_available():  # TrainingArguments refuses bf16 without a GPU
            with pytest.raises(UsageError, match="doesn't support bf16/gpu"):
                _parse(command[1], dataclasses[command[1]], argv)
            index = argv.index("--bf16")
            argv = argv[:index] + argv[index + 2 :]
        _parse(command[1], dataclasses[command[1]], argv)  # every flag exists and takes its value
        parsed.add(command[1])
    assert parsed == set(dataclasses)


def test_align_many_users_in_shards_into_one_sharded_bank(tiny_backbone_dir, tmp_path, capsys):
    rows = [row for i, user in enumerate(["alice", "bob", "carol", "dave"]) for row in _user_rows(user, 3, 10 + i)]
    data = tmp_path / "users.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["align", "--backbone", str(tiny_backbone_dir), "--dataset", str(data), "--output_dir", str(tmp_path / "b")]
    for shard in ("0", "1", "0"):  # the rerun of shard 0 finds its users there and aligns nothing
        assert main([*argv, *QUICK_ALIGN, "--num_shards", "2", "--shard_index", shard]) == 0
    out = capsys.readouterr().out
    assert out.count("into the sharded bank at") == 3 and "aligned 0 users" in out
    index = json.loads((tmp_path / "b" / "bank.json").read_text())
    assert index["layout"] == "sharded"
    assert sorted(pid for shard in index["shards"] for pid in shard["ids"]) == ["alice", "bob", "carol", "dave"]
    assert main([*argv, *QUICK_ALIGN, "--num_shards", "2", "--shard_index", "2"]) != 0
    assert "shard_index" in capsys.readouterr().err


# ----------------------------------------------------------------------
# Device and precision flags (--dtype as TRL's ModelConfig, --use_cpu as TrainingArguments)
# ----------------------------------------------------------------------
def _stop_at_loading(monkeypatch, seen: dict):
    """Replace the CLI's model loaders by ones that record the dtype they were asked for, then stop the command."""
    import hf_prefalign.cli.common as cli

    def record(reference, dtype="float32", device=None):
        seen["dtype"] = dtype
        raise RuntimeError("stopped at loading")

    monkeypatch.setattr(cli, "_load_base", record)
    monkeypatch.setattr(cli, "_load_backbone", record)


@pytest.mark.parametrize("command", ["pool", "clap", "align", "generate"])
def test_every_model_command_takes_dtype(tmp_path, monkeypatch, capsys, command):
    examples = tmp_path / "liked.jsonl"
    examples.write_text(json.dumps({"prompt": "w5", "response": "w6 w7"}) + "\n")
    pool_dir = tmp_path / "pool"
    save_response_pool(make_tiny_pool(num_prompts=2, num_responses=2), pool_dir)
    argv = {
        "pool": ["--output_dir", str(tmp_path / "out"), "--prompts", str(examples)],
        "clap": ["--output_dir", str(tmp_path / "out"), "--pool", str(pool_dir)],
        "align": ["--output_dir", str(tmp_path / "out"), "--backbone", "b", "--from_examples", str(examples)],
        "generate": ["--backbone", "b", "--prompt", "w5"],
    }[command]
    seen = {}
    _stop_at_loading(monkeypatch, seen)
    assert main([command, *argv]) == 1
    assert seen == {"dtype": "float32"}  # TRL's default
    assert main([command, *argv, "--dtype", "bfloat16"]) == 1
    assert seen == {"dtype": "bfloat16"}
    assert "stopped at loading" in capsys.readouterr().err
    assert main([command, *argv, "--dtype", "float8"]) == 2
    assert "argument --dtype: invalid choice: 'float8'" in _usage_error(capsys, command)
    (tmp_path / "settings.yaml").write_text("dtype: half\n")  # argparse checks choices on the command line only
    assert main([command, *argv, "--config", str(tmp_path / "settings.yaml")]) == 2
    assert "--dtype must be one of auto, bfloat16, float16, float32, got 'half'" in _usage_error(capsys, command)


def test_loaders_honour_dtype(tiny_base_dir, tiny_backbone_dir):
    from hf_prefalign.cli.common import _load_backbone, _load_base

    base, _ = _load_base(str(tiny_base_dir), "float16")
    assert base.dtype == torch.float16
    backbone, _ = _load_backbone(str(tiny_backbone_dir), "float16")
    assert backbone.base_model.dtype == torch.float16
    assert {p.dtype for p in backbone.latent_parameters()} == {torch.float32}  # log-densities stay in fp32


def test_bf16_is_kept_where_the_model_runs_natively(tiny_base_dir, monkeypatch):
    import hf_prefalign.utils.precision as precision
    from hf_prefalign import load_base_model
    from hf_prefalign.cli.common import _load_base

    # A GPU with bf16 beside a CPU without: bf16 is resolved for the device the model goes to, not for the CPU.
    monkeypatch.setattr(precision, "bf16_supported", lambda device="cpu": torch.device(device).type == "cuda")
    assert _load_base(str(tiny_base_dir), "bfloat16")[0].dtype == torch.float32  # emulated on this CPU: fp32
    base = load_base_model(str(tiny_base_dir), dtype="bfloat16", device="cuda")
    assert (base.dtype, base.device.type) == (torch.bfloat16, "cpu")  # loaded for the GPU, moved there by the caller


def test_device_is_the_accelerator_unless_use_cpu(monkeypatch):
    from hf_prefalign.cli.common import _device

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda"))
    assert _device(use_cpu=False) == torch.device("cuda")
    assert _device(use_cpu=True) == torch.device("cpu")
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert _device(use_cpu=False) == torch.device("cpu")


@pytest.mark.parametrize("use_cpu", [False, True])
def test_pool_and_generate_run_where_use_cpu_says(tiny_base_dir, tiny_backbone_dir, tmp_path, monkeypatch, use_cpu):
    import hf_prefalign
    import hf_prefalign.cli.common as cli

    asked, placed = [], []

    def device(use_cpu: bool) -> torch.device:
        asked.append(use_cpu)
        return torch.device("cpu")

    def build(model, tokenizer, prompts, config):
        placed.append((model.device, model.dtype))
        return make_tiny_pool(num_prompts=1, num_responses=2)

    monkeypatch.setattr(cli, "_device", device)
    monkeypatch.setattr(hf_prefalign, "build_response_pool", build)
    flag = ["--use_cpu", "true"] if use_cpu else []
    pool = ["pool", "--model", str(tiny_base_dir), "--output_dir", str(tmp_path / "pool"), "--num_prompts", "1"]
    assert main([*pool, "--dtype", "float16", *flag]) == 0
    assert placed == [(torch.device("cpu"), torch.float16)]
    generate = ["generate", "--backbone", str(tiny_backbone_dir), "--prompt", "w5 w6", "--max_new_tokens", "2"]
    assert main([*generate, *flag]) == 0
    assert asked == [use_cpu, use_cpu]


def test_pool_pads_with_eos_when_the_tokenizer_has_no_pad_token(tmp_path, monkeypatch, caplog):
    path = tmp_path / "base"
    make_tiny_base("qwen2").save_pretrained(path)
    tokenizer = make_tiny_tokenizer()
    tokenizer.pad_token = None
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: tokenizer)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in ("w5 w6", "w7 w8 w9 w10")))
    argv = ["pool", "--model", str(path), "--prompts", str(prompts), "--output_dir", str(tmp_path / "pool")]
    with caplog.at_level("WARNING", logger="hf_prefalign.cli.common"):
        assert main([*argv, "--num_responses", "2", "--max_new_tokens", "3", "--use_cpu", "true"]) == 0
    assert "no pad token: padding with its EOS token '<eos>'" in caplog.text
    assert tokenizer.pad_token == "<eos>"
    assert len(load_response_pool(tmp_path / "pool")) == 2


# ----------------------------------------------------------------------
# Subcommand help pages: cached after the first, then drawn without importing torch
# ----------------------------------------------------------------------
@pytest.mark.parametrize("columns", ["80", "200"])
def test_cached_help_pages_are_the_live_ones(monkeypatch, columns):
    import _hf_prefalign_cli as cli
    from hf_prefalign.cli.main import make_command_parser

    monkeypatch.setenv("COLUMNS", columns)  # argparse wraps to the terminal's width, when drawing either page
    for command in cli.COMMANDS:
        parser = make_command_parser(command)
        spec = json.loads(json.dumps(cli.parser_spec(parser)))  # through the cache file's format
        assert cli.parser_from_spec(spec).format_help() == parser.format_help(), command


def test_subcommand_help_is_fast_once_cached(tmp_path, monkeypatch, capsys):
    import subprocess
    import sys
    import time
    from pathlib import Path

    import _hf_prefalign_cli as cli

    monkeypatch.setenv("HF_PREFALIGN_CACHE", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["align", "--help"]) == 0  # the live page, which caches every command's
    live = capsys.readouterr().out
    assert "--dtype" in live and "--learning_rate" in live
    assert cli.help_cache_path().is_file()
    probe = (
        "import sys, _hf_prefalign_cli as cli\n"
        "for command in ('align', 'push'):\n"
        "    assert cli.main([command, '--help']) == 0\n"
        "heavy = sorted(m for m in ('hf_prefalign', 'torch', 'transformers') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    start = time.perf_counter()
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, check=True, timeout=60
    ).stdout
    seconds = time.perf_counter() - start
    assert out.startswith(live) and "usage: hf-prefalign push" in out
    assert "HEAVY []" in out, out
    assert seconds < 5, f"{seconds:.1f}s"  # ~0.2 s on an idle machine; loose for loaded CI


def test_an_unreadable_help_cache_is_rebuilt(tmp_path, monkeypatch, capsys):
    import _hf_prefalign_cli as cli

    monkeypatch.setenv("HF_PREFALIGN_CACHE", str(tmp_path))
    path = cli.help_cache_path()
    path.write_text("{not json")
    (tmp_path / "cli_help-0123.json").write_text("{}")  # an older installation's
    assert main(["generate", "--help"]) == 0
    assert "--use_cpu" in capsys.readouterr().out
    assert json.loads(path.read_text())["generate"]["prog"] == "hf-prefalign generate"  # rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
