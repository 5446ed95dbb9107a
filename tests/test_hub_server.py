"""Tests of the Hub test double (tests/hub_server.py), through the real `huggingface_hub` client and transformers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hub_server import HubServer, hub_server_fixture, serve_hub  # noqa: F401
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


TOKEN = "hf_test_token"
BINARY = bytes(range(256)) * 4 + b"\x00\xff"


def make_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def cached_files() -> list[Path]:
    return (
        [p for p in Path(constants.HF_HUB_CACHE).rglob("*") if p.is_file()]
        if os.path.isdir(constants.HF_HUB_CACHE)
        else []
    )


@pytest.fixture
def api(hub_server: HubServer) -> HfApi:
    return HfApi(endpoint=hub_server.endpoint, token=TOKEN)


def test_create_repo_records_private_flag(hub_server: HubServer, api: HfApi):
    url = api.create_repo("owner/secret", private=True)
    api.create_repo("owner/open")
    assert url.repo_id == "owner/secret" and url.endpoint == hub_server.endpoint
    assert hub_server.repo("owner/secret").private is True
    assert hub_server.repo("owner/open").private is False
    assert api.model_info("owner/secret").private is True
    assert [c.title for c in hub_server.repo("owner/secret").history()] == ["initial commit"]

    assert api.create_repo("owner/secret", exist_ok=True).repo_id == "owner/secret"
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("owner/secret")
    assert conflict.value.response.status_code == 409
    assert len(hub_server.repo("owner/secret").commits) == 1


def test_upload_folder_then_download_into_empty_cache(hub_server: HubServer, api: HfApi, tmp_path: Path):
    config = json.dumps({"answer": 42}).encode()
    api.create_repo("owner/tiny")
    info = api.upload_folder(
        repo_id="owner/tiny", folder_path=make_folder(tmp_path / "up", {"config.json": config, "weights.bin": BINARY})
    )
    assert info.oid == hub_server.repo("owner/tiny").branches["main"]
    stored = hub_server.files("owner/tiny")
    assert (stored["config.json"], stored["weights.bin"]) == (config, BINARY)
    assert len(hub_server.repo("owner/tiny").history()) == 2  # "initial commit" (.gitattributes) + the upload
    siblings = {s.rfilename for s in api.model_info("owner/tiny").siblings}
    assert siblings == {".gitattributes", "config.json", "weights.bin"}

    assert cached_files() == []
    for name, data in (("config.json", config), ("weights.bin", BINARY)):
        path = hf_hub_download("owner/tiny", name)
        assert Path(path).is_relative_to(constants.HF_HUB_CACHE)
        assert Path(path).read_bytes() == data
    assert hub_server.downloaded("owner/tiny") == ["config.json", "weights.bin"]
    assert [r.method for r in hub_server.requests if "/resolve/" in r.path] == ["HEAD", "GET"] * 2


def test_two_pushes_and_older_revision_by_commit_sha(hub_server: HubServer, api: HfApi):
    api.create_repo("owner/versions")
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="value.txt", repo_id="owner/versions")
    second = api.upload_file(
        path_or_fileobj=b"v2", path_in_repo="value.txt", repo_id="owner/versions", commit_message="second"
    )
    assert first.oid != second.oid and len(first.oid) == 40
    history = hub_server.repo("owner/versions").history()
    assert [c.oid for c in history[1:]] == [first.oid, second.oid]
    assert [c.commit_id for c in api.list_repo_commits("owner/versions")] == [c.oid for c in reversed(history)]
    assert api.list_repo_refs("owner/versions").branches[0].target_commit == second.oid

    assert Path(hf_hub_download("owner/versions", "value.txt")).read_bytes() == b"v2"
    assert Path(hf_hub_download("owner/versions", "value.txt", revision=first.oid)).read_bytes() == b"v1"
    assert api.model_info("owner/versions", revision=first.oid).sha == first.oid
    assert hub_server.files("owner/versions", revision=first.oid)["value.txt"] == b"v1"


def test_token_is_sent_as_bearer(hub_server: HubServer, api: HfApi):
    api.create_repo("owner/auth")
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="owner/auth")
    assert {r.headers.get("authorization") for r in hub_server.requests} == {f"Bearer {TOKEN}"}

    hub_server.requests.clear()
    hf_hub_download("owner/auth", "x.txt", token="hf_other")
    assert {r.headers.get("authorization") for r in hub_server.requests} == {"Bearer hf_other"}

    hub_server.requests.clear()
    hf_hub_download("owner/auth", "x.txt", force_download=True)  # no token given, none stored
    assert {r.headers.get("authorization") for r in hub_server.requests} == {None}
    assert api.whoami()["name"] == hub_server.username


def test_private_repo_needs_a_token(hub_server: HubServer, api: HfApi):
    api.create_repo("owner/private", private=True)
    api.upload_file(path_or_fileobj=b"secret", path_in_repo="s.txt", repo_id="owner/private")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("owner/private", "s.txt")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub_server.endpoint).model_info("owner/private")
    assert Path(hf_hub_download("owner/private", "s.txt", token=TOKEN)).read_bytes() == b"secret"


def test_snapshot_download_allow_patterns(hub_server: HubServer, api: HfApi, tmp_path: Path):
    files = {"sub/a.json": b'{"a": 1}', "sub/deeper/b.bin": BINARY, "top.txt": b"top"}
    api.create_repo("owner/snap")
    api.upload_folder(repo_id="owner/snap", folder_path=make_folder(tmp_path / "up", files))

    folder = Path(snapshot_download("owner/snap", allow_patterns="sub/*"))
    local = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert local == {"sub/a.json", "sub/deeper/b.bin"}
    assert (folder / "sub/deeper/b.bin").read_bytes() == BINARY
    assert sorted(hub_server.downloaded("owner/snap")) == ["sub/a.json", "sub/deeper/b.bin"]
    assert folder.name == hub_server.repo("owner/snap").branches["main"]

    full = Path(snapshot_download("owner/snap", repo_type="model"))
    assert {p.relative_to(full).as_posix() for p in full.rglob("*") if p.is_file()} == {".gitattributes", *files}


def test_offline_mode_loads_from_cache_without_requests(
    hub_server: HubServer, api: HfApi, monkeypatch: pytest.MonkeyPatch
):
    api.create_repo("owner/offline")
    api.upload_file(path_or_fileobj=b"cached", path_in_repo="f.txt", repo_id="owner/offline")
    online = hf_hub_download("owner/offline", "f.txt")
    snapshot = snapshot_download("owner/offline")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(hub_server.requests)
    assert hf_hub_download("owner/offline", "f.txt") == online
    assert Path(online).read_bytes() == b"cached"
    assert snapshot_download("owner/offline") == snapshot
    assert len(hub_server.requests) == before


def test_missing_repo_revision_and_file_raise_specific_errors(hub_server: HubServer, api: HfApi):
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("owner/nope", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("owner/nope")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("owner/nope")

    api.create_repo("owner/exists")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("owner/exists", "missing.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("owner/exists", ".gitattributes", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("owner/exists", revision="0" * 40)


def test_readme_pull_request_branch_and_path_in_repo(hub_server: HubServer, api: HfApi, tmp_path: Path):
    api.create_repo("owner/card")
    card = b"---\nlicense: mit\ntags: [test]\n---\n# Card\n"
    api.upload_folder(
        repo_id="owner/card", folder_path=make_folder(tmp_path / "up", {"README.md": card}), path_in_repo="x"
    )
    assert hub_server.files("owner/card")["x/README.md"] == card  # the client validated the YAML first
    assert any(r.path == "/api/validate-yaml" for r in hub_server.requests)

    pr = api.upload_file(path_or_fileobj=b"proposal", path_in_repo="p.txt", repo_id="owner/card", create_pr=True)
    assert pr.pr_revision == "refs/pr/1" and pr.pr_num == 1
    assert "p.txt" not in hub_server.files("owner/card")
    assert Path(hf_hub_download("owner/card", "p.txt", revision="refs/pr/1")).read_bytes() == b"proposal"
    assert hub_server.downloaded("owner/card") == ["p.txt"]

    api.create_branch("owner/card", branch="dev")
    api.create_branch("owner/card", branch="dev", exist_ok=True)
    api.upload_file(path_or_fileobj=b"dev", path_in_repo="d.txt", repo_id="owner/card", revision="dev")
    refs = api.list_repo_refs("owner/card", include_pull_requests=True)
    assert {b.name for b in refs.branches} == {"main", "dev"} and [p.ref for p in refs.pull_requests] == ["refs/pr/1"]
    assert api.list_repo_files("owner/card", revision="dev") == [".gitattributes", "d.txt", "x/README.md"]
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"?", path_in_repo="q.txt", repo_id="owner/card", revision="no-branch")

    api.delete_folder("x", repo_id="owner/card", revision="dev")
    api.delete_file("d.txt", repo_id="owner/card", revision="dev")
    assert api.list_repo_files("owner/card", revision="dev") == [".gitattributes"]
    assert "x/README.md" in hub_server.files("owner/card")  # main's snapshot is untouched
    with pytest.raises(RemoteEntryNotFoundError):
        api.delete_file("d.txt", repo_id="owner/card", revision="dev")


def test_dataset_repos_use_the_datasets_prefix(hub_server: HubServer, api: HfApi):
    api.create_repo("owner/data", repo_type="dataset", private=True)
    api.upload_file(path_or_fileobj=b"a,b\n1,2\n", path_in_repo="train.csv", repo_id="owner/data", repo_type="dataset")
    assert hub_server.repo("owner/data", repo_type="dataset").private is True
    path = hf_hub_download("owner/data", "train.csv", repo_type="dataset", token=TOKEN)
    assert Path(path).read_bytes() == b"a,b\n1,2\n"
    assert hub_server.downloaded("owner/data", repo_type="dataset") == ["train.csv"]
    assert api.dataset_info("owner/data").sha == hub_server.repo("owner/data", "dataset").branches["main"]


def test_transformers_auto_config_loads_from_the_double(hub_server: HubServer, api: HfApi, tmp_path: Path):
    from transformers import AutoConfig, GPT2Config

    GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50).save_pretrained(tmp_path / "cfg")
    api.create_repo("owner/gpt2-tiny")
    first = api.upload_folder(repo_id="owner/gpt2-tiny", folder_path=tmp_path / "cfg")
    GPT2Config(n_embd=16, n_layer=3, n_head=2, vocab_size=50).save_pretrained(tmp_path / "cfg")
    api.upload_folder(repo_id="owner/gpt2-tiny", folder_path=tmp_path / "cfg")

    config = AutoConfig.from_pretrained("owner/gpt2-tiny")
    assert (config.model_type, config.n_layer, config.vocab_size) == ("gpt2", 3, 50)
    assert AutoConfig.from_pretrained("owner/gpt2-tiny", revision=first.oid).n_layer == 2
    assert "config.json" in hub_server.downloaded("owner/gpt2-tiny")


def test_resolve_headers_and_error_codes_on_the_wire(hub_server: HubServer, api: HfApi):
    import httpx2

    api.create_repo("owner/wire")
    commit = api.upload_file(path_or_fileobj=b"12345", path_in_repo="f.bin", repo_id="owner/wire")
    head = httpx2.head(f"{hub_server.endpoint}/owner/wire/resolve/main/f.bin")
    assert head.status_code == 200 and head.headers["x-repo-commit"] == commit.oid
    assert head.headers["etag"] == f'"{hub_server.repo("owner/wire").resolve("main").files["f.bin"]}"'
    assert head.headers["content-length"] == "5"
    ranged = httpx2.get(f"{hub_server.endpoint}/owner/wire/resolve/{commit.oid}/f.bin", headers={"Range": "bytes=2-"})
    assert (ranged.status_code, ranged.content) == (206, b"345")
    for path, code in (
        ("owner/wire/resolve/main/nope", "EntryNotFound"),
        ("owner/none/resolve/main/f.bin", "RepoNotFound"),
    ):
        assert httpx2.head(f"{hub_server.endpoint}/{path}").headers["x-error-code"] == code
    assert (
        httpx2.get(f"{hub_server.endpoint}/owner/wire/resolve/dev/f.bin").headers["x-error-code"] == "RevisionNotFound"
    )

    assert httpx2.get(f"{hub_server.endpoint}/api/spaces-hardware").status_code == 404
    assert hub_server.errors == ["GET /api/spaces-hardware: not implemented"]
    hub_server.errors.clear()  # else the fixture's teardown fails the test


def test_serve_hub_restores_the_client_and_stops(tmp_path: Path):
    import httpx2
    from huggingface_hub import hf_api

    saved = (constants.ENDPOINT, constants.HF_HUB_CACHE, constants.HF_HUB_DISABLE_XET, hf_api.api.endpoint)
    with serve_hub(tmp_path) as server:
        assert constants.ENDPOINT == hf_api.api.endpoint == server.endpoint == os.environ["HF_ENDPOINT"]
        assert constants.HF_HUB_DISABLE_XET is True
        HfApi(token=TOKEN).create_repo("owner/default-endpoint")  # no endpoint argument: uses the patched one
        assert ("model", "owner/default-endpoint") in server.repos
    assert (constants.ENDPOINT, constants.HF_HUB_CACHE, constants.HF_HUB_DISABLE_XET, hf_api.api.endpoint) == saved
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(server.endpoint + "/api/whoami-v2", timeout=2)
