"""A test double of the Hugging Face Hub's HTTP protocol.

It implements only what `huggingface_hub`'s client (2.4.0) calls for `create_repo`, upload (preupload + commit),
file and snapshot download and revision info, plus the small extras `list_repo_tree`, `list_repo_refs`,
`list_repo_commits`, `create_branch` and `whoami`. It is a pure standard-library `ThreadingHTTPServer` on 127.0.0.1
(free port), run in a background thread; nothing else is contacted.

Usage from a test module (the fixture, named `hub_server`, is function-scoped and needs no conftest.py; importing
it under its function name keeps ruff's F811 quiet where tests take a `hub_server` argument)::

    from hub_server import hub_server_fixture  # noqa: F401  (provides the `hub_server` fixture)

    def test_push(hub_server, tmp_path):
        api = HfApi(endpoint=hub_server.endpoint, token="hf_test")
        api.create_repo("me/tiny", private=True)
        ...
        assert hub_server.repo("me/tiny").private
        assert [c.title for c in hub_server.repo("me/tiny").history()] == ["initial commit", "Upload ..."]
        assert hub_server.downloaded("me/tiny") == ["config.json"]
        assert all(r.headers["authorization"] == "Bearer hf_test" for r in hub_server.requests)

For a wider scope, use the context manager: `with serve_hub(tmp_path_factory.mktemp("hub")) as server: yield server`.

While the server runs, the real client talks to it: `HF_ENDPOINT` is set and the copies the client took at import
time are patched (`constants.ENDPOINT`, `constants.HUGGINGFACE_CO_URL_TEMPLATE`, the default `hf_api.api` instance's
endpoint, transformers' cached `HfApi`), the cache, home and token paths point into a fresh tmp dir (the cache starts
empty, no stored token is picked up, `HF_TOKEN` is unset), Xet and telemetry are off (the env vars alone do nothing,
`constants` reads them at import) and `HF_HUB_OFFLINE` is off. Socket connections and DNS look-ups for anything but
loopback are refused and recorded in `server.blocked_connections`, which must be empty at the end. Everything is
restored and the server is shut down afterwards.

Storage: blobs are files under the server's tmp dir, named by their git blob sha1 (which is also the ETag and the
`blobId`). Each repo ("model", "dataset" or "space", id "owner/name") has branches ("main" at creation) pointing to
commits; a commit is a full snapshot, a copy-on-write dict `path -> blob sha`, with a random 40-hex sha. A revision is
a branch name or a full commit sha. New repos hold a `.gitattributes` file, as on the Hub.

Any `Authorization: Bearer <token>` is accepted and means user `server.username`. Private repos answer 401 with
`X-Error-Code: RepoNotFound` without one (the client raises `RepositoryNotFoundError`), missing repos 404 with the same
code; writes (create, preupload, commit) need a token. The preupload answers "regular" for every file, so contents come
inline (base64) in the commit's NDJSON; `create_pr=True` makes a `refs/pr/N` branch, `create_branch` works, README.md
metadata always validates. LFS, Xet, tags, discussions and deletions of repos/branches are not implemented. A route it
does not implement (404) or a request it fails on (400, not 5xx, which the client would retry with backoff) is recorded
in `server.errors`, which must be empty at the end: the fixture's teardown asserts it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest


REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # percent-decoded URL path, without the query string
    raw_path: str  # the path as sent (a revision like `refs/pr/1` is one `refs%2Fpr%2F1` segment)
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lower-cased


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, str]  # path -> blob sha: the full snapshot


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    @property
    def url_path(self) -> str:
        return URL_PREFIXES[self.repo_type] + self.repo_id

    def resolve(self, revision: str) -> Commit | None:
        return self.commits.get(self.branches.get(revision, revision))

    def history(self, revision: str = "main") -> list[Commit]:
        """Commits reachable from `revision`, oldest first."""
        commits, commit = [], self.resolve(revision)
        while commit is not None:
            commits.append(commit)
            commit = self.commits.get(commit.parent) if commit.parent else None
        return commits[::-1]


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


class HubServer:
    """The Hub's state (repos in memory, blobs on disk) and the HTTP server that serves it."""

    def __init__(self, root: Path, username: str = "test-user"):
        self.blobs = Path(root) / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.username = username
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[RecordedRequest] = []
        self.blocked_connections: list[object] = []
        self.errors: list[str] = []  # requests the double failed on or does not implement
        self.lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hub-server", daemon=True)

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    # -- inspection helpers -------------------------------------------------------------------------------------
    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        commit = self.repo(repo_id, repo_type).resolve(revision)
        assert commit is not None, f"unknown revision {revision!r}"
        return {path: self.read_blob(oid) for path, oid in commit.files.items()}

    def downloaded(self, repo_id: str, repo_type: str = "model") -> list[str]:
        """Filenames fetched (GET on /resolve/) from `repo_id`, in request order."""
        prefix = f"/{URL_PREFIXES[repo_type]}{repo_id}/resolve/"
        return [
            unquote(r.raw_path[len(prefix) :].split("/", 1)[1])
            for r in self.requests
            if r.method == "GET" and r.raw_path.startswith(prefix)
        ]

    # -- storage ------------------------------------------------------------------------------------------------
    def read_blob(self, oid: str) -> bytes:
        return (self.blobs / oid).read_bytes()

    def write_blob(self, data: bytes) -> str:
        oid = git_blob_sha(data)
        if not (self.blobs / oid).exists():
            (self.blobs / oid).write_bytes(data)
        return oid

    def add_commit(self, repo: Repo, branch: str, title: str, message: str, files: dict[str, str]) -> Commit:
        commit = Commit(
            oid=hashlib.sha1(uuid.uuid4().bytes).hexdigest(),
            parent=repo.branches.get(branch),
            title=title,
            message=message,
            date=time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            files=files,
        )
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit


class _Handler(BaseHTTPRequestHandler):
    server_version = "HubTestDouble/1.0"

    def log_message(self, format, *args):  # noqa: A002 - keep pytest output quiet
        pass

    def do_GET(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    # -- plumbing -----------------------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        self.hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        headers = {name.lower(): value for name, value in self.headers.items()}
        self.hub.requests.append(RecordedRequest(self.command, unquote(url.path), url.path, self.query, headers))
        self.token = headers.get("authorization", "").removeprefix("Bearer ").strip() or None
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if self.command == "POST" else b""
        # Split the raw path before unquoting: revisions come quoted with safe="" (`refs%2Fpr%2F1` is one segment).
        parts = [unquote(part) for part in url.path.strip("/").split("/")]
        try:
            status, payload, extra_headers = self._route(parts, body)
        except HubError as error:
            status, payload = error.status, {"error": str(error)}
            extra_headers = {**error.headers, "X-Error-Message": str(error)}
            if error.code:
                extra_headers["X-Error-Code"] = error.code
        except Exception as error:  # answer 400, not 500: the client retries 5xx with backoff
            self.hub.errors.append(f"{self.command} {self.path}: {error!r}")
            status, payload, extra_headers = 400, {"error": f"Hub test double failed: {error!r}"}, {}
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        extra_headers.setdefault("Content-Type", "application/json")
        for name, value in extra_headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _route(self, parts: list[str], body: bytes) -> tuple[int, object, dict]:
        method = self.command
        if parts == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(json.loads(body))
        if parts == ["api", "validate-yaml"] and method == "POST":  # README.md metadata: accept anything
            return 200, {"errors": [], "warnings": []}, {}
        if parts == ["api", "whoami-v2"] and method == "GET":
            if self.token is None:
                raise HubError(401, "Invalid credentials in Authorization header")
            return 200, {"type": "user", "name": self.hub.username, "orgs": [], "auth": {"type": "access_token"}}, {}
        if len(parts) >= 4 and parts[0] == "api" and parts[1] in REPO_TYPES:
            repo = self._repo(REPO_TYPES[parts[1]], f"{parts[2]}/{parts[3]}")
            action, rest = (parts[4], parts[5:]) if len(parts) > 4 else ("", [])
            if method == "GET" and (action == "" or (action == "revision" and len(rest) == 1)):
                return self._info(repo, rest[0] if rest else "main")
            if method == "GET" and action == "tree" and rest:
                return self._tree(repo, rest[0], "/".join(rest[1:]))
            if method == "GET" and action == "refs":
                return self._refs(repo)
            if method == "POST" and action == "branch" and len(rest) == 1:
                return self._create_branch(repo, rest[0], json.loads(body or b"{}"))
            if method == "GET" and action == "commits" and len(rest) == 1:
                return self._commits(repo, rest[0])
            if method == "POST" and action == "preupload" and len(rest) == 1:
                return self._preupload(repo, rest[0], json.loads(body))
            if method == "POST" and action == "commit" and len(rest) == 1:
                return self._commit(repo, rest[0], body)
        repo_type = REPO_TYPES.get(parts[0]) if parts[0] in ("datasets", "spaces") else "model"
        parts = parts[1:] if repo_type != "model" else parts
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(self._repo(repo_type, f"{parts[0]}/{parts[1]}"), parts[3], "/".join(parts[4:]))
        self.hub.errors.append(f"{method} {self.path}: not implemented")
        raise HubError(404, f"{method} {self.path} is not implemented by the Hub test double")

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if repo.private and self.token is None:
            raise HubError(401, "Invalid username or password.", "RepoNotFound")
        return repo

    def _revision(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _require_token(self) -> None:
        if self.token is None:
            raise HubError(401, "You must be authenticated to write to the Hub")

    # -- endpoints ----------------------------------------------------------------------------------------------
    def _create_repo(self, payload: dict) -> tuple[int, object, dict]:
        self._require_token()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.hub.username}/{payload['name']}"
        url = f"{self.hub.endpoint}/{URL_PREFIXES[repo_type]}{repo_id}"
        with self.hub.lock:
            if (repo_type, repo_id) in self.hub.repos:
                return 409, {"error": f"You already created this {repo_type} repo", "url": url}, {}
            repo = Repo(repo_type, repo_id, private=payload.get("visibility") == "private")
            self.hub.add_commit(
                repo, "main", "initial commit", "", {".gitattributes": self.hub.write_blob(GITATTRIBUTES)}
            )
            self.hub.repos[(repo_type, repo_id)] = repo
        return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

    def _refs(self, repo: Repo) -> tuple[int, object, dict]:
        refs: dict[str, list] = {"branches": [], "pullRequests": [], "converts": [], "tags": []}
        for name, oid in repo.branches.items():
            if name.startswith("refs/pr/"):
                refs["pullRequests"].append({"name": name, "ref": name, "targetCommit": oid})
            else:
                refs["branches"].append({"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid})
        return 200, refs, {}

    def _create_branch(self, repo: Repo, branch: str, payload: dict) -> tuple[int, object, dict]:
        self._require_token()
        with self.hub.lock:
            if branch in repo.branches:
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            repo.branches[branch] = self._revision(repo, payload.get("startingPoint") or "main").oid
        return 200, {}, {}

    def _info(self, repo: Repo, revision: str) -> tuple[int, object, dict]:
        commit = self._revision(repo, revision)
        siblings = [
            {"rfilename": path, "size": (self.hub.blobs / oid).stat().st_size, "blobId": oid}
            for path, oid in sorted(commit.files.items())
        ]
        info = {
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "lastModified": commit.date,
            "createdAt": repo.history()[0].date,
            "tags": [],
            "siblings": siblings,
        }
        return 200, info, {}

    def _tree(self, repo: Repo, revision: str, path: str) -> tuple[int, object, dict]:
        commit = self._revision(repo, revision)
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        paths = sorted(p for p in commit.files if p.startswith(prefix))
        if prefix and not paths:
            raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound")
        entries: dict[str, dict] = {}
        for file_path in paths:
            segments = file_path[len(prefix) :].split("/")
            for depth in range(1, len(segments) if recursive else min(2, len(segments))):
                folder = prefix + "/".join(segments[:depth])
                entries[folder] = {
                    "type": "directory",
                    "oid": git_blob_sha(folder.encode()),
                    "size": 0,
                    "path": folder,
                }
            if recursive or len(segments) == 1:
                oid = commit.files[file_path]
                size = (self.hub.blobs / oid).stat().st_size
                entries[file_path] = {"type": "file", "oid": oid, "size": size, "path": file_path}
        return 200, list(entries.values()), {}

    def _commits(self, repo: Repo, revision: str) -> tuple[int, object, dict]:
        self._revision(repo, revision)
        authors = [{"user": self.hub.username}]
        items = [
            {"id": c.oid, "title": c.title, "message": c.message, "authors": authors, "date": c.date}
            for c in reversed(repo.history(revision))
        ]
        return 200, items, {}

    def _preupload(self, repo: Repo, revision: str, payload: dict) -> tuple[int, object, dict]:
        self._require_token()
        commit = self._revision(repo, revision)
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": commit.files.get(f["path"])}
            for f in payload["files"]
        ]
        return 200, {"files": files, "commitOid": commit.oid}, {}

    def _commit(self, repo: Repo, branch: str, body: bytes) -> tuple[int, object, dict]:
        self._require_token()
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        with self.hub.lock:
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch} (commits go to an existing branch)", "RevisionNotFound")
            head = repo.commits[repo.branches[branch]]
            files = dict(head.files)  # copy-on-write: the parent's snapshot is never modified
            header: dict = {}
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "header":
                    header = value
                    if value.get("parentCommit") not in (None, head.oid):
                        raise HubError(412, "A commit has happened since. Please refresh and try again.")
                elif key == "file":
                    content = value["content"]
                    raw = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                    files[value["path"]] = self.hub.write_blob(raw)
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    files = {p: oid for p, oid in files.items() if not p.startswith(folder)}
                else:
                    raise HubError(400, f"Commit operation {key!r} is not implemented by the Hub test double")
            pr_url = None
            if self.query.get("create_pr") == ["1"]:  # a pull request is a `refs/pr/N` branch off `branch`
                number = 1 + sum(name.startswith("refs/pr/") for name in repo.branches)
                branch, pr_url = f"refs/pr/{number}", f"{self.hub.endpoint}/{repo.url_path}/discussions/{number}"
                repo.branches[branch] = head.oid
            commit = self.hub.add_commit(repo, branch, header.get("summary", ""), header.get("description", ""), files)
        url = f"{self.hub.endpoint}/{repo.url_path}/commit/{commit.oid}"
        return 200, {"success": True, "commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": pr_url}, {}

    def _resolve(self, repo: Repo, revision: str, filename: str) -> tuple[int, object, dict]:
        commit = self._revision(repo, revision)
        oid = commit.files.get(filename)
        if oid is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        data = self.hub.read_blob(oid)
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{oid}"',
            "Accept-Ranges": "bytes",
        }
        start = self.headers.get("Range", "").removeprefix("bytes=").split("-")[0]
        if start.isdigit() and 0 < int(start) < len(data):  # the client resumes with `Range: bytes=N-`
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return 206, data[int(start) :], headers
        return 200, data, headers


# -- pointing the real client at the double ---------------------------------------------------------------------
def _patch_client(server: HubServer, home: Path, mp: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants, hf_api

    cache = home / "hub"
    env = {
        "HF_ENDPOINT": server.endpoint,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "0",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    for name, value in env.items():
        mp.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "TRANSFORMERS_OFFLINE"):
        mp.delenv(name, raising=False)
    values = {  # module-level copies computed once when `constants` was imported
        "ENDPOINT": server.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HUGGINGFACE_HUB_CACHE": str(cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "HF_HUB_DISABLE_XET": True,  # else upload_folder takes the Xet pipeline and downloads may use Xet
        "HF_HUB_DISABLE_TELEMETRY": True,  # else the user agent fetches /api/agent-harnesses
        "HF_HUB_OFFLINE": False,
    }
    for name, value in values.items():
        mp.setattr(constants, name, value)  # raising=True: fail loudly if a later client renames one
    mp.setattr(hf_api.api, "endpoint", server.endpoint)  # behind `huggingface_hub.create_repo`, `upload_file`, ...
    if "transformers.utils.hub" in sys.modules:  # transformers caches one HfApi (and its endpoint)
        mp.setattr(sys.modules["transformers.utils.hub"], "_hf_api", None)

    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def refuse_non_loopback(host: object, what: object) -> None:
        if isinstance(host, str) and not (host.startswith("127.") or host in ("::1", "localhost")):
            server.blocked_connections.append(what)
            raise ConnectionRefusedError(f"hub_server: blocked {what!r} (loopback only)")

    def connect(sock, address):
        refuse_non_loopback(address[0] if isinstance(address, tuple) else None, address)
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):  # no DNS look-up of other hosts either
        refuse_non_loopback(host.decode() if isinstance(host, bytes) else host, host)
        return real_getaddrinfo(host, *args, **kwargs)

    mp.setattr(socket.socket, "connect", connect)
    mp.setattr(socket, "getaddrinfo", getaddrinfo)


@contextlib.contextmanager
def serve_hub(root: Path) -> Iterator[HubServer]:
    """Run a `HubServer` storing under `root`, with the client pointed at it; restore everything on exit."""
    from huggingface_hub.utils import close_session

    with pytest.MonkeyPatch.context() as mp:
        server = HubServer(Path(root) / "server").start()
        try:
            _patch_client(server, Path(root) / "home", mp)
            close_session()  # a fresh client session (and env, e.g. NO_PROXY) for this server
            yield server
        finally:
            close_session()
            server.stop()
            hub_module = sys.modules.get("transformers.utils.hub")
            if hub_module is not None and getattr(hub_module._hf_api, "endpoint", None) == server.endpoint:
                hub_module._hf_api = None  # created during the test (transformers imported late): forget it
    assert not server.blocked_connections, f"non-loopback connections attempted: {server.blocked_connections}"
    assert not server.errors, f"the Hub test double failed on: {server.errors}"


@pytest.fixture(name="hub_server")
def hub_server_fixture(tmp_path: Path) -> Iterator[HubServer]:
    """A running Hub test double; the `huggingface_hub` client (and transformers) talk to it for this test."""
    with serve_hub(tmp_path / "hub") as server:
        yield server


hub_server = hub_server_fixture  # `from hub_server import hub_server` works too, but ruff then flags F811 at each use
