"""A small Hugging Face Hub-compatible HTTP server for tests (stdlib only, 127.0.0.1, random ports).

It implements what the real `huggingface_hub` client calls to create repos and branches, upload
folders (regular files inline in the ndjson commit, weights through the LFS batch API with the
"basic" transfer and a verify step), read repo info, trees and refs, and download files (HEAD/GET
``resolve`` with ``ETag``/``X-Repo-Commit``/``Content-Length``, LFS files redirected to a second
"storage" port with a signed URL, as the real Hub redirects to its CDN). Tokens are accepted or
refused per user and role, private repos are hidden from others, and faults can be injected per
endpoint: an HTTP status N times, or a dropped connection (the request is read, then the socket is
closed with no answer).

Everything lives in memory; a test builds a `LocalHub`, points the client at ``hub.endpoint``
(see the ``local_hub`` fixture in ``tests/conftest.py``) and inspects ``hub.files(...)``,
``hub.commits(...)`` and ``hub.requests`` afterwards.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit


__all__ = ["LocalHub", "Request"]

LFS_PATTERNS = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".onnx",
    ".model",
    ".npy",
    ".npz",
    ".gguf",
    ".tar",
    ".gz",
    ".zip",
    ".parquet",
    ".arrow",
)
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{ext} filter=lfs diff=lfs merge=lfs -text\n" for ext in LFS_PATTERNS).encode()
_REVISION_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


@dataclass
class Entry:
    """A file in a commit: regular content is kept in ``blobs`` by git oid, LFS content in ``lfs`` by sha256."""

    size: int
    git_oid: str
    lfs_oid: str | None = None


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, Entry]
    title: str
    description: str = ""
    date: str = field(default_factory=_now)


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs_oids: set[str] = field(default_factory=set)
    created: str = field(default_factory=_now)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]


@dataclass
class Request:
    """One request as the server saw it (for assertions: which endpoints, how often, authenticated or not)."""

    method: str
    endpoint: str
    path: str
    authenticated: bool
    status: int | None = None


@dataclass
class _Fault:
    endpoint: str
    kind: str  # "status" or "drop"
    status: int
    remaining: int
    message: str | None = None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def _not_found(kind: str, message: str, headers: dict | None = None) -> HubError:
    return HubError(404, message, kind, headers)


class LocalHub:
    """In-memory Hub on two loopback ports: ``endpoint`` (API, git LFS, resolve) and ``storage`` (LFS blobs).

    ``tokens`` maps a token to ``(user, role)`` with role ``"read"`` or ``"write"``; ``orgs`` maps an
    organisation to the users who may write to it.
    """

    def __init__(self, tokens: dict[str, tuple[str, str]] | None = None, orgs: dict[str, set[str]] | None = None):
        self.tokens = dict(tokens or {})
        self.orgs = {k: set(v) for k, v in (orgs or {}).items()}
        self.repos: dict[tuple[str, str], Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[Request] = []
        self._faults: list[_Fault] = []
        self._lock = threading.RLock()
        self._secret = secrets.token_bytes(16)
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self.endpoint = ""
        self.storage = ""

    # ----------------------------------------------------------------------------- lifecycle
    def start(self) -> LocalHub:
        for role in ("api", "storage"):
            handler = type(f"_{role.title()}Handler", (_Handler,), {"hub": self, "role": role})
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            server.daemon_threads = True
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        self.endpoint = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.storage = f"http://127.0.0.1:{self._servers[1].server_address[1]}"
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------------------- test controls
    def add_token(self, token: str, user: str, role: str = "write") -> None:
        self.tokens[token] = (user, role)

    def fail(self, endpoint: str, status: int = 503, times: int = 1, message: str | None = None) -> None:
        """Answer the next ``times`` requests to ``endpoint`` with HTTP ``status`` (and error ``message``)."""
        with self._lock:
            self._faults.append(_Fault(endpoint, "status", status, times, message))

    def drop(self, endpoint: str, times: int = 1) -> None:
        """Close the connection of the next ``times`` requests to ``endpoint`` without answering."""
        with self._lock:
            self._faults.append(_Fault(endpoint, "drop", 0, times))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def calls(self, endpoint: str) -> int:
        return sum(1 for r in self.requests if r.endpoint == endpoint)

    def create_repo(self, repo_id: str, private: bool = False, repo_type: str = "model") -> Repo:
        """Create a repo directly (server side), with the initial `.gitattributes` commit the Hub makes."""
        with self._lock:
            repo = Repo(repo_type, repo_id, private)
            oid = git_blob_oid(GITATTRIBUTES)
            self.blobs[oid] = GITATTRIBUTES
            commit = Commit(_commit_oid(), None, {".gitattributes": Entry(len(GITATTRIBUTES), oid)}, "initial commit")
            repo.commits[commit.oid] = commit
            repo.branches["main"] = commit.oid
            self.repos[(repo_type, repo_id)] = repo
            return repo

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Every file of ``repo_id`` at ``revision``, with its bytes."""
        with self._lock:
            repo = self.repo(repo_id, repo_type)
            commit = repo.commits[self._resolve(repo, revision)]
            return {path: self._content(entry) for path, entry in commit.files.items()}

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        """Commit titles from the newest back to the first."""
        with self._lock:
            repo = self.repo(repo_id, repo_type)
            oid: str | None = self._resolve(repo, revision)
            titles = []
            while oid is not None:
                titles.append(repo.commits[oid].title)
                oid = repo.commits[oid].parent
            return titles

    # ----------------------------------------------------------------------------- internals
    def _content(self, entry: Entry) -> bytes:
        return self.lfs[entry.lfs_oid] if entry.lfs_oid else self.blobs[entry.git_oid]

    def _resolve(self, repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if re.fullmatch(r"[0-9a-f]{40}", revision) and revision in repo.commits:
            return revision
        raise _not_found("RevisionNotFound", f"Invalid rev id: {revision}")

    def _take_fault(self, endpoint: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.endpoint == endpoint and fault.remaining > 0:
                    fault.remaining -= 1
                    return fault
        return None

    def _sign(self, repo: Repo, oid: str) -> str:
        message = f"{repo.repo_type}/{repo.repo_id}/{oid}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def storage_url(self, repo: Repo, oid: str) -> str:
        key = quote(f"{repo.repo_type}/{repo.repo_id}", safe="")
        return f"{self.storage}/lfs/{key}/{oid}?sig={self._sign(repo, oid)}"


def _commit_oid() -> str:
    return secrets.token_hex(20)


_API_REPO = re.compile(r"^/api/(models|datasets|spaces)/([^/]+)/([^/]+)(?:/(.*))?$")
_GIT_LFS = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+)\.git/info/lfs/objects/(batch|verify)$")
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")
_STORAGE = re.compile(r"^/lfs/([^/]+)/([0-9a-f]{64})$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes: avoid 40 ms stalls
    hub: LocalHub
    role: str
    server_version = "LocalHub/1.0"

    def log_message(self, format, *args):  # keep test output clean
        pass

    # ----------------------------------------------------------------------------- plumbing
    def do_GET(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str = "application/json"
    ):
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", content_type)
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        self._record.status = status

    def _json(self, status: int, payload, headers: dict | None = None):
        self._send(status, json.dumps(payload).encode(), headers)

    def _dispatch(self):
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.body = self._read_body()
        route = self._route(url.path)
        endpoint = route[0] if route else "unknown"
        self._record = Request(self.command, endpoint, url.path, "authorization" in {k.lower() for k in self.headers})
        with self.hub._lock:
            self.hub.requests.append(self._record)
        fault = self.hub._take_fault(endpoint)
        if fault is not None and fault.kind == "drop":
            self.close_connection = True
            self._record.status = -1
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if fault is not None:
            self._json(fault.status, {"error": fault.message or f"Injected failure {fault.status} on {endpoint}"})
            return
        if route is None:
            self._json(404, {"error": f"No such endpoint: {self.command} {url.path}"})
            return
        name, handler, args = route
        try:
            handler(*args)
        except HubError as err:
            headers = dict(err.headers)
            if err.code:
                headers["X-Error-Code"] = err.code
            headers["X-Error-Message"] = err.message
            self._json(err.status, {"error": err.message}, headers)
        except Exception as err:  # a server bug or a malformed request: answer, so the test shows it
            self._json(500, {"error": f"LocalHub {name} failed: {type(err).__name__}: {err}"})

    def _route(self, path: str):
        method = self.command
        if self.role == "storage":
            m = _STORAGE.match(path)
            if m and method == "PUT":
                return "lfs_upload", self._storage_put, (unquote(m.group(1)), m.group(2))
            if m and method in ("GET", "HEAD"):
                return "storage_get", self._storage_get, (unquote(m.group(1)), m.group(2))
            return None
        if path == "/api/whoami-v2" and method == "GET":
            return "whoami", self._whoami, ()
        if path == "/api/repos/create" and method == "POST":
            return "create_repo", self._create_repo, ()
        if path == "/api/validate-yaml" and method == "POST":
            return "validate_yaml", self._validate_yaml, ()
        m = _API_REPO.match(path)
        if m:
            repo_type = m.group(1)[:-1]
            repo_id = f"{unquote(m.group(2))}/{unquote(m.group(3))}"
            rest = [unquote(part) for part in m.group(4).split("/")] if m.group(4) else []
            if not rest and method == "GET":
                return "repo_info", self._repo_info, (repo_type, repo_id, None)
            if len(rest) == 2 and rest[0] == "revision" and method == "GET":
                return "repo_info", self._repo_info, (repo_type, repo_id, rest[1])
            if rest and rest[0] == "tree" and len(rest) >= 2 and method == "GET":
                return "tree", self._tree, (repo_type, repo_id, rest[1], "/".join(rest[2:]))
            if len(rest) == 2 and rest[0] == "paths-info" and method == "POST":
                return "paths_info", self._paths_info, (repo_type, repo_id, rest[1])
            if rest == ["refs"] and method == "GET":
                return "refs", self._refs, (repo_type, repo_id)
            if len(rest) == 2 and rest[0] == "branch" and method == "POST":
                return "branch", self._create_branch, (repo_type, repo_id, rest[1])
            if len(rest) == 2 and rest[0] == "preupload" and method == "POST":
                return "preupload", self._preupload, (repo_type, repo_id, rest[1])
            if len(rest) == 2 and rest[0] == "commit" and method == "POST":
                return "commit", self._commit, (repo_type, repo_id, rest[1])
            return None
        m = _GIT_LFS.match(path)
        if m and method == "POST":
            repo_type = (m.group(1) or "models")[:-1]
            repo_id = f"{unquote(m.group(2))}/{unquote(m.group(3))}"
            handler = self._lfs_batch if m.group(4) == "batch" else self._lfs_verify
            return f"lfs_{m.group(4)}", handler, (repo_type, repo_id)
        m = _RESOLVE.match(path)
        if m and method in ("GET", "HEAD"):
            repo_type = (m.group(1) or "models")[:-1]
            repo_id = f"{unquote(m.group(2))}/{unquote(m.group(3))}"
            return "resolve", self._resolve_file, (repo_type, repo_id, unquote(m.group(4)), unquote(m.group(5)))
        return None

    # ----------------------------------------------------------------------------- auth
    def _user(self) -> tuple[str, str] | None:
        """``(user, role)`` of the bearer token, None when anonymous; an unknown token is refused (401)."""
        header = self.headers.get("Authorization")
        if not header:
            return None
        token = header.split(" ", 1)[-1].strip()
        if token not in self.hub.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.hub.tokens[token]

    def _may_write_namespace(self, user: str, namespace: str) -> bool:
        return user == namespace or user in self.hub.orgs.get(namespace, set())

    def _readable(self, repo_type: str, repo_id: str) -> Repo:
        user = self._user()
        repo = self.hub.repos.get((repo_type, repo_id))
        member = user is not None and repo is not None and self._may_write_namespace(user[0], repo.namespace)
        visible = repo is not None and (not repo.private or member)
        if not visible:
            status = 401 if user is None else 404
            raise HubError(status, "Repository not found", "RepoNotFound")
        return repo

    def _writable(self, repo_type: str, repo_id: str) -> Repo:
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repository")
        repo = self._readable(repo_type, repo_id)
        if user[1] != "write" or not self._may_write_namespace(user[0], repo.namespace):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    # ----------------------------------------------------------------------------- API endpoints
    def _whoami(self):
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid username or password.")
        name, role = user
        orgs = [{"type": "org", "name": org} for org, members in self.hub.orgs.items() if name in members]
        self._json(
            200,
            {
                "type": "user",
                "name": name,
                "fullname": name,
                "orgs": orgs,
                "auth": {"type": "access_token", "accessToken": {"displayName": f"{name}-token", "role": role}},
            },
        )

    def _create_repo(self):
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        payload = json.loads(self.body or b"{}")
        name, namespace = payload.get("name"), payload.get("organization") or user[0]
        repo_type = payload.get("type") or "model"
        if not name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or "--" in name:
            raise HubError(400, f"Invalid repo name: {name!r}")
        if user[1] != "write" or not self._may_write_namespace(user[0], namespace):
            raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace {namespace!r}")
        repo_id = f"{namespace}/{name}"
        url = f"{self.hub.endpoint}/{_REVISION_PREFIXES[repo_type]}{repo_id}"
        with self.hub._lock:
            if (repo_type, repo_id) in self.hub.repos:
                self._json(
                    409,
                    {"error": f"You already created this {repo_type} repo", "url": url},
                    {"X-Error-Message": f"You already created this {repo_type} repo"},
                )
                return
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            self.hub.create_repo(repo_id, private=private, repo_type=repo_type)
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self):
        payload = json.loads(self.body or b"{}")
        content = payload.get("content", "")
        errors = []
        if content.startswith("---"):
            parts = content.split("\n---", 1)
            if len(parts) < 2:
                errors.append({"message": "Unterminated YAML front matter"})
            else:
                import yaml

                try:
                    meta = yaml.safe_load(parts[0][3:])
                    if meta is not None and not isinstance(meta, dict):
                        errors.append({"message": "YAML metadata must be a mapping"})
                except yaml.YAMLError as err:
                    errors.append({"message": f"Invalid YAML: {err}"})
        self._json(400 if errors else 200, {"errors": errors, "warnings": []})

    def _file_json(self, path: str, entry: Entry, expand_lfs: bool = True) -> dict:
        item = {"type": "file", "path": path, "size": entry.size, "oid": entry.git_oid}
        if entry.lfs_oid and expand_lfs:
            item["lfs"] = {
                "oid": entry.lfs_oid,
                "size": entry.size,
                "pointerSize": len(lfs_pointer(entry.lfs_oid, entry.size)),
            }
        return item

    def _repo_info(self, repo_type: str, repo_id: str, revision: str | None):
        with self.hub._lock:
            repo = self._readable(repo_type, repo_id)
            sha = self.hub._resolve(repo, revision or "main")
            commit = repo.commits[sha]
            blobs = self.query.get("blobs") in ("True", "true", "1")
            siblings = []
            for path, entry in sorted(commit.files.items()):
                sibling = {"rfilename": path}
                if blobs:
                    sibling.update(size=entry.size, blobId=entry.git_oid)
                    if entry.lfs_oid:
                        sibling["lfs"] = {
                            "size": entry.size,
                            "sha256": entry.lfs_oid,
                            "pointerSize": len(lfs_pointer(entry.lfs_oid, entry.size)),
                        }
                siblings.append(sibling)
            self._json(
                200,
                {
                    "_id": repo_id,
                    "id": repo_id,
                    "modelId": repo_id,
                    "author": repo.namespace,
                    "sha": sha,
                    "private": repo.private,
                    "gated": False,
                    "disabled": False,
                    "downloads": 0,
                    "likes": 0,
                    "tags": [],
                    "lastModified": commit.date,
                    "createdAt": repo.created,
                    "siblings": siblings,
                },
            )

    def _tree(self, repo_type: str, repo_id: str, revision: str, prefix: str):
        recursive = self.query.get("recursive") in ("True", "true", "1")
        with self.hub._lock:
            repo = self._readable(repo_type, repo_id)
            commit = repo.commits[self.hub._resolve(repo, revision)]
            base = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
            if base and not any(p.startswith(base) for p in commit.files):
                raise _not_found("EntryNotFound", f"{prefix} does not exist on {revision}")
            items, folders = [], set()
            for path, entry in sorted(commit.files.items()):
                if not path.startswith(base):
                    continue
                rel = path[len(base) :].split("/")
                for depth in range(1, len(rel)):
                    folder = base + "/".join(rel[:depth])
                    if (recursive or depth == 1) and folder not in folders:
                        folders.add(folder)
                        items.append({"type": "directory", "path": folder, "oid": git_blob_oid(folder.encode())})
                if recursive or len(rel) == 1:
                    items.append(self._file_json(path, entry))
            self._json(200, items)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str):
        form = parse_qs(self.body.decode()) if self.body else {}
        with self.hub._lock:
            repo = self._readable(repo_type, repo_id)
            commit = repo.commits[self.hub._resolve(repo, revision)]
            out = []
            for path in form.get("paths", []):
                path = path.strip("/")
                if path in commit.files:
                    out.append(self._file_json(path, commit.files[path]))
                elif any(p.startswith(path + "/") for p in commit.files):
                    out.append({"type": "directory", "path": path, "oid": git_blob_oid(path.encode())})
            self._json(200, out)

    def _refs(self, repo_type: str, repo_id: str):
        with self.hub._lock:
            repo = self._readable(repo_type, repo_id)
            branches = [
                {"name": n, "ref": f"refs/heads/{n}", "targetCommit": c}
                for n, c in repo.branches.items()
                if not n.startswith("refs/pr/")
            ]
            prs = [
                {"name": n, "ref": n, "targetCommit": c} for n, c in repo.branches.items() if n.startswith("refs/pr/")
            ]
            self._json(200, {"branches": branches, "converts": [], "tags": [], "pullRequests": prs})

    def _create_branch(self, repo_type: str, repo_id: str, branch: str):
        payload = json.loads(self.body or b"{}")
        with self.hub._lock:
            repo = self._writable(repo_type, repo_id)
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo.branches[branch] = self.hub._resolve(repo, payload.get("startingPoint") or "main")
        self._json(200, {})

    def _preupload(self, repo_type: str, repo_id: str, revision: str):
        payload = json.loads(self.body or b"{}")
        with self.hub._lock:
            repo = self._writable(repo_type, repo_id)
            create_pr = self.query.get("create_pr") == "1"
            if create_pr and revision not in repo.branches:
                files = {}
            else:
                files = repo.commits[self.hub._resolve(repo, revision)].files
            out = []
            for item in payload.get("files", []):
                path, size = item["path"], int(item["size"])
                sample = base64.b64decode(item.get("sample", ""))
                lfs = path.endswith(LFS_PATTERNS) or size >= LFS_SIZE_THRESHOLD or b"\x00" in sample
                existing = files.get(path)
                oid = None
                if existing is not None:
                    oid = existing.lfs_oid if lfs else (None if existing.lfs_oid else existing.git_oid)
                mode = "lfs" if lfs else "regular"
                out.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._json(200, {"files": out, "commitOid": None})

    def _lfs_batch(self, repo_type: str, repo_id: str):
        payload = json.loads(self.body or b"{}")
        with self.hub._lock:
            repo = self._writable(repo_type, repo_id)
            if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
                raise HubError(400, "Only uploads with the basic transfer are supported")
            objects = []
            prefix = _REVISION_PREFIXES[repo_type]
            for obj in payload.get("objects", []):
                oid, size = obj["oid"], int(obj["size"])
                item = {"oid": oid, "size": size, "authenticated": True}
                if oid not in repo.lfs_oids:
                    item["actions"] = {
                        "upload": {"href": self.hub.storage_url(repo, oid), "header": {}},
                        "verify": {
                            "href": f"{self.hub.endpoint}/{prefix}{repo_id}.git/info/lfs/objects/verify",
                            "header": {},
                        },
                    }
                objects.append(item)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
            content_type="application/vnd.git-lfs+json",
        )

    def _lfs_verify(self, repo_type: str, repo_id: str):
        payload = json.loads(self.body or b"{}")
        with self.hub._lock:
            repo = self._writable(repo_type, repo_id)
            oid, size = payload.get("oid"), payload.get("size")
            if oid not in repo.lfs_oids or len(self.hub.lfs[oid]) != size:
                raise HubError(404, f"LFS object {oid} of size {size} was not uploaded")
        self._json(200, {"success": True})

    def _commit(self, repo_type: str, repo_id: str, revision: str):
        lines = [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line")
        header = lines[0]["value"]
        with self.hub._lock:
            repo = self._writable(repo_type, repo_id)
            create_pr = self.query.get("create_pr") == "1"
            if revision not in repo.branches:
                raise _not_found("RevisionNotFound", f"Invalid rev id: {revision}")
            head = repo.branches[revision]
            if header.get("parentCommit") and header["parentCommit"] != head:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.commits[head].files)
            new_blobs = {}
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                path = value.get("path", "")
                if key == "file":
                    data = base64.b64decode(value["content"])
                    oid = git_blob_oid(data)
                    new_blobs[oid] = data
                    files[path] = Entry(len(data), oid)
                elif key == "lfsFile":
                    oid = value["oid"]
                    if oid not in repo.lfs_oids:
                        raise HubError(422, f"LFS file {path} (oid {oid}) was not uploaded")
                    size = len(self.hub.lfs[oid])
                    if "size" in value and int(value["size"]) != size:
                        raise HubError(422, f"LFS file {path}: size {value['size']} differs from the upload ({size})")
                    files[path] = Entry(size, git_blob_oid(lfs_pointer(oid, size)), oid)
                elif key == "deletedFile":
                    if path not in files:
                        raise _not_found("EntryNotFound", f"A file with this name doesn't exist: {path}")
                    del files[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    files = {p: e for p, e in files.items() if not p.startswith(prefix)}
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            self.hub.blobs.update(new_blobs)
            commit = Commit(_commit_oid(), head, files, header.get("summary") or "", header.get("description") or "")
            repo.commits[commit.oid] = commit
            pr_url = None
            if create_pr:
                number = 1 + sum(1 for name in repo.branches if name.startswith("refs/pr/"))
                repo.branches[f"refs/pr/{number}"] = commit.oid
                pr_url = f"{self.hub.endpoint}/{_REVISION_PREFIXES[repo_type]}{repo_id}/discussions/{number}"
            else:
                repo.branches[revision] = commit.oid
        url = f"{self.hub.endpoint}/{_REVISION_PREFIXES[repo_type]}{repo_id}/commit/{commit.oid}"
        self._json(200, {"success": True, "commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": pr_url})

    # ----------------------------------------------------------------------------- downloads
    def _send_bytes(self, data: bytes, headers: dict):
        """Answer a GET/HEAD with ``data``, honouring a single ``Range: bytes=a-b`` (resumed downloads)."""
        status, body = 200, data
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "") or "")
        if match:
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            if start >= len(data):
                self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                return
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{len(data)}"
        headers["Accept-Ranges"] = "bytes"
        self._send(status, body, headers, content_type="application/octet-stream")

    def _resolve_file(self, repo_type: str, repo_id: str, revision: str, path: str):
        with self.hub._lock:
            repo = self._readable(repo_type, repo_id)
            sha = self.hub._resolve(repo, revision)
            entry = repo.commits[sha].files.get(path)
            if entry is None:
                raise _not_found("EntryNotFound", f"{path} does not exist on {revision}", {"X-Repo-Commit": sha})
            data = None if entry.lfs_oid else self.hub.blobs[entry.git_oid]
            location = self.hub.storage_url(repo, entry.lfs_oid) if entry.lfs_oid else None
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry.git_oid}"'}
        if location is not None:
            headers.update(
                {"Location": location, "X-Linked-Etag": f'"{entry.lfs_oid}"', "X-Linked-Size": str(entry.size)}
            )
            self._send(302, b"", headers)
            return
        self._send_bytes(data, headers)

    # ----------------------------------------------------------------------------- storage port
    def _check_signature(self, key: str, oid: str) -> Repo:
        repo_type, repo_id = key.split("/", 1)
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None or not hmac.compare_digest(self.query.get("sig", ""), self.hub._sign(repo, oid)):
            raise HubError(403, "Invalid or missing signature")
        return repo

    def _storage_put(self, key: str, oid: str):
        with self.hub._lock:
            repo = self._check_signature(key, oid)
            if hashlib.sha256(self.body).hexdigest() != oid:
                raise HubError(400, f"Uploaded content does not match sha256 {oid}")
            self.hub.lfs[oid] = self.body
            repo.lfs_oids.add(oid)
        self._send(200, b"", {"ETag": f'"{hashlib.md5(self.body).hexdigest()}"'})

    def _storage_get(self, key: str, oid: str):
        with self.hub._lock:
            repo = self._check_signature(key, oid)
            if oid not in repo.lfs_oids:
                raise HubError(404, f"No LFS object {oid}")
            data = self.hub.lfs[oid]
        self._send_bytes(data, {"ETag": f'"{oid}"'})
