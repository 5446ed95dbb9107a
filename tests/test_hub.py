"""The Hub: pushing and pulling backbones, preference embeddings and banks (tests/hub_server.py's double), model cards.

Every test talks to the local Hub test double only (the `hub_server` fixture): an empty cache, no stored token, no
network beyond 127.0.0.1.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from helpers import LATENT_DIM, make_tiny_pool, random_words
from hub_server import HubServer, hub_server_fixture  # noqa: F401  (provides the `hub_server` fixture)
from huggingface_hub import HfApi, ModelCard, ModelCardData, constants, hf_hub_download
from safetensors.torch import load as load_safetensors_bytes
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import hf_prefalign.hub.transfer as transfer
from hf_prefalign import (
    CLaPConfig,
    CLaPTrainer,
    LatentDPOConfig,
    LatentDPOTrainer,
    PrefAlignForCausalLM,
    PreferenceEmbedding,
)
from hf_prefalign.hub import backbone_card, preference_card
from hf_prefalign.hub.model_card import hub_id_or_none
from hf_prefalign.testing import make_tiny_base, make_tiny_tokenizer
from hf_prefalign.utils.constants import EMBEDDED_DEFAULT_BASE, EMBEDDED_DEFAULT_BASE_HUB_ID


TOKEN = "hf_test"
BACKBONE_FILES = {"README.md", "config.json", "generation_config.json", "model.safetensors"}
EMBEDDING_FILES = {"README.md", "config.json", "model.safetensors"}
USERS = ("alice", "bob", "carol")
# Prompts of different lengths (the word-level tokenizer adds no special token), decoded left-padded.
PROMPTS = ["w5 w6 w7 w8 w9", "w10 w11", "w12 w13 w14"]
LOADERS = [PrefAlignForCausalLM, AutoModelForCausalLM]
LOADER_IDS = ["PrefAlignForCausalLM", "AutoModelForCausalLM"]


# ----------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------
def _perturb(model: PrefAlignForCausalLM, seed: int, scale: float = 0.1) -> None:
    """Move the latent modules off their initial values, so posteriors (and decoding under z) differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.latent_parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def _rows(seed: int, marker: str, other: str, num: int = 24) -> list[dict[str, str]]:
    """Preference pairs: responses starting with `marker` are chosen over responses starting with `other`."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "prompt": random_words(generator),
            "chosen": f"{marker} {random_words(generator)}",
            "rejected": f"{other} {random_words(generator)}",
        }
        for _ in range(num)
    ]


USER_DATA = {
    "alice": (0, "w10 w11 w12", "w50 w51"),
    "bob": (1, "w50 w51", "w10 w11 w12"),
    "carol": (2, "w30 w31", "w70 w71"),
}


def _dpo_config(output_dir: Path, **overrides) -> LatentDPOConfig:
    settings = {
        "output_dir": str(output_dir),
        "disable_tqdm": True,
        "report_to": [],
        "use_cpu": True,
        "latent_cache_dir": "none",
        "num_train_epochs": 2,
        "per_device_train_batch_size": 16,
        "learning_rate": 0.05,
        "logging_steps": 1,
        "seed": 0,
        **overrides,
    }
    return LatentDPOConfig(**settings)


@dataclass
class World:
    """A saved tiny base, a backbone on it (saved locally) and three users trained against that backbone."""

    base_path: Path
    backbone_dir: Path
    users: dict[str, Path]  # preference id -> local embedding directory
    rows: dict[str, list[dict[str, str]]]  # preference id -> its training pairs (the user text)
    tokenizer: PreTrainedTokenizerFast


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("hub-world")
    base_path = root / "base"
    make_tiny_base("qwen2").save_pretrained(base_path)  # Qwen2: its untied head makes decoding depend on z
    model = PrefAlignForCausalLM.from_base(str(base_path), latent_dim=LATENT_DIM).eval()
    _perturb(model, seed=0)
    model.save_pretrained(root / "backbone")
    tokenizer = make_tiny_tokenizer()
    users, rows = {}, {}
    for name, (seed, marker, other) in USER_DATA.items():
        rows[name] = _rows(seed, marker, other)
        trainer = LatentDPOTrainer(
            model,
            _dpo_config(root / f"train-{name}"),
            train_dataset=Dataset.from_list(rows[name]),
            processing_class=tokenizer,
        )
        trainer.train()
        users[name] = root / "users" / name
        trainer.save_preference(users[name])
    return World(base_path, root / "backbone", users, rows, tokenizer)


def _fresh(world: World) -> PrefAlignForCausalLM:
    """A new instance of the world's backbone, loaded from its local folder, with an empty bank."""
    return PrefAlignForCausalLM.from_pretrained(world.backbone_dir).eval()


def _batch(world: World) -> dict[str, torch.Tensor]:
    world.tokenizer.padding_side = "left"
    return dict(world.tokenizer(PROMPTS, return_tensors="pt", padding=True))


def _greedy(model: PrefAlignForCausalLM, batch: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    settings = {"do_sample": False, "max_new_tokens": 6, "min_new_tokens": 6, "pad_token_id": 0}
    return model.generate(**batch, **settings, **kwargs)


def _latent_tensors(model: PrefAlignForCausalLM) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.latent_state_dict().items()}


def _assert_same_tensors(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(found) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(found[name], tensor), f"{name} differs"


def _user_latents(model: PrefAlignForCausalLM, batch: dict[str, torch.Tensor], preference_id: str) -> torch.Tensor:
    return model.preference_latents(batch["input_ids"], batch["attention_mask"], preference_id)


def _upload(hub_server: HubServer, repo_id: str, folder: Path) -> str:
    """Create `repo_id` on the double and upload `folder`; returns the commit sha."""
    api = HfApi(endpoint=hub_server.endpoint, token=TOKEN)
    api.create_repo(repo_id, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=folder).oid


def _upload_files(hub_server: HubServer, tmp_path: Path, repo_id: str, files: dict[str, bytes]) -> str:
    folder = tmp_path / repo_id.replace("/", "--")
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return _upload(hub_server, repo_id, folder)


def _front_matter(readme: bytes | str) -> dict:
    text = readme.decode() if isinstance(readme, bytes) else readme
    match = re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL)
    assert match, f"no YAML metadata block at the top of the README:\n{text[:300]}"
    return yaml.safe_load(match.group(1))


def _assert_card_round_trips(card: ModelCard) -> dict:
    data = card.data.to_dict()
    assert ModelCardData(**data).to_dict() == data
    assert data["library_name"] == "hf-prefalign"
    return data


def _cached_files() -> list[str]:
    cache = Path(constants.HF_HUB_CACHE)
    return [p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()] if cache.is_dir() else []


def _go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


# ----------------------------------------------------------------------
# Backbones
# ----------------------------------------------------------------------
def test_backbone_push_then_pull_into_the_empty_cache(hub_server: HubServer, world: World):
    model = _fresh(world)
    assert _cached_files() == [], "the fixture's cache must start empty"
    url = model.push_to_hub("owner/backbone", token=TOKEN)

    repo = hub_server.repo("owner/backbone")
    assert url.endswith(repo.branches["main"]), url
    assert [c.title for c in repo.history()] == ["initial commit", "Upload PrefAlign backbone"]
    files = hub_server.files("owner/backbone")
    assert set(files) - {".gitattributes"} == BACKBONE_FILES  # frozen base: no `base_model/`
    _assert_same_tensors(load_safetensors_bytes(files["model.safetensors"]), _latent_tensors(model))
    config = json.loads(files["config.json"])
    assert config["model_type"] == "prefalign" and config["base_included"] is False
    assert config["base_model_name_or_path"] == str(world.base_path)
    metadata = _front_matter(files["README.md"])
    assert metadata["library_name"] == "hf-prefalign"
    assert "base_model" not in metadata, "a local base path must not be declared as a Hub base model"

    batch = _batch(world)
    latents = torch.linspace(-3, 3, len(PROMPTS) * LATENT_DIM).view(len(PROMPTS), LATENT_DIM)
    expected = _greedy(model, batch, latents=latents)
    assert not torch.equal(expected, _greedy(model, batch, latents=-latents)), "decoding must depend on z here"
    for loader in LOADERS:
        pulled = loader.from_pretrained("owner/backbone")
        assert isinstance(pulled, PrefAlignForCausalLM) and pulled.is_base_frozen and not pulled.training
        _assert_same_tensors(_latent_tensors(pulled), _latent_tensors(model))
        assert pulled.fingerprint() == model.fingerprint()
        assert torch.equal(_greedy(pulled, batch, latents=latents), expected)
    assert BACKBONE_FILES <= set(hub_server.downloaded("owner/backbone"))
    assert hub_server.errors == []


@pytest.mark.parametrize("loader", LOADERS, ids=LOADER_IDS)
def test_an_older_revision_is_pulled_by_commit_sha(hub_server: HubServer, world: World, loader):
    model = _fresh(world)
    model.push_to_hub("owner/versions", token=TOKEN)
    first = _latent_tensors(model)
    _perturb(model, seed=5)
    model.push_to_hub("owner/versions", token=TOKEN, commit_message="second")
    second = _latent_tensors(model)
    assert any(not torch.equal(first[name], second[name]) for name in first)

    commits = HfApi(endpoint=hub_server.endpoint).list_repo_commits("owner/versions")  # newest first
    assert [c.title for c in commits] == ["second", "Upload PrefAlign backbone", "initial commit"]
    first_sha = commits[1].commit_id
    assert first_sha == hub_server.repo("owner/versions").history()[1].oid

    _assert_same_tensors(_latent_tensors(loader.from_pretrained("owner/versions", revision=first_sha)), first)
    _assert_same_tensors(_latent_tensors(loader.from_pretrained("owner/versions")), second)
    with pytest.raises(OSError, match="no-such-branch"):
        PrefAlignForCausalLM.from_pretrained("owner/versions", revision="no-such-branch")


def test_push_to_a_branch_and_as_a_pull_request(hub_server: HubServer, world: World):
    model = _fresh(world)
    model.push_to_hub("owner/branches", token=TOKEN)
    on_main = _latent_tensors(model)
    HfApi(endpoint=hub_server.endpoint, token=TOKEN).create_branch("owner/branches", branch="dev")
    _perturb(model, seed=6)
    model.push_to_hub("owner/branches", token=TOKEN, revision="dev")
    on_dev = _latent_tensors(model)
    _perturb(model, seed=7)
    model.push_to_hub("owner/branches", token=TOKEN, create_pr=True)
    proposed = _latent_tensors(model)

    assert set(hub_server.repo("owner/branches").branches) == {"main", "dev", "refs/pr/1"}
    _assert_same_tensors(_latent_tensors(PrefAlignForCausalLM.from_pretrained("owner/branches")), on_main)
    _assert_same_tensors(
        _latent_tensors(PrefAlignForCausalLM.from_pretrained("owner/branches", revision="dev")), on_dev
    )
    pulled = AutoModelForCausalLM.from_pretrained("owner/branches", revision="refs/pr/1")
    _assert_same_tensors(_latent_tensors(pulled), proposed)


def test_cache_dir_and_local_files_only(hub_server: HubServer, world: World, tmp_path: Path):
    model = _fresh(world)
    model.push_to_hub("owner/backbone", token=TOKEN)
    PreferenceEmbedding.from_pretrained(world.users["alice"]).push_to_hub("owner/user-a", token=TOKEN)
    custom = tmp_path / "custom-cache"

    before = len(hub_server.requests)
    with pytest.raises(OSError, match="owner/backbone"):
        PrefAlignForCausalLM.from_pretrained("owner/backbone", local_files_only=True)  # nothing cached yet
    with pytest.raises(OSError, match="owner/user-a"):
        PreferenceEmbedding.from_pretrained("owner/user-a", local_files_only=True)
    assert len(hub_server.requests) == before

    for loader in LOADERS:
        pulled = loader.from_pretrained("owner/backbone", cache_dir=custom)
        _assert_same_tensors(_latent_tensors(pulled), _latent_tensors(model))
    pulled.load_preference("owner/user-a", preference_id="alice", cache_dir=custom)
    # (transformers' Auto class may leave a `.no_exist` marker of its PEFT adapter look-up in the default cache)
    assert [p for p in _cached_files() if "/.no_exist/" not in p] == [], "everything went to cache_dir"
    in_custom = {p.name for p in custom.rglob("*") if p.is_file() or p.is_symlink()}
    assert BACKBONE_FILES <= in_custom

    before = len(hub_server.requests)
    again = PrefAlignForCausalLM.from_pretrained("owner/backbone", cache_dir=custom, local_files_only=True)
    _assert_same_tensors(_latent_tensors(again), _latent_tensors(model))
    embedding = PreferenceEmbedding.from_pretrained("owner/user-a", cache_dir=custom, local_files_only=True)
    _assert_same_tensors(embedding.state_dict(), pulled.preferences.get("alice").state_dict())
    assert len(hub_server.requests) == before


def test_token_is_sent_and_private_is_recorded(hub_server: HubServer, world: World):
    model = _fresh(world)
    model.push_to_hub("owner/private-backbone", private=True, token=TOKEN)
    assert hub_server.repo("owner/private-backbone").private is True
    assert hub_server.requests, "nothing reached the server"
    assert {r.headers.get("authorization") for r in hub_server.requests} == {f"Bearer {TOKEN}"}

    hub_server.requests.clear()
    with pytest.raises(OSError, match="owner/private-backbone"):
        PrefAlignForCausalLM.from_pretrained("owner/private-backbone")  # no token: the repo is invisible
    assert {r.headers.get("authorization") for r in hub_server.requests} == {None}

    for loader in LOADERS:
        hub_server.requests.clear()
        pulled = loader.from_pretrained("owner/private-backbone", token=TOKEN)
        _assert_same_tensors(_latent_tensors(pulled), _latent_tensors(model))
        assert hub_server.requests and {r.headers.get("authorization") for r in hub_server.requests} == {
            f"Bearer {TOKEN}"
        }

    embedding = PreferenceEmbedding.from_pretrained(world.users["alice"])
    embedding.push_to_hub("owner/private-user", private=True, token=TOKEN)
    assert hub_server.repo("owner/private-user").private is True
    with pytest.raises(OSError, match="owner/private-user"):
        model.load_preference("owner/private-user", preference_id="alice")
    assert "alice" not in model.preferences
    hub_server.requests.clear()
    model.load_preference("owner/private-user", preference_id="alice", token=TOKEN)
    assert model.preferences.ids() == ["alice"]
    assert {r.headers.get("authorization") for r in hub_server.requests} == {f"Bearer {TOKEN}"}


def test_a_hub_base_is_referenced_pulled_and_declared(hub_server: HubServer, tmp_path: Path):
    base = make_tiny_base("llama", seed=4)
    base.save_pretrained(tmp_path / "tiny-base")
    _upload(hub_server, "owner/tiny-base", tmp_path / "tiny-base")

    model = PrefAlignForCausalLM.from_base("owner/tiny-base", latent_dim=LATENT_DIM).eval()
    assert model.config.base_model_name_or_path == "owner/tiny-base"
    _perturb(model, seed=2)
    model.push_to_hub("owner/adapter", token=TOKEN)
    files = hub_server.files("owner/adapter")
    assert set(files) - {".gitattributes"} == BACKBONE_FILES
    metadata = _front_matter(files["README.md"])
    assert metadata["base_model"] == "owner/tiny-base"
    assert metadata["base_model_relation"] == "adapter"
    assert metadata["library_name"] == "hf-prefalign"

    pulled = AutoModelForCausalLM.from_pretrained("owner/adapter")  # the base comes from the Hub as well
    _assert_same_tensors(_latent_tensors(pulled), _latent_tensors(model))
    for name, tensor in base.state_dict().items():
        assert torch.equal(pulled.get_base_model().state_dict()[name], tensor), name
    assert pulled.fingerprint() == model.fingerprint()


def _hub_base_backbone(hub_server: HubServer, tmp_path: Path, private: bool) -> PrefAlignForCausalLM:
    """A backbone whose base is the Hub repo `owner/hub-base`, pushed to `owner/hub-adapter`."""
    make_tiny_base("llama", seed=4).save_pretrained(tmp_path / "hub-base")
    HfApi(endpoint=hub_server.endpoint, token=TOKEN).create_repo("owner/hub-base", private=private)
    _upload(hub_server, "owner/hub-base", tmp_path / "hub-base")
    base = AutoModelForCausalLM.from_pretrained("owner/hub-base", token=TOKEN, cache_dir=tmp_path / "setup-cache")
    assert base.name_or_path == "owner/hub-base"
    model = PrefAlignForCausalLM.from_base(base, latent_dim=LATENT_DIM).eval()
    _perturb(model, seed=8)
    model.push_to_hub("owner/hub-adapter", private=private, token=TOKEN)
    return model


def test_the_token_also_pulls_a_private_hub_base(hub_server: HubServer, tmp_path: Path):
    # from_pretrained(repo, token=...) must reach the base it references with the same token.
    model = _hub_base_backbone(hub_server, tmp_path, private=True)
    pulled = PrefAlignForCausalLM.from_pretrained("owner/hub-adapter", token=TOKEN, cache_dir=tmp_path / "pull")
    _assert_same_tensors(_latent_tensors(pulled), _latent_tensors(model))
    assert pulled.fingerprint() == model.fingerprint()


def test_cache_dir_also_applies_to_a_hub_base(hub_server: HubServer, tmp_path: Path):
    model = _hub_base_backbone(hub_server, tmp_path, private=False)
    pulled = PrefAlignForCausalLM.from_pretrained("owner/hub-adapter", cache_dir=tmp_path / "custom-cache")
    _assert_same_tensors(_latent_tensors(pulled), _latent_tensors(model))
    assert hub_server.downloaded("owner/hub-base"), "the base was pulled from the Hub"
    leaked = [p for p in _cached_files() if "/.no_exist/" not in p and p != "CACHEDIR.TAG"]
    assert leaked == [], f"files outside cache_dir: {leaked}"


def test_local_files_only_also_applies_to_a_hub_base(hub_server: HubServer, tmp_path: Path):
    model = _hub_base_backbone(hub_server, tmp_path, private=False)
    PrefAlignForCausalLM.from_pretrained("owner/hub-adapter")  # backbone and base now in the (default) cache
    before = len(hub_server.requests)
    again = PrefAlignForCausalLM.from_pretrained("owner/hub-adapter", local_files_only=True)
    _assert_same_tensors(_latent_tensors(again), _latent_tensors(model))
    assert [r.path for r in hub_server.requests[before:]] == [], "local_files_only=True made requests"


def test_the_backbone_card_usage_snippet_points_to_a_tokenizer(hub_server: HubServer, tmp_path: Path):
    # The card's snippet runs `AutoTokenizer.from_pretrained(<source>)`: the source must hold a tokenizer. A
    # backbone push uploads none, so the source should be the base's Hub repo (which has one here).
    make_tiny_base("llama").save_pretrained(tmp_path / "tiny-base")
    make_tiny_tokenizer().save_pretrained(tmp_path / "tiny-base")
    _upload(hub_server, "owner/tiny-base", tmp_path / "tiny-base")
    PrefAlignForCausalLM.from_base("owner/tiny-base", latent_dim=LATENT_DIM).push_to_hub("owner/adapter", token=TOKEN)
    readme = hub_server.files("owner/adapter")["README.md"].decode()
    sources = re.findall(r'AutoTokenizer\.from_pretrained\("([^"]+)"\)', readme)
    assert sources, readme
    for source in sources:
        files = hub_server.files(source) if ("model", source) in hub_server.repos else {}
        assert "tokenizer_config.json" in files, (
            f"the usage snippet loads the tokenizer from {source!r}, which holds no tokenizer ({sorted(files)})"
        )


# ----------------------------------------------------------------------
# Users: one repo per user, or one bank repo with a folder per user
# ----------------------------------------------------------------------
def test_a_user_pushed_to_its_own_repo_generates_as_the_local_one(hub_server: HubServer, world: World):
    embedding = PreferenceEmbedding.from_pretrained(world.users["alice"])
    embedding.push_to_hub("owner/user-a", token=TOKEN)
    assert set(hub_server.files("owner/user-a")) - {".gitattributes"} == EMBEDDING_FILES

    local, remote = _fresh(world), _fresh(world)
    local.load_preference(world.users["alice"], "alice")
    remote.load_preference("owner/user-a", preference_id="alice")
    assert remote.preferences.ids() == ["alice"]
    pulled = remote.preferences.get("alice")
    assert asdict(pulled.config) == asdict(embedding.config)
    _assert_same_tensors(pulled.state_dict(), embedding.state_dict())

    batch = _batch(world)
    expected = _user_latents(local, batch, "alice")
    assert expected.abs().max() > 0.1, "a trained user has a non-neutral z"
    assert torch.equal(_user_latents(remote, batch, "alice"), expected)
    assert torch.equal(_greedy(remote, batch, preference_id="alice"), _greedy(local, batch, preference_id="alice"))


def test_a_bank_is_one_repo_and_one_user_is_pulled_alone(hub_server: HubServer, world: World):
    model = _fresh(world)
    for name in USERS:
        model.load_preference(world.users[name], name)
    model.preferences.push_to_hub("owner/bank", token=TOKEN)

    repo = hub_server.repo("owner/bank")
    assert repo.private is True, "a bank is private by default"
    assert len(repo.history()) == 2, "every user in one commit"
    files = hub_server.files("owner/bank")
    expected_files = {"bank.json"} | {f"{name}/{file}" for name in USERS for file in EMBEDDING_FILES}
    assert set(files) - {".gitattributes"} == expected_files
    index = json.loads(files["bank.json"])
    assert index["preference_ids"] == list(USERS) and index["fingerprint"] == model.fingerprint()

    hub_server.requests.clear()
    other = _fresh(world)
    other.load_preference("owner/bank", preference_id="bob", subfolder="bob", token=TOKEN)
    assert other.preferences.ids() == ["bob"]
    downloaded = hub_server.downloaded("owner/bank")
    assert {"bob/config.json", "bob/model.safetensors"} <= set(downloaded)
    assert all(name.startswith("bob/") for name in downloaded), downloaded
    assert not [r.path for r in hub_server.requests if "alice" in r.path or "carol" in r.path]
    cached = _cached_files()
    assert not [p for p in cached if "/alice/" in p or "/carol/" in p or p.endswith("bank.json")], cached

    batch = _batch(world)
    assert torch.equal(_user_latents(other, batch, "bob"), _user_latents(model, batch, "bob"))
    assert not torch.equal(_user_latents(model, batch, "bob"), _user_latents(model, batch, "alice"))

    with pytest.raises(OSError, match="dave"):
        other.load_preference("owner/bank", preference_id="dave", subfolder="dave", token=TOKEN)
    assert other.preferences.ids() == ["bob"]


def test_a_user_pushed_into_a_folder_of_a_shared_repo(hub_server: HubServer, world: World):
    embedding = PreferenceEmbedding.from_pretrained(world.users["carol"])
    embedding.push_to_hub("owner/shared", path_in_repo="users/carol", token=TOKEN)
    assert set(hub_server.files("owner/shared")) - {".gitattributes"} == {f"users/carol/{f}" for f in EMBEDDING_FILES}
    model = _fresh(world)
    model.load_preference("owner/shared", preference_id="carol", subfolder="users/carol")
    _assert_same_tensors(model.preferences.get("carol").state_dict(), embedding.state_dict())


# ----------------------------------------------------------------------
# Offline
# ----------------------------------------------------------------------
def test_offline_loads_from_the_cache_without_requests(
    hub_server: HubServer, world: World, monkeypatch: pytest.MonkeyPatch
):
    model = _fresh(world)
    for name in USERS:
        model.load_preference(world.users[name], name)
    model.push_to_hub("owner/backbone", token=TOKEN)
    PreferenceEmbedding.from_pretrained(world.users["alice"]).push_to_hub("owner/user-a", token=TOKEN)
    model.preferences.push_to_hub("owner/bank", token=TOKEN)
    # Pull everything once, online.
    for loader in LOADERS:
        loader.from_pretrained("owner/backbone")
    online = _fresh(world)
    online.load_preference("owner/user-a", preference_id="alice")
    online.load_preference("owner/bank", preference_id="bob", subfolder="bob", token=TOKEN)

    _go_offline(monkeypatch)
    before = len(hub_server.requests)
    batch = _batch(world)
    for loader in LOADERS:
        offline = loader.from_pretrained("owner/backbone")
        _assert_same_tensors(_latent_tensors(offline), _latent_tensors(model))
    offline.load_preference("owner/user-a", preference_id="alice")
    offline.load_preference("owner/bank", preference_id="bob", subfolder="bob", token=TOKEN)
    assert offline.preferences.ids() == ["alice", "bob"]
    for name in ("alice", "bob"):
        assert torch.equal(_user_latents(offline, batch, name), _user_latents(model, batch, name))
    embedding = PreferenceEmbedding.from_pretrained("owner/user-a")
    _assert_same_tensors(embedding.state_dict(), model.preferences.get("alice").state_dict())

    # What was never pulled is a clear error, still without a request.
    with pytest.raises(OSError, match="owner/never-pulled"):
        PrefAlignForCausalLM.from_pretrained("owner/never-pulled")
    with pytest.raises(OSError, match="owner/bank") as excinfo:
        offline.load_preference("owner/bank", preference_id="carol", subfolder="carol", token=TOKEN)
    assert "carol" in str(excinfo.value)
    assert "carol" not in offline.preferences
    assert len(hub_server.requests) == before, [r.path for r in hub_server.requests[before:]]


# ----------------------------------------------------------------------
# Model cards
# ----------------------------------------------------------------------
def test_hub_id_or_none_declares_only_hub_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert (
        hub_id_or_none(EMBEDDED_DEFAULT_BASE) == EMBEDDED_DEFAULT_BASE_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert hub_id_or_none("owner/name") == "owner/name"
    assert hub_id_or_none("Org-1/model.v2_x") == "Org-1/model.v2_x"
    assert hub_id_or_none(None) is None and hub_id_or_none("") is None
    assert hub_id_or_none(str(tmp_path)) is None  # an absolute local path
    assert hub_id_or_none("a/b/c") is None
    (tmp_path / "local" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub_id_or_none("local/base") is None, "an existing relative path is local, not a Hub id"


def test_backbone_card_parses_back_and_maps_the_embedded_default(hub_server: HubServer, world: World, tmp_path: Path):
    model = _fresh(world)
    model.push_to_hub("owner/backbone", token=TOKEN)
    card = ModelCard.load(hf_hub_download("owner/backbone", "README.md"))
    data = _assert_card_round_trips(card)
    assert data.get("base_model") is None, "the base is a local path"
    assert data["pipeline_tag"] == "text-generation"
    assert 'AutoModelForCausalLM.from_pretrained("owner/backbone")' in card.text
    assert f"{model.num_latent_parameters():,}" in card.text

    # The embedded default's reference is declared as its Hub origin (and never downloaded).
    model.config.base_model_name_or_path = EMBEDDED_DEFAULT_BASE
    generated = backbone_card(model, repo_id="owner/smol-prefalign")
    assert generated.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert generated.data.base_model_relation == "adapter"
    generated.save(tmp_path / "README.md")
    reloaded = ModelCard.load(tmp_path / "README.md")
    assert _assert_card_round_trips(reloaded)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_backbone_card_after_clap_records_the_training(hub_server: HubServer, tmp_path: Path):
    model = PrefAlignForCausalLM.from_base(make_tiny_base("llama"), latent_dim=LATENT_DIM)
    args = CLaPConfig(
        output_dir=str(tmp_path / "clap"),
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
        max_steps=3,
        logging_steps=1,
    )
    trainer = CLaPTrainer(
        model,
        args,
        train_dataset=make_tiny_pool(num_prompts=4, num_responses=3),
        eval_dataset=make_tiny_pool(num_prompts=2, num_responses=3, seed=1),
        processing_class=make_tiny_tokenizer(),
    )
    trainer.train()
    trainer.evaluate()
    summary = model.training_summary
    assert summary["steps"] == 3 and summary["prompts"] == 4 and summary["responses"] == 12
    for key in ("loss/nll", "loss/kl", "loss/contrastive", "contrastive/accuracy", "latent/active_dims"):
        assert key in summary["final_metrics"], summary["final_metrics"]
    assert summary["evaluation"], summary

    model.push_to_hub("owner/clap-backbone", token=TOKEN)
    readme = hub_server.files("owner/clap-backbone")["README.md"].decode()
    assert "## Training (CLaP)" in readme
    assert "| steps | 3 |" in readme
    assert "| training prompts | 4 |" in readme and "| responses | 12 |" in readme
    for key, value in summary["final_metrics"].items():
        assert f"| final `{key}` | {value} |" in readme, key
    for key, value in summary["evaluation"].items():
        assert f"| evaluation `{key}` | {value} |" in readme, key
    assert f"| `kl_weight` | {args.kl_weight} |" in readme
    _assert_card_round_trips(ModelCard.load(hf_hub_download("owner/clap-backbone", "README.md")))
    pulled = PrefAlignForCausalLM.from_pretrained("owner/clap-backbone", base_model=make_tiny_base("llama"))
    assert pulled.training_summary == summary


def _words(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z0-9_]+", text))


def test_preference_card_holds_no_user_text_and_records_training(hub_server: HubServer, world: World):
    model = _fresh(world)
    for name in USERS:
        model.load_preference(world.users[name], name)
    model.preferences.push_to_hub("owner/bank", token=TOKEN)
    PreferenceEmbedding.from_pretrained(world.users["alice"]).push_to_hub("owner/user-a", token=TOKEN)

    readmes = {
        "alice": hub_server.files("owner/user-a")["README.md"].decode(),
        **{name: hub_server.files("owner/bank")[f"{name}/README.md"].decode() for name in USERS},
    }
    for name, readme in readmes.items():
        card = ModelCard(readme)
        _assert_card_round_trips(card)
        user_words = {word for row in world.rows[name] for text in row.values() for word in text.split()}
        leaked = user_words & _words(readme)
        assert not leaked, f"{name}'s card holds words of its training pairs: {sorted(leaked)}"
        for row in world.rows[name]:
            assert row["prompt"] not in readme and row["chosen"] not in readme and row["rejected"] not in readme
        training = model.preferences.get(name).config.training
        assert training["pairs"] == 24
        for key in ("pairs", "steps", "beta", "rewards_accuracy_last_log"):
            assert f"| {key} | {training[key]} |" in readme, key
        assert model.fingerprint()[:16] in readme
    for name in USERS:  # a bank's cards never name their user
        assert not set(USERS) & _words(readmes[name].lower()), name


@pytest.mark.parametrize("loader", LOADERS, ids=LOADER_IDS)
def test_preference_card_links_a_hub_backbone(hub_server: HubServer, world: World, tmp_path: Path, loader):
    # docs/hub.md: the preference card names "the backbone it belongs to (linked when it is a Hub repo)".
    _fresh(world).push_to_hub("owner/backbone", token=TOKEN)
    backbone = loader.from_pretrained("owner/backbone")
    trainer = LatentDPOTrainer(
        backbone,
        _dpo_config(tmp_path / "dpo", max_steps=1),
        train_dataset=Dataset.from_list(world.rows["alice"][:8]),
        processing_class=world.tokenizer,
    )
    trainer.train()
    card = preference_card(trainer.model, repo_id="owner/user-a")
    assert card.data.base_model == "owner/backbone", (
        f"the embedding records backbone={trainer.model.config.backbone!r} for a backbone pulled from 'owner/backbone'"
    )
    assert "https://huggingface.co/owner/backbone" in card.text


# ----------------------------------------------------------------------
# Bad input: clear errors, nothing registered, retries start clean
# ----------------------------------------------------------------------
def test_a_missing_repo_is_an_oserror_naming_it(hub_server: HubServer, world: World):
    with pytest.raises(OSError, match="owner/nope"):
        PrefAlignForCausalLM.from_pretrained("owner/nope")
    with pytest.raises(OSError, match="owner/nope"):
        AutoModelForCausalLM.from_pretrained("owner/nope")
    with pytest.raises(OSError, match="owner/nope"):
        PreferenceEmbedding.from_pretrained("owner/nope")
    model = _fresh(world)
    with pytest.raises(OSError, match="owner/nope"):
        model.load_preference("owner/nope", preference_id="alice")
    with pytest.raises(OSError, match="owner/nope"):
        model.load_preference("owner/nope", preference_id="alice", subfolder="alice")
    assert model.preferences.ids() == []


def test_a_repo_holding_a_plain_gpt2_is_named_as_such(hub_server: HubServer, world: World, tmp_path: Path):
    make_tiny_base("gpt2").save_pretrained(tmp_path / "gpt2")
    _upload(hub_server, "owner/plain-gpt2", tmp_path / "gpt2")
    with pytest.raises(ValueError, match="holds a 'gpt2' model, not a PrefAlign backbone"):
        PrefAlignForCausalLM.from_pretrained("owner/plain-gpt2")
    with pytest.raises(ValueError, match="is not a PrefAlign preference embedding"):
        PreferenceEmbedding.from_pretrained("owner/plain-gpt2")
    model = _fresh(world)
    with pytest.raises(ValueError, match="is not a PrefAlign preference embedding"):
        model.load_preference("owner/plain-gpt2", preference_id="alice")
    assert model.preferences.ids() == []


def test_a_repo_holding_other_files_is_a_clear_error(hub_server: HubServer, world: World, tmp_path: Path):
    _upload_files(hub_server, tmp_path, "owner/random-json", {"config.json": b'{"hello": "world"}'})
    _upload_files(hub_server, tmp_path, "owner/no-config", {"data.json": b"[1, 2, 3]"})
    model = _fresh(world)
    with pytest.raises(ValueError, match="not a PrefAlign backbone"):
        PrefAlignForCausalLM.from_pretrained("owner/random-json")
    with pytest.raises(ValueError, match="is not a PrefAlign preference embedding"):
        model.load_preference("owner/random-json", preference_id="alice")
    with pytest.raises(OSError, match="not a saved PrefAlign backbone"):
        PrefAlignForCausalLM.from_pretrained("owner/no-config")
    with pytest.raises(OSError, match="config.json"):
        model.load_preference("owner/no-config", preference_id="alice")
    assert model.preferences.ids() == []


def _embedding_files(world: World, name: str = "alice") -> dict[str, bytes]:
    return {file: (world.users[name] / file).read_bytes() for file in EMBEDDING_FILES}


@pytest.mark.parametrize("damage", ["missing", "garbage", "truncated", "empty"])
def test_missing_or_corrupt_embedding_weights_register_nothing(
    hub_server: HubServer, world: World, tmp_path: Path, damage: str
):
    files = _embedding_files(world)
    weights = files.pop("model.safetensors")
    if damage != "missing":
        files["model.safetensors"] = {
            "garbage": b"this is not a safetensors file at all",
            "truncated": weights[: len(weights) // 2],
            "empty": b"",
        }[damage]
    _upload_files(hub_server, tmp_path, "owner/broken-user", files)
    model = _fresh(world)
    with pytest.raises(OSError, match="model.safetensors"):
        model.load_preference("owner/broken-user", preference_id="alice")
    assert model.preferences.ids() == []
    assert "alice" not in model.preferences


def test_corrupt_backbone_weights_are_an_oserror(hub_server: HubServer, world: World, tmp_path: Path):
    files = {name: (world.backbone_dir / name).read_bytes() for name in BACKBONE_FILES}
    files["model.safetensors"] = files["model.safetensors"][:100]
    _upload_files(hub_server, tmp_path, "owner/broken-backbone", files)
    with pytest.raises(OSError, match="model.safetensors"):
        PrefAlignForCausalLM.from_pretrained("owner/broken-backbone")


def test_a_user_of_another_backbone_is_refused(hub_server: HubServer, world: World):
    PreferenceEmbedding.from_pretrained(world.users["alice"]).push_to_hub("owner/user-a", token=TOKEN)
    bank_owner = _fresh(world)
    bank_owner.load_preference(world.users["bob"], "bob")
    bank_owner.preferences.push_to_hub("owner/bank", token=TOKEN)

    other = PrefAlignForCausalLM.from_base(str(world.base_path), latent_dim=LATENT_DIM).eval()
    _perturb(other, seed=9)
    assert other.fingerprint() != bank_owner.fingerprint()
    with pytest.raises(ValueError, match="another backbone"):
        other.load_preference("owner/user-a", preference_id="alice")
    with pytest.raises(ValueError, match="another backbone"):
        other.load_preference("owner/bank", preference_id="bob", subfolder="bob", token=TOKEN)
    assert other.preferences.ids() == []


def _flaky_snapshot_download(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The first download gets the JSON files into the cache, then the connection drops; later ones succeed."""
    real = transfer.snapshot_download
    calls: list[dict] = []

    def flaky(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            patterns = [f"{p.removesuffix('*')}*.json" for p in kwargs.get("allow_patterns") or ["*"]]
            real(*args, **{**kwargs, "allow_patterns": patterns})
            raise ConnectionError("simulated: connection reset by peer while downloading model.safetensors")
        return real(*args, **kwargs)

    monkeypatch.setattr(transfer, "snapshot_download", flaky)
    return calls


@pytest.mark.parametrize("layout", ["own-repo", "bank-folder"])
def test_an_interrupted_user_download_registers_nothing_and_a_retry_works(
    hub_server: HubServer, world: World, monkeypatch: pytest.MonkeyPatch, layout: str
):
    owner = _fresh(world)
    owner.load_preference(world.users["alice"], "alice")
    if layout == "own-repo":
        owner.preferences.get("alice").push_to_hub("owner/user-a", token=TOKEN)
        where = {"path": "owner/user-a"}
    else:
        owner.preferences.push_to_hub("owner/bank", token=TOKEN)
        where = {"path": "owner/bank", "subfolder": "alice", "token": TOKEN}
    calls = _flaky_snapshot_download(monkeypatch)

    model = _fresh(world)
    with pytest.raises(OSError):
        model.load_preference(**where, preference_id="alice")
    assert model.preferences.ids() == [] and "alice" not in model.preferences
    assert any(p.endswith("config.json") for p in _cached_files()), "the interrupted pull left partial files"

    model.load_preference(**where, preference_id="alice")
    assert len(calls) == 2 and model.preferences.ids() == ["alice"]
    batch = _batch(world)
    assert torch.equal(_user_latents(model, batch, "alice"), _user_latents(owner, batch, "alice"))


def test_an_interrupted_backbone_download_is_an_error_and_a_retry_works(
    hub_server: HubServer, world: World, monkeypatch: pytest.MonkeyPatch
):
    model = _fresh(world)
    model.push_to_hub("owner/backbone", token=TOKEN)
    calls = _flaky_snapshot_download(monkeypatch)
    with pytest.raises(OSError):
        PrefAlignForCausalLM.from_pretrained("owner/backbone")
    pulled = PrefAlignForCausalLM.from_pretrained("owner/backbone")
    assert len(calls) == 2
    _assert_same_tensors(_latent_tensors(pulled), _latent_tensors(model))


# ----------------------------------------------------------------------
# The trainers' cards and pushes, and saving over an existing card
# ----------------------------------------------------------------------
def test_latent_dpo_trainer_push_to_hub_uploads_the_preference_card(hub_server: HubServer, world: World, tmp_path):
    trainer = LatentDPOTrainer(
        _fresh(world),
        _dpo_config(tmp_path / "user", hub_model_id="owner/trained-user", num_train_epochs=1),
        train_dataset=Dataset.from_list(world.rows["alice"]),
        processing_class=world.tokenizer,
    )
    trainer.train()
    trainer.create_model_card(tags=["my-tag"])
    local = ModelCard.load(tmp_path / "user" / "README.md")
    assert local.data.library_name == "hf-prefalign" and "my-tag" in local.data.tags
    assert "user preference embedding" in local.text and "trl" not in (local.data.tags or [])

    trainer.push_to_hub(token=TOKEN)
    files = hub_server.files("owner/trained-user")
    assert set(files) - {".gitattributes"} == EMBEDDING_FILES, sorted(files)
    card = ModelCard(files["README.md"].decode())
    data = _assert_card_round_trips(card)
    assert "latent-dpo" in data["tags"] and "## Training (Latent DPO)" in card.text
    assert "Direct Preference Optimization" not in card.text  # TRL's LM card cites the DPO paper
    assert PreferenceEmbedding.from_pretrained("owner/trained-user").config.training["pairs"] == 24


def test_clap_trainer_push_to_hub_uploads_the_backbone_card_and_no_training_state(hub_server: HubServer, tmp_path):
    args = CLaPConfig(
        output_dir=str(tmp_path / "clap"),
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="steps",
        save_steps=1,
        max_steps=2,
        hub_model_id="owner/clap-pushed",
    )
    trainer = CLaPTrainer(
        PrefAlignForCausalLM.from_base(make_tiny_base("llama"), latent_dim=LATENT_DIM),
        args,
        train_dataset=make_tiny_pool(num_prompts=4, num_responses=3),
        processing_class=make_tiny_tokenizer(),
    )
    trainer.train()
    trainer.create_model_card()
    assert "## Training (CLaP)" in (tmp_path / "clap" / "README.md").read_text()
    trainer.push_to_hub(token=TOKEN, tags="extra-tag")
    files = set(hub_server.files("owner/clap-pushed"))
    assert BACKBONE_FILES <= files and "tokenizer.json" in files
    assert not {"training_args.bin", "optimizer.pt", "rng_state.pth"} & files
    assert not [f for f in files if f.startswith("checkpoint-")], sorted(files)
    card = ModelCard(hub_server.files("owner/clap-pushed")["README.md"].decode())
    data = _assert_card_round_trips(card)
    assert "clap" in data["tags"] and "extra-tag" in data["tags"] and "## Training (CLaP)" in card.text
    assert 'AutoTokenizer.from_pretrained("owner/clap-pushed")' in card.text


def test_saving_updates_an_existing_card_instead_of_replacing_it(world: World, tmp_path: Path):
    model = _fresh(world)
    folder = tmp_path / "backbone"
    folder.mkdir()
    (folder / "README.md").write_text(
        "---\nlicense: mit\ntags:\n- mine\n---\n\n# My backbone\n\nHand-written notes.\n"
    )
    model.save_pretrained(folder)
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "mit" and card.data.library_name == "hf-prefalign"
    assert card.data.tags[0] == "mine" and "prefalign" in card.data.tags
    assert "Hand-written notes." in card.text and "## Architecture" not in card.text  # a hand-written card is kept

    # A generated card with the user's own text around its generated section: the section is regenerated.
    other = tmp_path / "generated"
    model.save_pretrained(other)
    text = (other / "README.md").read_text()
    (other / "README.md").write_text(text.replace("---\n\n", "---\n\nIntro by the owner.\n\n", 1) + "\nOutro.\n")
    model.training_summary = {"steps": 7, "prompts": 1, "responses": 2, "train_seconds": 0.1}
    model.training_summary |= {"settings": {}, "final_metrics": {}}
    model.save_pretrained(other)
    updated = (other / "README.md").read_text()
    assert "Intro by the owner." in updated and "Outro." in updated and "| steps | 7 |" in updated
    assert updated.count("## Architecture") == 1

    embedding = PreferenceEmbedding.from_pretrained(world.users["alice"])
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "README.md").write_text("# Alice's style\n")
    embedding.save_pretrained(tmp_path / "user")
    card = ModelCard.load(tmp_path / "user" / "README.md")
    assert card.text.strip() == "# Alice's style" and card.data.library_name == "hf-prefalign"


def test_the_card_base_model_is_what_the_config_reference_resolves_to(world: World):
    model = _fresh(world)
    model.config.base_model_name_or_path = EMBEDDED_DEFAULT_BASE
    card = backbone_card(model)
    assert card.data.base_model == hub_id_or_none(model.config.base_model_name_or_path) == EMBEDDED_DEFAULT_BASE_HUB_ID
    assert f"`{EMBEDDED_DEFAULT_BASE}` (card metadata `base_model`: [{EMBEDDED_DEFAULT_BASE_HUB_ID}]" in card.text
