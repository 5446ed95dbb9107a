"""Fault suite: kill -9 at random moments of every artefact's save, processes and threads side by side, hostile paths.

Each artefact is saved in a loop, alternately as version A and version B, by a forked child that the test kills with
SIGKILL after a random delay; then a reader must find exactly A or B (never a mix, never an error), and the next
write must leave no temporary file behind. `PREFALIGN_FAULT_TRIALS` sets the kills per artefact (default 12);
`PREFALIGN_FAULT_REPORT=file.json` writes the outcome counts (docs/reliability.md reports them).
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import run_in_forked_child
from safetensors.torch import save_file
from tqdm.std import tqdm as std_tqdm

from hf_prefalign import PrefAlignForCausalLM, PreferenceEmbedding
from hf_prefalign.cli.main import main as cli_main
from hf_prefalign.data.latent_cache import LatentCache
from hf_prefalign.data.pools import load_response_pool, save_response_pool
from hf_prefalign.preference import PreferenceEmbeddingConfig
from hf_prefalign.preference.bank import PreferenceBank
from hf_prefalign.testing import make_tiny_base, make_tiny_tokenizer
from hf_prefalign.trainer.checkpoints import last_complete_checkpoint, resolve_resume
from hf_prefalign.utils.paths import validate_preference_id, validate_relative_path
from hf_prefalign.utils.serialization import INTERNAL_PREFIX, IntegrityError, read_tensors


pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the fault suite forks")

TRIALS = int(os.environ.get("PREFALIGN_FAULT_TRIALS", "12"))
OUTCOMES: dict[str, Counter] = {}


@pytest.fixture(scope="module", autouse=True)
def _report():
    # tqdm's default lock is a multiprocessing semaphore shared across fork: a child killed while holding it would
    # deadlock this process (a test artefact; separate processes never share it). Every tqdm class that already holds
    # its own lock (datasets' and huggingface_hub's subclasses get one on their first bar) gets a per-process lock.
    classes = [std_tqdm, *_subclasses(std_tqdm)]
    previous = {cls: cls.__dict__["_lock"] for cls in classes if "_lock" in cls.__dict__}
    for cls in {std_tqdm, *previous}:
        cls._lock = threading.RLock()
    yield
    for cls in classes:
        if "_lock" in cls.__dict__:
            del cls._lock
    for cls, lock in previous.items():
        cls._lock = lock
    target = os.environ.get("PREFALIGN_FAULT_REPORT")
    if target:
        Path(target).write_text(json.dumps({k: dict(v) for k, v in OUTCOMES.items()}, indent=2, sort_keys=True))


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


def _leftovers(folder: Path) -> list[str]:
    """Our temporary entries beside `folder` and inside it (recursively)."""
    found = [p.name for p in folder.parent.iterdir() if p.name.startswith(INTERNAL_PREFIX)]
    if folder.is_dir():
        found += [str(p.relative_to(folder)) for p in folder.rglob(f"{INTERNAL_PREFIX}*")]
    return found


def _kill_trials(name: str, target: Path, save, check, seconds_per_save: float) -> Counter:
    """`save(version)` in a killed loop, `check(target)` -> 'A' or 'B' after each kill."""
    outcomes: Counter = Counter()
    rng = random.Random(f"{name}-15")
    for _ in range(TRIALS):

        def loop() -> None:
            version = 0
            while True:
                save("AB"[version % 2])
                version += 1

        pid = run_in_forked_child(loop)
        time.sleep(rng.uniform(0, 3 * seconds_per_save))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        beside = [p.name.rsplit(".", 1)[-1] for p in target.parent.iterdir() if p.name.startswith(INTERNAL_PREFIX)]
        outcomes["killed inside a save (its lock file left)"] += int("lock" in beside)
        outcomes["killed with a half-written .tmp"] += int("tmp" in beside)
        outcomes["killed with a complete .new not swapped in"] += int("new" in beside and target.exists())
        outcomes["killed between the two renames (target absent)"] += int(not target.exists())
        outcomes[f"read {check(target)}"] += 1
    save("A")  # the next write cleans every leftover
    assert _leftovers(target) == []
    outcomes["leftovers after the next write"] += len(_leftovers(target))
    assert outcomes["read A"] + outcomes["read B"] == TRIALS, outcomes
    OUTCOMES[name] = outcomes
    return outcomes


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------
# kill -9 during saves
# ----------------------------------------------------------------------
def test_backbone_overwrite_is_atomic_under_kill(tmp_path):
    """Frozen-base backbone (A) overwritten by a save_base=True one (B), a tokenizer and a checkpoint beside it."""
    model_a = PrefAlignForCausalLM.from_base(make_tiny_base("gpt2"), latent_dim=8)
    model_b = PrefAlignForCausalLM.from_base(make_tiny_base("gpt2", seed=1), latent_dim=8)
    with torch.no_grad():
        for p in model_b.latent_parameters():
            p.add_(1.0)
    latents = {"A": model_a.latent_state_dict(), "B": model_b.latent_state_dict()}
    target = tmp_path / "backbone"

    def save(version: str) -> None:
        model = model_a if version == "A" else model_b
        model.save_pretrained(target, save_base=version == "B")

    seconds = _timed(lambda: save("B"))
    (target / "tokenizer.json").write_text("{}")  # files the backbone does not own must survive every swap
    (target / "checkpoint-1").mkdir()
    (target / "checkpoint-1" / "trainer_state.json").write_text("{}")

    def check(folder: Path) -> str:
        base = make_tiny_base("gpt2")
        loaded = PrefAlignForCausalLM.from_pretrained(folder, base_model=base)  # the unchanged loader
        config = json.loads((folder / "config.json").read_text())
        version = "A" if _tensors_equal(loaded.latent_state_dict(), latents["A"]) else "B"
        assert _tensors_equal(loaded.latent_state_dict(), latents[version]), "weights of neither version"
        assert config["base_included"] == (version == "B") == (folder / "base_model").is_dir(), "mixed backbone"
        assert (folder / "tokenizer.json").is_file() and (folder / "checkpoint-1" / "trainer_state.json").is_file()
        return version

    _kill_trials("backbone (frozen base A / save_base=True B)", target, save, check, seconds)


def _embedding(fingerprint: str, value: float) -> PreferenceEmbedding:
    embedding = PreferenceEmbedding(
        PreferenceEmbeddingConfig(latent_dim=4, feature_dim=6, backbone_fingerprint=fingerprint)
    )
    with torch.no_grad():
        embedding.bias.fill_(value)
    return embedding


def test_preference_embedding_overwrite_is_atomic_under_kill(tmp_path):
    versions = {"A": _embedding("fingerprint-a", 0.0), "B": _embedding("fingerprint-b", 1.0)}
    target = tmp_path / "alice"
    seconds = _timed(lambda: versions["B"].save_pretrained(target))

    def check(folder: Path) -> str:
        loaded = PreferenceEmbedding.from_pretrained(folder)
        version = "A" if loaded.config.backbone_fingerprint == "fingerprint-a" else "B"
        assert torch.equal(loaded.bias, versions[version].bias), "new weights with the old fingerprint"
        return version

    _kill_trials("preference embedding", target, lambda v: versions[v].save_pretrained(target), check, seconds)


def test_bank_save_is_atomic_under_kill(tmp_path):
    banks = {}
    for version, value in (("A", 0.0), ("B", 1.0)):
        bank = PreferenceBank("fp", latent_dim=4, feature_dim=6)
        for user in ("u1", "u2", "u3"):
            bank.add(user, _embedding("fp", value))
        banks[version] = bank
    target = tmp_path / "bank"
    seconds = _timed(lambda: banks["B"].save(target))

    def check(folder: Path) -> str:
        bank = PreferenceBank("fp", latent_dim=4, feature_dim=6)
        assert bank.load(folder) == ["u1", "u2", "u3"]
        values = {float(bank.get(user).bias[0].detach()) for user in bank.ids()}
        assert len(values) == 1, f"users from two saves: {values}"
        return "A" if values == {0.0} else "B"

    _kill_trials("preference bank", target, lambda v: banks[v].save(target), check, seconds)


@pytest.fixture(scope="module")
def tiny_backbone():
    return PrefAlignForCausalLM.from_base(make_tiny_base("gpt2"), latent_dim=8).eval(), make_tiny_tokenizer()


def _fill(cache: LatentCache, keys: range) -> None:
    for i in keys:
        cache._prompts[f"p{i}"] = torch.full((32,), float(i))
        cache._responses[f"r{i}"] = torch.full((2, 8), float(i))


def _check_cache(cache: LatentCache) -> set[int]:
    for key, value in [*cache._prompts.items(), *cache._responses.items()]:
        assert torch.all(value == float(key[1:])), f"entry {key} holds another entry's value"
    assert {k[1:] for k in cache._prompts} == {k[1:] for k in cache._responses}
    return {int(k[1:]) for k in cache._prompts}


def test_latent_cache_write_is_atomic_under_kill(tmp_path, tiny_backbone):
    model, tokenizer = tiny_backbone
    cache = LatentCache(model, tokenizer, cache_dir=tmp_path)
    target = cache.directory

    def save(version: str) -> None:
        _fill(cache, range(10) if version == "A" else range(10, 40))
        cache.save()

    seconds = _timed(lambda: save("A"))

    def check(folder: Path) -> str:
        keys = _check_cache(LatentCache(model, tokenizer, cache_dir=tmp_path))  # reopening never fails
        assert set(range(10)) <= keys, "a saved entry was lost"
        return "A" if keys == set(range(10)) else "B"

    _kill_trials("latent cache", target, save, check, seconds)


def test_pool_save_is_atomic_under_kill(tmp_path):
    pools = {
        "A": Dataset.from_dict({"prompt": ["a"] * 3, "responses": [["x", "y"]] * 3}),
        "B": Dataset.from_dict({"prompt": ["b"] * 50, "responses": [["z"] * 4] * 50}),
    }
    target = tmp_path / "pool"
    seconds = _timed(lambda: save_response_pool(pools["B"], target))

    def check(folder: Path) -> str:
        pool = load_response_pool(folder)
        version = "A" if pool["prompt"][0] == "a" else "B"
        assert pool.to_dict() == pools[version].to_dict(), "a mixed pool"
        return version

    _kill_trials("response pool", target, lambda v: save_response_pool(pools[v], target), check, seconds)


def _kill_at_every_rename(name: str, target: Path, save, check) -> Counter:
    """Systematic crash points: the child dies (SIGKILL) just before its k-th rename / replace, for every k."""
    save("A")
    real_rename, real_replace = os.rename, os.replace
    calls = []

    def counting(real):
        def wrapper(*args, **kwargs):
            calls.append(args[1])
            return real(*args, **kwargs)

        return wrapper

    os.rename, os.replace = counting(real_rename), counting(real_replace)
    try:
        save("B")
    finally:
        os.rename, os.replace = real_rename, real_replace
    save("A")
    outcomes: Counter = Counter()
    for k in range(len(calls)):

        def work(k: int = k) -> None:
            count = [0]

            def dying(real):
                def wrapper(*args, **kwargs):
                    if count[0] == k:
                        os.kill(os.getpid(), signal.SIGKILL)
                    count[0] += 1
                    return real(*args, **kwargs)

                return wrapper

            os.rename, os.replace = dying(real_rename), dying(real_replace)
            save("B")

        pid = run_in_forked_child(work)
        os.waitpid(pid, 0)
        outcomes["killed between the two renames (target absent)"] += int(not target.exists())
        outcomes[f"read {check(target)}"] += 1
        save("A")
        assert _leftovers(target) == []
    assert outcomes["read A"] + outcomes["read B"] == len(calls)
    assert outcomes["killed between the two renames (target absent)"] >= 1
    OUTCOMES[f"{name}: a kill before each of its {len(calls)} renames"] = outcomes
    return outcomes


def test_embedding_survives_a_kill_before_each_rename(tmp_path):
    versions = {"A": _embedding("fingerprint-a", 0.0), "B": _embedding("fingerprint-b", 1.0)}
    target = tmp_path / "alice"

    def check(folder: Path) -> str:
        loaded = PreferenceEmbedding.from_pretrained(folder)
        version = "A" if loaded.config.backbone_fingerprint == "fingerprint-a" else "B"
        assert torch.equal(loaded.bias, versions[version].bias)
        return version

    _kill_at_every_rename("preference embedding", target, lambda v: versions[v].save_pretrained(target), check)


def test_backbone_survives_a_kill_before_each_rename(tmp_path):
    model_a = PrefAlignForCausalLM.from_base(make_tiny_base("gpt2"), latent_dim=8)
    model_b = PrefAlignForCausalLM.from_base(make_tiny_base("gpt2", seed=1), latent_dim=8)
    with torch.no_grad():
        for p in model_b.latent_parameters():
            p.add_(1.0)
    latents = {"A": model_a.latent_state_dict(), "B": model_b.latent_state_dict()}
    target = tmp_path / "backbone"
    target.mkdir()
    (target / "tokenizer.json").write_text("{}")

    def save(version: str) -> None:
        (model_a if version == "A" else model_b).save_pretrained(target, save_base=version == "B")

    def check(folder: Path) -> str:
        # The unchanged loader: a missing folder goes through `pull_folder`, which finishes the swap.
        loaded = PrefAlignForCausalLM.from_pretrained(folder, base_model=make_tiny_base("gpt2"))
        version = "A" if _tensors_equal(loaded.latent_state_dict(), latents["A"]) else "B"
        assert _tensors_equal(loaded.latent_state_dict(), latents[version])
        assert json.loads((folder / "config.json").read_text())["base_included"] == (version == "B")
        assert (folder / "base_model").is_dir() == (version == "B") and (folder / "tokenizer.json").is_file()
        return version

    _kill_at_every_rename("backbone", target, save, check)


def test_bank_survives_a_kill_before_each_rename(tmp_path):
    banks = {}
    for version, value in (("A", 0.0), ("B", 1.0)):
        banks[version] = PreferenceBank("fp", latent_dim=4, feature_dim=6)
        for user in ("u1", "u2"):
            banks[version].add(user, _embedding("fp", value))
    target = tmp_path / "bank"

    def check(folder: Path) -> str:
        bank = PreferenceBank("fp", latent_dim=4, feature_dim=6)
        assert bank.load(folder) == ["u1", "u2"]
        values = {float(bank.get(user).bias[0].detach()) for user in bank.ids()}
        assert len(values) == 1
        return "A" if values == {0.0} else "B"

    _kill_at_every_rename("preference bank", target, lambda v: banks[v].save(target), check)


# ----------------------------------------------------------------------
# Processes and threads side by side
# ----------------------------------------------------------------------
def test_two_processes_saving_one_bank_lose_no_user_and_readers_never_fail(tmp_path):
    target = tmp_path / "bank"
    PreferenceBank("fp", 4, 6).save(target)

    def writer(prefix: str):
        def work() -> None:
            bank = PreferenceBank("fp", latent_dim=4, feature_dim=6)
            for i in range(4):
                bank.add(f"{prefix}{i}", _embedding("fp", float(i)))
                bank.save(target)

        return work

    running = {run_in_forked_child(writer("a")), run_in_forked_child(writer("b"))}
    loads, errors, codes = 0, [], []
    while running:
        for pid in list(running):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                running.discard(pid)
                codes.append(status)
        try:
            reader = PreferenceBank("fp", 4, 6)
            for user in reader.load(target):
                reader.get(user)
            loads += 1
        except Exception as err:  # noqa: BLE001 - any failure of a concurrent reader is the bug
            errors.append(repr(err))
    assert codes == [0, 0]
    bank = PreferenceBank("fp", 4, 6)
    assert bank.load(target) == sorted([f"a{i}" for i in range(4)] + [f"b{i}" for i in range(4)])
    assert errors == [], errors[:3]
    OUTCOMES["two bank writers + a reader"] = Counter(
        {"users kept (of 8)": len(bank), "concurrent loads": loads, "reader errors": len(errors)}
    )


def test_two_processes_writing_one_latent_cache_lose_no_entry(tmp_path, tiny_backbone):
    model, tokenizer = tiny_backbone

    def writer(offset: int):
        def work() -> None:
            cache = LatentCache(model, tokenizer, cache_dir=tmp_path)
            for start in range(offset, offset + 40, 10):
                _fill(cache, range(start, start + 10))
                cache.save()

        return work

    pids = [run_in_forked_child(writer(0)), run_in_forked_child(writer(40))]
    codes = [os.waitpid(pid, 0)[1] for pid in pids]
    assert codes == [0, 0]
    keys = _check_cache(LatentCache(model, tokenizer, cache_dir=tmp_path))
    assert keys == set(range(80))
    OUTCOMES["two latent-cache writers"] = Counter({"entries kept (of 80)": len(keys)})


def test_disable_latent_holds_for_its_thread_only(tiny_backbone):
    model, _ = tiny_backbone
    inside, release, seen = threading.Event(), threading.Event(), {}

    def pool_sampler() -> None:
        with model.disable_latent():
            seen["sampler"] = model._latent_enabled
            inside.set()
            release.wait(5)

    thread = threading.Thread(target=pool_sampler)
    thread.start()
    inside.wait(5)
    seen["other thread"] = model._latent_enabled
    ids = torch.tensor([[1, 5, 6, 7]])
    with_z = model(input_ids=ids, latents=torch.ones(1, 8)).logits
    release.set()
    thread.join()
    assert seen == {"sampler": False, "other thread": True}
    assert not torch.allclose(with_z, model.get_base_model()(input_ids=ids).logits), "the prefix was dropped"
    with model.disable_latent():
        assert not model._latent_enabled
    assert model._latent_enabled


def test_latent_cache_keys_do_not_collide():
    assert LatentCache._key("response", "a\x00b", "c") != LatentCache._key("response", "a", "b\x00c")
    assert LatentCache._key("prompt", "x") != LatentCache._key("response", "x")


# ----------------------------------------------------------------------
# Integrity
# ----------------------------------------------------------------------
def test_flipped_payload_bytes_and_nan_weights_are_refused(tmp_path):
    _embedding("fp", 0.5).save_pretrained(tmp_path / "user")
    weights = tmp_path / "user" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model.safetensors"):
        PreferenceEmbedding.from_pretrained(tmp_path / "user")

    nan = {name: torch.full_like(p, float("nan")) for name, p in _embedding("fp", 0.0).named_parameters()}
    save_file(nan, str(tmp_path / "nan.safetensors"))
    with pytest.raises(IntegrityError, match="non-finite.*nan.safetensors|nan.safetensors.*non-finite"):
        read_tensors(tmp_path / "nan.safetensors")


def test_legacy_artefacts_without_checksums_still_load(tmp_path):
    """An embedding saved before checksums existed (plain safetensors, no `weights_sha256`) loads as before."""
    embedding = _embedding("fp", 0.25)
    folder = tmp_path / "legacy"
    folder.mkdir()
    save_file({n: p.detach().clone() for n, p in embedding.named_parameters()}, str(folder / "model.safetensors"))
    from dataclasses import asdict

    (folder / "config.json").write_text(json.dumps(asdict(embedding.config)))
    assert torch.equal(PreferenceEmbedding.from_pretrained(folder).bias, embedding.bias)


# ----------------------------------------------------------------------
# Paths and ids
# ----------------------------------------------------------------------
@pytest.mark.parametrize("subfolder", ["/etc", "../../..", "a/../../b", "a\\..\\b", "a\nb", "", "C:/x", "./a"])
def test_hostile_subfolders_are_refused_before_any_read(tmp_path, subfolder):
    _embedding("fp", 0.0).save_pretrained(tmp_path / "bank" / "alice")
    with pytest.raises(ValueError, match="subfolder"):
        PreferenceEmbedding.from_pretrained(tmp_path / "bank", subfolder=subfolder)
    with pytest.raises(ValueError):
        validate_relative_path(subfolder)


def test_good_subfolders_and_ids():
    assert validate_relative_path("users/alice/") == "users/alice"
    assert validate_preference_id("alice.v2") == "alice.v2"
    for bad in ("alice\n", "../x", "a/b", "", ".", "-x", "a" * 129):
        with pytest.raises(ValueError, match="Invalid preference id"):
            validate_preference_id(bad)


def test_cli_pull_refuses_an_escaping_subfolder_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "OUT"
    code = cli_main(["pull", "--repo_id", "owner/bank", "--subfolder", "../../../..", "--path", str(out)])
    assert code == 1 and not out.exists()
    err = capsys.readouterr().err
    assert "Invalid --subfolder" in err and "Traceback" not in err


# ----------------------------------------------------------------------
# Edges
# ----------------------------------------------------------------------
def test_text_longer_than_the_context_is_truncated_with_a_counted_warning(tmp_path, tiny_backbone, caplog):
    model, tokenizer = tiny_backbone  # GPT-2 with 128 positions
    long_prompt = " ".join(f"w{5 + i % 90}" for i in range(300))
    cache = LatentCache(model, tokenizer)
    with caplog.at_level("WARNING"):
        cache._encode_missing([long_prompt], [(long_prompt, "w7 w8"), ("w9", " ".join(["w10"] * 400))])
    assert len(cache._prompts) == 1 and len(cache._responses) == 2
    assert "3 text(s) exceed the backbone's context" in caplog.text


def _checkpoint(folder: Path, complete: bool) -> None:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x")
    (folder / "trainer_state.json").write_text('{"global_step": 1}' if complete else '{"global_st')


def test_incomplete_newest_checkpoint_falls_back_to_the_last_complete_one(tmp_path, caplog):
    _checkpoint(tmp_path / "checkpoint-1", complete=True)
    _checkpoint(tmp_path / "checkpoint-2", complete=False)
    (tmp_path / "checkpoint-3").mkdir()  # killed before anything was written
    with caplog.at_level("WARNING"):
        assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-1")
    assert "checkpoint-3, checkpoint-2" in caplog.text
    assert resolve_resume(True, tmp_path) == str(tmp_path / "checkpoint-1")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        resolve_resume("/nonexistent", tmp_path)
    with pytest.raises(ValueError, match="incomplete"):
        resolve_resume(str(tmp_path / "checkpoint-2"), tmp_path)


def test_cli_errors_are_one_line_with_exit_codes(tmp_path, capsys):
    assert cli_main(["pull", "--repo_id", "o/r", "--no_such_flag", "1"]) == 2
    config = tmp_path / "c.yaml"
    config.write_text("repo_id: [unclosed\n")
    assert cli_main(["pull", f"--config={config}"]) == 2
    config.write_text(f"repo_id: ./missing-folder\npath: {tmp_path / 'o'}\n")
    assert cli_main(["pull", f"--config={config}"]) == 1  # --config=FILE is read: repo_id comes from it
    err = capsys.readouterr().err
    assert "unrecognized arguments: ['--no_such_flag', '1']" in err and "not valid YAML" in err
    assert "No repo at ./missing-folder" in err and "Traceback" not in err
    code = cli_main(["generate", "--backbone", str(tmp_path / "nope"), "--prompt", "hi"])
    assert code == 1 and "No backbone at" in capsys.readouterr().err


def test_damaged_latent_cache_is_named_and_replaced_on_the_next_save(tmp_path, tiny_backbone):
    model, tokenizer = tiny_backbone
    cache = LatentCache(model, tokenizer, cache_dir=tmp_path)
    _fill(cache, range(3))
    cache.save()
    index = cache.directory / "index.json"
    raw = json.loads(index.read_text())
    raw["shards"][0]["responses"] = raw["shards"][0]["responses"][:1]
    index.write_text(json.dumps(raw))
    with pytest.raises(OSError, match=r"index lists 3 prompts and 1 responses for latents-[0-9a-f]{16}\.safetensors"):
        LatentCache(model, tokenizer, cache_dir=tmp_path)
    cache.save()  # the in-memory cache replaces the damaged one
    assert _check_cache(LatentCache(model, tokenizer, cache_dir=tmp_path)) == {0, 1, 2}


def test_cli_resume_from_a_missing_checkpoint_is_an_error(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    argv = ["align", "--backbone", str(tmp_path), "--dataset", str(data), "--output_dir", str(tmp_path / "out")]
    assert cli_main([*argv, "--resume_from_checkpoint", "/nonexistent"]) == 1
    err = capsys.readouterr().err
    assert "no such checkpoint folder" in err and "Traceback" not in err


def test_saving_into_the_working_directory_keeps_it_usable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("notes.txt").write_text("mine")
    for value in (0.0, 1.0):
        _embedding("fp", value).save_pretrained(".")
    assert Path("notes.txt").read_text() == "mine"  # the cwd was swapped; the process follows it
    assert float(PreferenceEmbedding.from_pretrained(".").bias[0].detach()) == 1.0


def test_an_unreachable_hub_is_one_clear_oserror(tmp_path):
    from hf_prefalign.hub.transfer import push_folder

    with pytest.raises(OSError, match="Could not reach the Hub for pushing to 'o/r'"):
        push_folder(lambda folder: None, "o/r", token="hf_fake", endpoint="http://127.0.0.1:9")


def test_cli_invalid_jsonl_is_one_line(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": \n')
    code = cli_main(
        ["align", "--backbone", str(tmp_path), "--dataset", str(data), "--output_dir", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 2 and "Traceback" not in err
