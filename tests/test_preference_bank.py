"""Preference embeddings (the per-user prior), the preference bank, pairs from a scored pool, and the scorers."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from hf_prefalign import PreferenceBank, PreferenceEmbedding, PreferenceEmbeddingConfig
from hf_prefalign.data.pairs import preference_pairs_from_pool
from hf_prefalign.preference.bank import read_bank_index
from hf_prefalign.preference.bank_shards import BankLockedError
from hf_prefalign.scorers import available_scorers, get_scorer
from hf_prefalign.utils.serialization import IntegrityError, sha256_file


FINGERPRINT = "f" * 64
LATENT = 4
FEATURES = 6


# ----------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------
def _embedding(seed: int = 0, fingerprint: str = FINGERPRINT, trained: bool = True, **options) -> PreferenceEmbedding:
    """An embedding with random (non-zero) parameters when `trained`, else the fresh N(0, I) prior."""
    torch.manual_seed(seed)
    config = PreferenceEmbeddingConfig(
        latent_dim=options.pop("latent_dim", LATENT),
        feature_dim=options.pop("feature_dim", FEATURES),
        backbone_fingerprint=fingerprint,
        **options,
    )
    embedding = PreferenceEmbedding(config)
    if trained:
        with torch.no_grad():
            for p in embedding.parameters():
                p.add_(0.5 * torch.randn_like(p))
    return embedding


def _bank() -> PreferenceBank:
    return PreferenceBank(FINGERPRINT, LATENT, FEATURES)


def _assert_same_tensors(a: PreferenceEmbedding, b: PreferenceEmbedding) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), f"{name} differs"


# ----------------------------------------------------------------------
# PreferenceEmbedding
# ----------------------------------------------------------------------
@pytest.mark.parametrize("scale", [0.0, 1.0, 1e3], ids=["zeros", "unit", "large"])
def test_fresh_embedding_is_exactly_the_standard_normal(scale):
    embedding = _embedding(trained=False)
    features = scale * torch.randn(5, FEATURES)
    prior = embedding(features)
    assert prior.mean.shape == prior.logvar.shape == (5, LATENT)
    assert prior.mean.dtype == prior.logvar.dtype == torch.float32
    assert torch.equal(prior.mean, torch.zeros(5, LATENT))
    assert torch.equal(prior.logvar, torch.zeros(5, LATENT))
    assert torch.equal(embedding.latents(features), torch.zeros(5, LATENT))


def test_fresh_embedding_reads_half_precision_features_in_fp32():
    prior = _embedding(trained=False)(torch.randn(2, FEATURES, dtype=torch.bfloat16))
    assert prior.mean.dtype == torch.float32
    assert torch.equal(prior.logvar, torch.zeros(2, LATENT))


@pytest.mark.parametrize("raw", [-1e4, -30.0, 30.0, 1e4])
def test_log_variance_stays_within_its_bounds_for_extreme_parameters(raw):
    embedding = _embedding(trained=False, logvar_min=-5.0, logvar_max=2.0)
    with torch.no_grad():
        embedding.bias[LATENT:] = raw  # the raw log-variance half
        embedding.bias[:LATENT] = raw  # and an extreme mean
        embedding.up.normal_(std=abs(raw))
    prior = embedding(100.0 * torch.randn(3, FEATURES))
    assert torch.isfinite(prior.logvar).all() and torch.isfinite(prior.mean).all()
    assert (prior.logvar >= -5.0).all() and (prior.logvar <= 2.0).all()
    assert torch.isfinite(prior.std).all() and (prior.std > 0).all()


def test_moderate_parameters_give_log_variance_strictly_inside_the_bounds():
    embedding = _embedding(seed=3)
    logvar = embedding(torch.randn(16, FEATURES)).logvar
    assert (logvar > -5.0).all() and (logvar < 2.0).all()
    assert logvar.abs().max() > 0, "a trained embedding should move the log-variance away from 0"


def test_sampled_latents_scale_with_temperature():
    embedding = _embedding(seed=1)
    features = torch.randn(2, FEATURES)
    mean = embedding.latents(features)
    torch.manual_seed(0)
    cold = embedding.latents(features, sample=True, temperature=0.0)
    torch.testing.assert_close(cold, mean)
    torch.manual_seed(0)
    hot = embedding.latents(features, sample=True, temperature=1.0)
    assert (hot - mean).abs().max() > 1e-3


@pytest.mark.parametrize("field,value", [("latent_dim", 0), ("feature_dim", -1), ("rank", 0)])
def test_config_rejects_non_positive_sizes(field, value):
    with pytest.raises(ValueError, match=field):
        _embedding(trained=False, **{field: value})


@pytest.mark.parametrize("bounds", [(0.0, 2.0), (-5.0, 0.0), (1.0, -1.0)])
def test_config_rejects_log_variance_bounds_that_exclude_zero(bounds):
    with pytest.raises(ValueError, match="logvar_min < 0 < logvar_max"):
        _embedding(trained=False, logvar_min=bounds[0], logvar_max=bounds[1])


def test_save_writes_config_and_safetensors_and_loads_identically(tmp_path):
    embedding = _embedding(seed=2, base_model="tiny-base")
    embedding.config.training = {"pairs": 12, "steps": 3, "beta": 0.1}
    embedding.save_pretrained(tmp_path / "alice")
    files = {p.name for p in (tmp_path / "alice").iterdir()}
    assert {"config.json", "model.safetensors"} <= files
    assert files <= {"config.json", "model.safetensors", "README.md"}, "no temporary file should remain"
    raw = json.loads((tmp_path / "alice" / "config.json").read_text())
    assert raw["artefact_type"] == "prefalign-preference-embedding"
    assert raw["backbone_fingerprint"] == FINGERPRINT
    assert raw["training"] == {"pairs": 12, "steps": 3, "beta": 0.1}
    assert set(load_file(str(tmp_path / "alice" / "model.safetensors"))) == {"bias", "down", "up"}

    loaded = PreferenceEmbedding.from_pretrained(tmp_path / "alice")
    _assert_same_tensors(embedding, loaded)
    assert loaded.config == embedding.config
    features = torch.randn(3, FEATURES)
    torch.testing.assert_close(loaded(features).mean, embedding(features).mean, rtol=0, atol=0)
    torch.testing.assert_close(loaded(features).logvar, embedding(features).logvar, rtol=0, atol=0)


def test_saved_embedding_is_kilobyte_sized(tmp_path):
    _embedding().save_pretrained(tmp_path / "tiny")
    assert (tmp_path / "tiny" / "model.safetensors").stat().st_size < 64 * 1024


def test_embedding_for_smollm2_sizes_fits_in_64_kb(tmp_path):
    # SmolLM2-135M: hidden size 576; the default backbone uses latent_dim 32 and a rank-8 prior.
    embedding = PreferenceEmbedding(
        PreferenceEmbeddingConfig(latent_dim=32, feature_dim=576, backbone_fingerprint="x")
    )
    parameters = sum(p.numel() for p in embedding.parameters())
    assert parameters == 2 * 32 + 576 * 8 + 8 * 2 * 32  # 5,184
    embedding.save_pretrained(tmp_path / "smol")
    size = (tmp_path / "smol" / "model.safetensors").stat().st_size
    assert 4 * parameters <= size <= 64 * 1024
    assert (tmp_path / "smol" / "config.json").stat().st_size < 4 * 1024


def test_save_into_a_file_path_is_rejected(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="directory"):
        _embedding().save_pretrained(target)


def test_loading_an_empty_directory_names_the_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        PreferenceEmbedding.from_pretrained(tmp_path)


def test_loading_a_missing_local_directory_is_an_os_error(tmp_path, monkeypatch):
    from huggingface_hub import constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # never reach the network
    with pytest.raises(OSError, match="nobody"):
        PreferenceEmbedding.from_pretrained(tmp_path / "nobody")


def test_loading_a_directory_of_another_artefact_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a PrefAlign preference embedding"):
        PreferenceEmbedding.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bad_json", "wrong_shapes", "missing_weights"])
def test_corrupt_embedding_raises_os_error(tmp_path, damage):
    path = tmp_path / "alice"
    _embedding().save_pretrained(path)
    weights, config = path / "model.safetensors", path / "config.json"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x00\x01not a safetensors file")
    elif damage == "bad_json":
        config.write_text(config.read_text()[:-10])
    elif damage == "wrong_shapes":
        raw = json.loads(config.read_text())
        raw["rank"] = 3  # the saved tensors have rank 8
        config.write_text(json.dumps(raw))
    else:
        weights.unlink()
    with pytest.raises(OSError, match="alice"):
        PreferenceEmbedding.from_pretrained(path)


def test_compatibility_check_names_what_differs():
    embedding = _embedding()
    embedding.check_compatible(FINGERPRINT, LATENT, FEATURES)  # no error
    with pytest.raises(ValueError, match="another backbone"):
        embedding.check_compatible("0" * 64, LATENT, FEATURES, name="alice")
    with pytest.raises(ValueError, match="latent_dim=4"):
        embedding.check_compatible(FINGERPRINT, LATENT + 1, FEATURES)
    with pytest.raises(ValueError, match="feature_dim=6"):
        embedding.check_compatible(FINGERPRINT, LATENT, FEATURES + 1)


# ----------------------------------------------------------------------
# PreferenceBank: registry
# ----------------------------------------------------------------------
def test_bank_add_remove_ids_contains_len():
    bank = _bank()
    assert len(bank) == 0 and bank.ids() == [] and "alice" not in bank
    alice, bob = _embedding(1), _embedding(2)
    bank.add("alice", alice)
    bank.add("bob", bob)
    assert bank.ids() == ["alice", "bob"] and list(bank) == ["alice", "bob"]
    assert len(bank) == 2 and "alice" in bank and "carol" not in bank
    assert bank.get("alice") is alice
    assert not alice.training, "registered embeddings are put in eval mode"

    with pytest.raises(ValueError, match="already registered"):
        bank.add("alice", bob)
    assert bank.get("alice") is alice
    bank.add("alice", bob, overwrite=True)
    assert bank.get("alice") is bob

    bank.remove("alice")
    assert bank.ids() == ["bob"] and "alice" not in bank
    with pytest.raises(KeyError, match="alice"):
        bank.remove("alice")


@pytest.mark.parametrize(
    "bad_id", ["", " alice", "al ice", "../alice", "a/b", "-alice", ".hidden", "x" * 129, None, 3], ids=repr
)
def test_bank_rejects_invalid_ids(tmp_path, bad_id):
    bank = _bank()
    with pytest.raises(ValueError, match="Invalid preference id"):
        bank.add(bad_id, _embedding())
    _embedding().save_pretrained(tmp_path / "user")
    with pytest.raises(ValueError, match="Invalid preference id"):
        bank.add_from_directory(bad_id, tmp_path / "user")
    assert len(bank) == 0


@pytest.mark.parametrize("good_id", ["a", "Alice_2", "user-01.v2", "9" * 128])
def test_bank_accepts_valid_ids(good_id):
    bank = _bank()
    bank.add(good_id, _embedding())
    assert good_id in bank


def test_bank_refuses_an_embedding_of_another_backbone():
    bank = _bank()
    with pytest.raises(ValueError, match="another backbone"):
        bank.add("alice", _embedding(fingerprint="0" * 64))
    with pytest.raises(ValueError, match="latent_dim"):
        bank.add("alice", _embedding(latent_dim=LATENT + 1))
    assert "alice" not in bank and len(bank) == 0


def test_unknown_id_error_lists_the_known_ids():
    bank = _bank()
    with pytest.raises(KeyError, match="none"):
        bank.get("alice")
    bank.add("alice", _embedding(1))
    bank.add("bob", _embedding(2))
    with pytest.raises(KeyError) as excinfo:
        bank.get("carol")
    message = str(excinfo.value)
    assert "'carol'" in message and "'alice'" in message and "'bob'" in message and "2 user(s)" in message


def test_unknown_id_error_with_many_users_says_how_many():
    bank = _bank()
    shared = _embedding()
    for i in range(13):
        bank.add(f"user{i:02d}", shared)
    with pytest.raises(KeyError) as excinfo:
        bank.get("nobody")
    message = str(excinfo.value)
    assert "13 user(s)" in message and "and 3 more" in message
    assert "'user00'" in message and "'user12'" not in message


# ----------------------------------------------------------------------
# PreferenceBank: saving and lazy loading
# ----------------------------------------------------------------------
def _saved_bank(tmp_path) -> tuple[dict[str, PreferenceEmbedding], object]:
    users = {"alice": _embedding(1), "bob": _embedding(2), "carol": _embedding(3)}
    bank = _bank()
    for name, embedding in users.items():
        bank.add(name, embedding)
    directory = tmp_path / "bank"
    bank.save(directory)
    return users, directory


def test_bank_save_writes_an_index_and_one_folder_per_user(tmp_path):
    _, directory = _saved_bank(tmp_path)
    index = json.loads((directory / "bank.json").read_text())
    assert index == {
        "feature_dim": FEATURES,
        "fingerprint": FINGERPRINT,
        "latent_dim": LATENT,
        "preference_ids": ["alice", "bob", "carol"],
    }
    for name in ("alice", "bob", "carol"):
        files = {p.name for p in (directory / name).iterdir()}
        assert {"config.json", "model.safetensors"} <= files <= {"config.json", "model.safetensors", "README.md"}
    assert not [p for p in directory.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_bank_loads_lazily_and_reads_a_user_only_on_first_get(tmp_path, monkeypatch):
    users, directory = _saved_bank(tmp_path)
    reads = []
    original = PreferenceEmbedding.from_pretrained

    def spy(path):
        reads.append(str(path))
        return original(path)

    monkeypatch.setattr(PreferenceEmbedding, "from_pretrained", spy)
    bank = _bank()
    assert bank.load(directory) == ["alice", "bob", "carol"]
    assert reads == [], "lazy loading must not read any embedding"
    assert bank.ids() == ["alice", "bob", "carol"] and "bob" in bank and len(bank) == 3
    bob = bank.get("bob")
    assert reads == [str(directory / "bob")]
    _assert_same_tensors(bob, users["bob"])
    assert bank.get("bob") is bob and len(reads) == 1, "a loaded user is read once"


def test_corrupt_lazy_user_fails_only_on_get_and_stays_unloaded(tmp_path):
    _, directory = _saved_bank(tmp_path)
    bank = _bank()
    bank.load(directory)
    weights = directory / "carol" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # corrupted after registration: nothing was read yet
    _assert_same_tensors(bank.get("alice"), _embedding(1))
    with pytest.raises(OSError, match="carol"):
        bank.get("carol")
    with pytest.raises(OSError):
        bank.get("carol")  # still failing, never half-registered as a loaded embedding
    features = torch.randn(2, FEATURES)
    with pytest.raises(OSError):
        bank.latents(["alice", "carol"], features)


def test_eager_load_reads_every_user_now(tmp_path):
    _, directory = _saved_bank(tmp_path)
    weights = directory / "carol" / "model.safetensors"
    weights.write_bytes(b"broken")
    bank = _bank()
    with pytest.raises(OSError, match="carol"):
        bank.load(directory, lazy=False)
    assert "carol" not in bank


def test_lazy_user_of_another_backbone_is_refused_on_get(tmp_path):
    _embedding(fingerprint="0" * 64).save_pretrained(tmp_path / "stranger")
    bank = _bank()
    bank.add_from_directory("stranger", tmp_path / "stranger")
    with pytest.raises(ValueError, match="another backbone"):
        bank.get("stranger")


def test_bank_of_another_backbone_is_refused(tmp_path):
    _, directory = _saved_bank(tmp_path)
    other = PreferenceBank("0" * 64, LATENT, FEATURES)
    with pytest.raises(ValueError, match="another backbone"):
        other.load(directory)
    assert len(other) == 0


def test_loading_a_folder_without_index_or_user_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="bank.json"):
        _bank().load(tmp_path)
    with pytest.raises(FileNotFoundError):
        _bank().add_from_directory("alice", tmp_path / "missing")


def test_saving_a_lazily_loaded_bank_copies_its_users(tmp_path):
    users, directory = _saved_bank(tmp_path)
    bank = _bank()
    bank.load(directory)
    bank.save(tmp_path / "copy")
    again = _bank()
    again.load(tmp_path / "copy")
    for name, embedding in users.items():
        _assert_same_tensors(again.get(name), embedding)


# ----------------------------------------------------------------------
# PreferenceBank: latents for a batch, concurrency
# ----------------------------------------------------------------------
def test_bank_latents_give_each_row_its_users_prior_mean():
    bank = _bank()
    alice, bob = _embedding(1), _embedding(2)
    bank.add("alice", alice)
    bank.add("bob", bob)
    features = torch.randn(4, FEATURES)
    latents = bank.latents(["bob", None, "alice", "bob"], features)
    assert latents.shape == (4, LATENT) and latents.dtype == torch.float32
    torch.testing.assert_close(latents[0], bob(features[:1]).mean[0])
    torch.testing.assert_close(latents[2], alice(features[2:3]).mean[0])
    torch.testing.assert_close(latents[3], bob(features[3:]).mean[0])
    assert torch.equal(latents[1], torch.zeros(LATENT)), "a None row is the neutral z = 0"
    with pytest.raises(ValueError, match="3 preference ids for a batch of 4"):
        bank.latents(["alice", None, "bob"], features)
    with pytest.raises(KeyError, match="carol"):
        bank.latents(["carol", None, None, None], features)


def test_concurrent_reads_load_each_user_once_and_agree(tmp_path):
    _, directory = _saved_bank(tmp_path)
    bank = _bank()
    bank.load(directory)
    features = torch.randn(3, FEATURES)
    ids = ["alice", "bob", "carol"]

    def read(i: int):
        name = ids[i % 3]
        return name, bank.get(name), bank.latents(ids, features)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(read, range(48)))
    for name in ids:
        objects = {id(embedding) for got, embedding, _ in results if got == name}
        assert len(objects) == 1, f"{name} was loaded more than once"
    reference = bank.latents(ids, features)
    for _, _, latents in results:
        assert torch.equal(latents, reference)


# ----------------------------------------------------------------------
# PreferenceBank: the sharded layout
# ----------------------------------------------------------------------
SHARDED_USERS = ("alice", "bob", "carol", "dave", "erin")


def _sharded_bank(tmp_path, users_per_shard: int = 2) -> tuple[dict[str, PreferenceEmbedding], object]:
    users = {name: _embedding(i + 1) for i, name in enumerate(SHARDED_USERS)}
    bank = _bank()
    for name, embedding in users.items():
        bank.add(name, embedding)
    directory = tmp_path / "sharded"
    bank.save(directory, layout="sharded", users_per_shard=users_per_shard)
    return users, directory


def _index(directory) -> dict:
    return json.loads((directory / "bank.json").read_text())


def test_sharded_save_stacks_users_in_shards_with_an_index(tmp_path):
    users, directory = _sharded_bank(tmp_path)
    assert sorted(p.name for p in directory.iterdir()) == [
        "bank.json",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "shard-00002.safetensors",
    ], "three files for five users, no temporary file, no lock left"
    index = _index(directory)
    assert index["layout"] == "sharded" and index["format_version"] == 1
    assert (index["fingerprint"], index["latent_dim"], index["feature_dim"]) == (FINGERPRINT, LATENT, FEATURES)
    assert [shard["ids"] for shard in index["shards"]] == [["alice", "bob"], ["carol", "dave"], ["erin"]]
    for shard in index["shards"]:
        path = directory / shard["file"]
        assert shard["size"] == path.stat().st_size and shard["sha256"] == sha256_file(path) and shard["rank"] == 8
    stacked = load_file(str(directory / "shard-00001.safetensors"))
    assert stacked["bias"].shape == (2, 2 * LATENT) and stacked["down"].shape == (2, FEATURES, 8)
    assert torch.equal(stacked["up"][1], users["dave"].up.detach())
    assert read_bank_index(directory)["preference_ids"] == list(SHARDED_USERS)

    bank = _bank()
    assert bank.load(directory) == list(SHARDED_USERS)
    for name, embedding in users.items():
        loaded = bank.get(name)
        _assert_same_tensors(loaded, embedding)
        assert loaded.config == embedding.config and not loaded.training


def test_sharded_save_groups_users_by_rank(tmp_path):
    bank = _bank()
    bank.add("low", _embedding(1, rank=2))
    bank.add("high", _embedding(2, rank=8))
    bank.add("low2", _embedding(3, rank=2))
    bank.save(tmp_path / "b", layout="sharded")
    assert sorted(tuple(s["ids"]) for s in _index(tmp_path / "b")["shards"]) == [("high",), ("low", "low2")]
    again = _bank()
    again.load(tmp_path / "b")
    _assert_same_tensors(again.get("low2"), _embedding(3, rank=2))


def test_sharded_append_writes_a_new_shard_and_never_rewrites_old_ones(tmp_path):
    users, directory = _sharded_bank(tmp_path)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in directory.glob("shard-*")}
    bank = _bank()
    bank.load(directory)
    bank.get("bob")  # read, unchanged: not written again
    bank.add("frank", _embedding(10))
    bank.save(directory)  # the layout already there
    index = _index(directory)
    assert [shard["ids"] for shard in index["shards"]][-1] == ["frank"]
    assert len(index["shards"]) == 4
    for name, (inode, mtime, data) in before.items():
        path = directory / name
        assert (path.stat().st_ino, path.stat().st_mtime_ns, path.read_bytes()) == (inode, mtime, data), name

    bank.add("bob", _embedding(11), overwrite=True)  # a replaced user goes to a new shard, its old row retires
    bank.save(directory)
    index = _index(directory)
    assert index["shards"][0]["ids"] == ["alice", None] and index["shards"][-1]["ids"] == ["bob"]
    reader = _bank()
    assert sorted(reader.load(directory)) == sorted([*SHARDED_USERS, "frank"])
    _assert_same_tensors(reader.get("bob"), _embedding(11))
    _assert_same_tensors(reader.get("alice"), users["alice"])

    only = _bank()
    only.add("alice", reader.get("alice"))
    only.add("zoe", _embedding(12))
    only.save(directory, merge=False)  # exactly these two; shards left without a live row are deleted
    assert sorted(read_bank_index(directory)["preference_ids"]) == ["alice", "zoe"]
    assert not (directory / "shard-00001.safetensors").exists()
    assert not [p for p in directory.iterdir() if p.name.startswith(".") or p.name == "bank.lock"]


def test_save_user_into_a_sharded_bank_appends_one_row(tmp_path):
    _, directory = _sharded_bank(tmp_path)
    bank = _bank()
    bank.add("carol", _embedding(20))
    bank.save_user(directory, "carol")
    index = _index(directory)
    assert index["shards"][1]["ids"] == [None, "dave"] and index["shards"][-1]["ids"] == ["carol"]
    reader = _bank()
    reader.load(directory)
    _assert_same_tensors(reader.get("carol"), _embedding(20))
    with pytest.raises(ValueError, match="another backbone"):
        stranger = PreferenceBank("0" * 64, LATENT, FEATURES)
        stranger.add("carol", _embedding(1, fingerprint="0" * 64))
        stranger.save_user(directory, "carol")


def test_sharded_lookup_reads_only_that_users_slice(tmp_path, monkeypatch):
    from hf_prefalign.preference import bank_shards

    users, directory = _sharded_bank(tmp_path, users_per_shard=4)
    calls = []
    original = bank_shards.safe_open

    class Recorder:
        def __init__(self, path, framework):
            self.path, self.handle = path, original(path, framework=framework)

        def __enter__(self):
            self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def get_tensor(self, name):
            calls.append(("get_tensor", name))
            return self.handle.get_tensor(name)

        def get_slice(self, name):
            inner = self.handle.get_slice(name)

            class Slice:
                def __getitem__(self, item):
                    calls.append(("slice", name, item.start, item.stop))
                    return inner[item]

            return Slice()

    monkeypatch.setattr(bank_shards, "safe_open", Recorder)
    bank = _bank()
    bank.load(directory)
    assert calls == [], "opening a sharded bank reads no shard"
    dave = bank.get("dave")  # row 3 of shard 0
    _assert_same_tensors(dave, users["dave"])
    assert not [c for c in calls if c[0] == "get_tensor"], "a lookup never loads a whole tensor"
    rows = {c[1]: (c[2], c[3]) for c in calls}
    assert rows["bias"] == rows["down"] == rows["up"] == rows["row_sha256"] == (3, 4)
    assert rows["config_offsets"] == (3, 5)
    bank.get("dave")
    assert len(calls) == 6, "a loaded user is read once"


def test_mixed_user_batch_from_a_sharded_bank_equals_the_folder_layout(tmp_path):
    users = {name: _embedding(i + 1) for i, name in enumerate(SHARDED_USERS)}
    bank = _bank()
    for name, embedding in users.items():
        bank.add(name, embedding)
    bank.save(tmp_path / "folders")
    bank.save(tmp_path / "sharded", layout="sharded", users_per_shard=2)
    rows = ["erin", None, {"alice": 0.25, "dave": 0.75}, "bob", "erin", {"carol": 1.0, "bob": 3.0}, "alice"]
    features = torch.randn(len(rows), FEATURES)
    from_folders, from_shards = _bank(), _bank()
    from_folders.load(tmp_path / "folders")
    from_shards.load(tmp_path / "sharded")
    expected = from_folders.latents(rows, features)
    assert torch.equal(from_shards.latents(rows, features), expected)
    assert torch.equal(bank.latents(rows, features), expected)
    assert torch.equal(expected[1], torch.zeros(LATENT))


@pytest.mark.parametrize("damage", ["missing", "truncated", "row_bytes", "full_verify"])
def test_damaged_shard_gives_one_clear_error_naming_the_file(tmp_path, damage):
    _, directory = _sharded_bank(tmp_path)
    shard = directory / "shard-00001.safetensors"
    if damage == "missing":
        shard.unlink()
        with pytest.raises(FileNotFoundError, match="shard-00001.safetensors"):
            _bank().load(directory)
        return
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-7])
        with pytest.raises(IntegrityError, match="shard-00001.safetensors"):
            _bank().load(directory)
        return
    data = bytearray(shard.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    bias_start = header + json.loads(data[8:header])["bias"]["data_offsets"][0]
    data[bias_start + 4 * 2 * LATENT + 1] ^= 0xFF  # a byte of dave's row (row 1), same size
    shard.write_bytes(bytes(data))
    if damage == "full_verify":
        with pytest.raises(IntegrityError, match="shard-00001.safetensors"):
            _bank().load(directory, verify=True)
        return
    bank = _bank()
    bank.load(directory)  # sizes match: the damage shows when that row is read
    _assert_same_tensors(bank.get("carol"), _embedding(3))  # row 0 of the same shard is intact
    with pytest.raises(IntegrityError, match=r"'dave' \(row 1\) of the shard .*shard-00001.safetensors"):
        bank.get("dave")
    assert "dave" not in bank._loaded


def test_non_finite_user_in_a_shard_is_refused_on_read(tmp_path):
    broken = _embedding(1)
    with torch.no_grad():
        broken.bias[0] = float("nan")
    bank = _bank()
    bank.add("nan", broken)
    bank.save(tmp_path / "b", layout="sharded")
    reader = _bank()
    reader.load(tmp_path / "b")
    with pytest.raises(IntegrityError, match="non-finite"):
        reader.get("nan")


def test_sharded_bank_of_another_backbone_is_refused(tmp_path):
    _, directory = _sharded_bank(tmp_path)
    with pytest.raises(ValueError, match="another backbone"):
        PreferenceBank("0" * 64, LATENT, FEATURES).load(directory)
    with pytest.raises(ValueError, match="latent_dim=4"):
        PreferenceBank(FINGERPRINT, LATENT + 1, FEATURES).load(directory)
    other = PreferenceBank("0" * 64, LATENT, FEATURES)
    other.add("zoe", _embedding(1, fingerprint="0" * 64))
    with pytest.raises(ValueError, match="another backbone"):
        other.save(directory)
    assert read_bank_index(directory)["preference_ids"] == list(SHARDED_USERS)


@pytest.mark.parametrize("bad", ["../alice", "a/b", ".hidden", ""])
def test_ids_and_shard_names_from_a_sharded_index_are_validated(tmp_path, bad):
    _, directory = _sharded_bank(tmp_path)
    index = _index(directory)
    index["shards"][0]["ids"][0] = bad
    (directory / "bank.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="Invalid preference id"):
        _bank().load(directory)
    index["shards"][0]["ids"][0] = "alice"
    index["shards"][0]["file"] = f"../{bad}shard-00000.safetensors"
    (directory / "bank.json").write_text(json.dumps(index))
    with pytest.raises(OSError, match="malformed shard entry"):
        _bank().load(directory)


def test_sharded_index_of_a_newer_format_is_refused(tmp_path):
    _, directory = _sharded_bank(tmp_path)
    index = _index(directory)
    index["format_version"] = 99
    (directory / "bank.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="format version 99"):
        _bank().load(directory)


def test_a_second_writer_of_a_sharded_bank_is_refused(tmp_path):
    from hf_prefalign.preference.bank_shards import writer_lock

    _, directory = _sharded_bank(tmp_path)
    bank = _bank()
    bank.add("zoe", _embedding(9))
    with writer_lock(directory):  # another writer at work
        with pytest.raises(BankLockedError, match=r"bank\.lock") as excinfo:
            bank.save(directory)
        assert str(os.getpid()) in str(excinfo.value)
    assert "zoe" not in read_bank_index(directory)["preference_ids"]
    bank.save(directory)  # released: the next writer goes ahead
    assert "zoe" in read_bank_index(directory)["preference_ids"]


def test_a_lock_left_by_a_dead_writer_is_taken_over(tmp_path):
    _, directory = _sharded_bank(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = {"host": socket.gethostname(), "pid": int(dead.stdout), "since": "then"}
    (directory / "bank.lock").write_text(json.dumps(lock))
    bank = _bank()
    bank.add("zoe", _embedding(9))
    bank.save(directory)
    assert "zoe" in read_bank_index(directory)["preference_ids"] and not (directory / "bank.lock").exists()


def test_a_writer_killed_before_its_index_leaves_the_old_bank(tmp_path, monkeypatch):
    from hf_prefalign.preference import bank as bank_module

    users, directory = _sharded_bank(tmp_path)
    bank = _bank()
    bank.add("zoe", _embedding(9))

    def crash(index, path):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(bank_module, "write_index", crash)
    with pytest.raises(KeyboardInterrupt):
        bank.save(directory)
    monkeypatch.undo()
    assert (directory / "shard-00003.safetensors").exists(), "the new shard was written before the index"
    reader = _bank()
    assert reader.load(directory) == list(SHARDED_USERS), "the old index, complete"
    _assert_same_tensors(reader.get("erin"), users["erin"])
    (directory / ".prefalign-shard-00009.safetensors.x.tmp").write_bytes(b"half")  # a half-written shard
    bank.save(directory)  # the next write removes what no index names, then writes its own shard
    assert _index(directory)["shards"][-1]["ids"] == ["zoe"]
    assert sorted(p.name for p in directory.iterdir()) == [
        "bank.json",
        *(f"shard-0000{i}.safetensors" for i in range(4)),
    ]
    reader = _bank()
    reader.load(directory)
    _assert_same_tensors(reader.get("zoe"), _embedding(9))


def test_folder_layout_banks_keep_loading_and_are_not_converted_in_place(tmp_path):
    users, directory = _saved_bank(tmp_path)
    bank = _bank()
    assert bank.load(directory) == ["alice", "bob", "carol"]
    bank.add("dave", _embedding(4))
    bank.save(directory)  # stays folders
    assert (directory / "dave" / "model.safetensors").is_file() and "layout" not in _index(directory)
    with pytest.raises(ValueError, match="not converted in place"):
        bank.save(directory, layout="sharded")
    bank.save(tmp_path / "converted", layout="sharded")
    converted = _bank()
    assert converted.load(tmp_path / "converted") == ["alice", "bob", "carol", "dave"]
    _assert_same_tensors(converted.get("bob"), users["bob"])
    with pytest.raises(ValueError, match="not converted in place"):
        converted.save(tmp_path / "converted", layout="folders")
    converted.save(tmp_path / "converted", layout="folders", merge=False)  # replaced whole, shards included
    assert not list((tmp_path / "converted").glob("shard-*")) and (tmp_path / "converted" / "bob").is_dir()
    with pytest.raises(ValueError, match="Unknown bank layout"):
        bank.save(tmp_path / "x", layout="columns")
    with pytest.raises(ValueError, match="users_per_shard"):
        bank.save(tmp_path / "y", layout="sharded", users_per_shard=0)


# ----------------------------------------------------------------------
# Pairs from a scored pool
# ----------------------------------------------------------------------
def _pool(responses: list[list[str]]) -> Dataset:
    return Dataset.from_dict({"prompt": [f"w{5 + i}" for i in range(len(responses))], "responses": responses})


def _score_by_table(table: dict[str, float]):
    return lambda texts: torch.tensor([table[t] for t in texts])


def test_pairs_are_best_vs_second_worst_and_second_best_vs_worst():
    table = {"a": 0.9, "b": 0.1, "c": 0.5, "d": -0.3, "e": 0.7}
    pairs = preference_pairs_from_pool(_pool([["a", "b", "c", "d", "e"]]), _score_by_table(table))
    assert pairs.column_names == ["prompt", "chosen", "rejected", "score_chosen", "score_rejected"]
    assert pairs["chosen"] == ["a", "e"] and pairs["rejected"] == ["b", "d"]
    assert pairs["prompt"] == ["w5", "w5"]
    for row in pairs:
        assert row["score_chosen"] > row["score_rejected"]
        assert math.isclose(row["score_chosen"], table[row["chosen"]], rel_tol=1e-6)
        assert math.isclose(row["score_rejected"], table[row["rejected"]], rel_tol=1e-6)


def test_tied_pairs_are_skipped():
    # Prompt 1: (best 3 vs 2nd worst 1) is kept, (2nd best 1 vs worst 1) ties; prompt 2 has no tie.
    table = {"a": 3.0, "b": 1.0, "c": 1.0, "d": 1.0, "e": 4.0, "f": 3.0, "g": 2.0, "h": 1.0}
    pairs = preference_pairs_from_pool(_pool([["a", "b", "c", "d"], ["e", "f", "g", "h"]]), _score_by_table(table))
    assert len(pairs) == 3
    assert pairs["prompt"] == ["w5", "w6", "w6"]
    assert pairs[0]["chosen"] == "a" and pairs[0]["rejected"] in {"b", "c", "d"}
    assert (pairs["chosen"][1:], pairs["rejected"][1:]) == (["e", "f"], ["g", "h"])
    assert all(c > r for c, r in zip(pairs["score_chosen"], pairs["score_rejected"], strict=True))


def test_all_tied_pool_gives_no_pairs_and_an_error():
    with pytest.raises(ValueError, match="same score"):
        preference_pairs_from_pool(_pool([["a", "b", "c", "d"]]), lambda texts: torch.zeros(len(texts)))


def test_pairs_need_four_responses_per_prompt():
    with pytest.raises(ValueError, match="at least 4 responses"):
        preference_pairs_from_pool(_pool([["a", "b", "c"]]), _score_by_table({"a": 1.0, "b": 2.0, "c": 3.0}))


def test_pairs_from_a_named_scorer_on_a_chat_pool():
    pool = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": "w5 w6"}],
                "responses": ["w7", "w7 w8 w9", "w8 w9", "w7 w8 w9 w10"],
            },
        ]
    )
    pairs = preference_pairs_from_pool(pool, get_scorer("concise"))
    assert pairs["chosen"] == ["w7", "w8 w9"] and pairs["rejected"] == ["w7 w8 w9", "w7 w8 w9 w10"]
    assert pairs[0]["prompt"] == [{"role": "user", "content": "w5 w6"}]


# ----------------------------------------------------------------------
# Scorers
# ----------------------------------------------------------------------
def test_unknown_scorer_lists_the_available_ones():
    assert {"positive", "negative", "concise", "detailed"} <= set(available_scorers())
    with pytest.raises(ValueError) as excinfo:
        get_scorer("grumpy")
    for name in ("positive", "negative", "concise", "detailed"):
        assert name in str(excinfo.value)
    assert "grumpy" in str(excinfo.value)


def test_sentiment_scorers_rank_opposite_ways():
    texts = ["I hate this awful day", "I love this wonderful day"]
    positive = get_scorer("positive")(texts)
    negative = get_scorer("negative")(texts)
    assert positive.shape == negative.shape == (2,)
    assert positive[1] > positive[0] and negative[0] > negative[1]
    assert positive[1] > 0 > positive[0]
    torch.testing.assert_close(negative, -positive)


def test_length_scorers_count_words():
    texts = ["one two three", "one", "one two three four five"]
    concise = get_scorer("concise")(texts)
    detailed = get_scorer("detailed")(texts)
    assert torch.argmax(concise).item() == 1 and torch.argmax(detailed).item() == 2
    assert detailed.tolist() == [3.0, 1.0, 5.0]
    torch.testing.assert_close(concise, -detailed)
