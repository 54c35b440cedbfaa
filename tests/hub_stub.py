"""
A minimal stand-in for the Hugging Face Hub's HTTP API, on 127.0.0.1 only, so tests run huggingface_hub's real client.

It answers what `HfApi.create_repo`, `create_branch` and `upload_folder` (huggingface_hub 2.x, LFS "basic" transfer)
send, with JSON shaped like the Hub's, and records what arrived: files per repo and revision (with their bytes and
whether they came inline or through LFS), create_repo payloads, branches, every request with its Authorization header,
and any request to a route it doesn't know (answered 404, so a test can assert there were none).

    with HubStub(token="hf_test") as hub:
        HfApi(endpoint=hub.url, token="hf_test").create_repo("user/x")
        assert hub.repo("user/x").private is False

Routes (`{type}` is models, datasets or spaces; `{repo}` is namespace/name):
    POST /api/repos/create                              create_repo (409 if it exists, like the Hub)
    POST /api/{type}/{repo}/branch/{branch}             create_branch (409 if it exists)
    GET  /api/{type}/{repo}[/revision/{rev}]            repo_info (create_commit calls it when nothing changed)
    POST /api/validate-yaml                             README.md metadata check, always valid here
    POST /api/{type}/{repo}/preupload/{rev}             upload mode (regular or lfs) and remote oid per file
    POST /{repo}.git/info/lfs/objects/batch             LFS batch: "basic" upload actions pointing back here
    PUT  /_stub/lfs-storage/{oid}                       LFS object upload (the Hub's is a presigned S3 URL)
    POST /{repo}.git/info/lfs/objects/verify            LFS verify
    POST /api/{type}/{repo}/commit/{rev}                NDJSON commit: header, file (base64), lfsFile, deleted*

Not modelled: Xet storage (huggingface_hub uses it whenever `hf_xet` is installed; set
`huggingface_hub.constants.HF_HUB_DISABLE_XET = True` to get the LFS path), pull requests, .gitattributes/.gitignore
(new repos start empty, where the Hub adds a `.gitattributes` commit), multipart LFS, namespaces and permissions
beyond one optional token.
"""

import base64
import hashlib
import itertools
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

HOST = "127.0.0.1"  # loopback only: the stub must never be reachable from, or reach, another machine
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# The Hub stores a file through LFS when its repo's .gitattributes says so (these are the defaults it writes), when it
# is 10 MB or more, or when it looks binary.
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.pb", "*.npy",
                "*.npz", "*.gguf", "*.pkl", "*.pickle", "*.zip", "*.gz", "*.tar", "*.tflite", "*.ot", "*.model")
LFS_MIN_SIZE = 10 * 1024 * 1024
MAX_BODY_BYTES = 512 * 1024 * 1024  # a request body larger than this is refused (413): bounded memory

_REPO = r"(?P<repo>[^/]+/[^/]+|[^/]+)"
_TYPE = r"(?P<type>models|datasets|spaces)"
ROUTES = [  # (method, pattern, handler name); first match wins
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/{_TYPE}/{_REPO}/branch/(?P<branch>[^/]+)$"), "create_branch"),
    ("POST", re.compile(rf"^/api/{_TYPE}/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/{_TYPE}/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("GET", re.compile(rf"^/api/{_TYPE}/{_REPO}(?:/revision/(?P<rev>[^/]+))?$"), "repo_info"),
    ("POST", re.compile(r"^/(?:(?P<type>datasets|spaces)/)?(?P<repo>.+?)\.git/info/lfs/objects/batch$"), "lfs_batch"),
    ("POST", re.compile(r"^/(?:(?P<type>datasets|spaces)/)?(?P<repo>.+?)\.git/info/lfs/objects/verify$"), "lfs_verify"),
    ("PUT", re.compile(r"^/_stub/lfs-storage/(?P<oid>[0-9a-f]{64})$"), "lfs_store"),
]
UNAUTHENTICATED = {"lfs_store"}  # the Hub's storage URLs are presigned: the client sends no token there


@dataclass
class Request:
    method: str
    path: str
    query: dict
    authorization: str | None
    route: str | None  # handler name, None for an unknown route
    status: int = 0


@dataclass
class Commit:
    oid: str
    revision: str
    summary: str
    files: dict  # path -> bytes, what this commit added or replaced
    modes: dict  # path -> "regular" (inline base64) or "lfs"
    deleted: list


@dataclass
class StubRepo:
    repo_id: str
    repo_type: str
    private: bool
    create_payloads: list  # every create_repo payload for this repo, the first one created it
    trees: dict = field(default_factory=lambda: {"main": {}})  # revision -> {path: bytes}
    heads: dict = field(default_factory=dict)  # revision -> commit oid
    branches_created: list = field(default_factory=list)  # (branch, starting point)
    commits: list = field(default_factory=list)

    def received(self, revision: str = "main") -> dict:
        """Every file that arrived in a commit to `revision`, path -> bytes (latest wins)."""
        files = {}
        for commit in self.commits:
            if commit.revision == revision:
                files.update(commit.files)
        return files

    def upload_modes(self, revision: str = "main") -> dict:
        modes = {}
        for commit in self.commits:
            if commit.revision == revision:
                modes.update(commit.modes)
        return modes


class _StubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **fields):
        super().__init__(message)
        self.status, self.message, self.code, self.fields = status, message, code, fields


class HubStub:
    """The stub server: a context manager that serves on an ephemeral loopback port until exit (or `max_lifetime_s`)."""

    def __init__(self, *, token: str | None = None, username: str = "user", max_lifetime_s: float = 120.0):
        self.token = token  # when set, every API request must carry "Bearer <token>", else 401 like the Hub
        self.username = username  # namespace for create_repo payloads without an organization
        self.max_lifetime_s = max_lifetime_s
        self.repos: dict[tuple[str, str], StubRepo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 hex -> bytes
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._oids = itertools.count(1)
        self._server = None
        self._thread = None
        self._watchdog = None

    # -- lifecycle ----------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{HOST}:{self._server.server_address[1]}"

    def start(self) -> "HubStub":
        self._server = _Server((HOST, 0), _Handler)
        self._server.stub = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="hub-stub", daemon=True)
        self._thread.start()
        # A test that hangs or forgets to stop still gets its port and threads back.
        self._watchdog = threading.Timer(self.max_lifetime_s, self.stop)
        self._watchdog.daemon = True
        self._watchdog.start()
        return self

    def stop(self) -> None:
        server = self._server
        with self._lock:
            if server is None or server.stopped:
                return
            server.stopped = True
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.cancel()
        server.shutdown()
        server.close_connections()  # keep-alive connections would otherwise hold handler threads until they time out
        server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "HubStub":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- what tests read ----------------------------------------------------------------------------------------
    def repo(self, repo_id: str, repo_type: str = "model") -> StubRepo:
        return self.repos[(repo_type, repo_id)]

    @property
    def unknown_requests(self) -> list[Request]:
        return [request for request in self.requests if request.route is None]

    def routes_used(self) -> list[tuple[str, str]]:
        """(method, route name) of each request in order, e.g. ("POST", "create_repo")."""
        return [(request.method, request.route) for request in self.requests]

    # -- request handling (called from handler threads) ------------------------------------------------------------
    def handle(self, method: str, raw_path: str, headers, body: bytes) -> tuple[int, dict | bytes, dict]:
        parts = urlsplit(raw_path)
        path, query = parts.path, parse_qs(parts.query)
        route, params = None, {}
        for route_method, pattern, name in ROUTES:
            match = pattern.match(path)
            if match and route_method == method:
                route, params = name, {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                break
        record = Request(method, path, query, headers.get("Authorization"), route)
        with self._lock:
            self.requests.append(record)
        try:
            if route is None:
                hint = " (the stub does not speak Xet: set HF_HUB_DISABLE_XET)" if "xet" in path else ""
                raise _StubError(404, f"hub stub: no route for {method} {path}{hint}")
            if route not in UNAUTHENTICATED and self.token is not None:
                if record.authorization != f"Bearer {self.token}":
                    raise _StubError(401, "Invalid credentials in Authorization header")
            with self._lock:
                status, payload = getattr(self, f"_{route}")(params, query, body)
            extra = {}
        except _StubError as error:
            status, payload = error.status, {"error": error.message, **error.fields}
            extra = {"X-Error-Message": error.message, **({"X-Error-Code": error.code} if error.code else {})}
        except Exception as error:  # a body the stub can't read: answer 400 (a 5xx would make the client retry)
            status, payload, extra = 400, {"error": f"hub stub could not handle {method} {path}: {error!r}"}, {}
        record.status = status
        return status, payload, extra

    def _base_url(self, repo: StubRepo) -> str:
        return f"{self.url}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}"

    def _find(self, params: dict) -> StubRepo:
        repo_type = REPO_TYPES[params["type"]] if params.get("type") in REPO_TYPES else "model"
        repo = self.repos.get((repo_type, params["repo"]))
        if repo is None:
            raise _StubError(404, f"Repository {params['repo']} not found", "RepoNotFound")
        return repo

    @staticmethod
    def _tree(repo: StubRepo, revision: str) -> dict:
        if revision not in repo.trees:
            raise _StubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.trees[revision]

    def _new_oid(self, *parts) -> str:
        return hashlib.sha1(repr((next(self._oids), *parts)).encode()).hexdigest()

    @staticmethod
    def _json(body: bytes) -> dict:
        try:
            return json.loads(body or b"{}")
        except ValueError as error:
            raise _StubError(400, f"hub stub: request body is not JSON ({error})") from None

    def _create_repo(self, params, query, body):
        payload = self._json(body)
        name, organization = payload.get("name"), payload.get("organization")
        if not name:
            raise _StubError(400, "name is required")
        repo_id = f"{organization or self.username}/{name}"
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise _StubError(400, f"invalid repo type {repo_type!r}")
        key = (repo_type, repo_id)
        url = f"{self.url}/{URL_PREFIXES[repo_type]}{repo_id}"
        if key in self.repos:
            self.repos[key].create_payloads.append(payload)
            # create_repo(exist_ok=True) reads the repo's URL from this 409's body, as the Hub sends it.
            raise _StubError(409, f"You already created this {repo_type} repo: {repo_id}", url=url)
        # huggingface_hub 2.x sends "visibility"; 1.x sent "private".
        private = payload.get("visibility") == "private" or payload.get("private") is True
        repo = StubRepo(repo_id, repo_type, private, [payload])
        repo.heads["main"] = self._new_oid(repo_id, "initial")
        self.repos[key] = repo
        return 200, {"url": url, "name": repo_id, "id": self._new_oid(repo_id)[:24]}

    def _create_branch(self, params, query, body):
        repo = self._find(params)
        branch, start = params["branch"], self._json(body).get("startingPoint", "main")
        if branch in repo.trees:
            raise _StubError(409, f"Reference already exists: refs/heads/{branch}")
        repo.trees[branch] = dict(self._tree(repo, start))
        repo.heads[branch] = repo.heads[start]
        repo.branches_created.append((branch, start))
        return 200, {}

    def _repo_info(self, params, query, body):
        repo = self._find(params)
        revision = params.get("rev", "main")
        tree = self._tree(repo, revision)
        return 200, {"id": repo.repo_id, "sha": repo.heads[revision], "private": repo.private,
                     "siblings": [{"rfilename": path} for path in sorted(tree)], "tags": [], "downloads": 0}

    def _validate_yaml(self, params, query, body):
        self._json(body)
        return 200, {"errors": [], "warnings": []}

    def _preupload(self, params, query, body):
        repo = self._find(params)
        if "create_pr" in query:
            raise _StubError(400, "hub stub: pull requests are not modelled")
        tree = self._tree(repo, params["rev"])
        files = []
        for item in self._json(body).get("files", []):
            path, size, sample = item["path"], item["size"], base64.b64decode(item["sample"])
            lfs = size >= LFS_MIN_SIZE or b"\x00" in sample or any(fnmatchcase(path, p) for p in LFS_PATTERNS)
            existing = tree.get(path)
            # The client skips a file whose remote oid equals its local one: sha256 for LFS, git blob sha1 otherwise.
            oid = None if existing is None else (hashlib.sha256(existing).hexdigest() if lfs else _git_sha1(existing))
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return 200, {"files": files, "commitOid": repo.heads[params["rev"]]}

    def _lfs_batch(self, params, query, body):
        repo = self._find(params)
        request = self._json(body)
        if request.get("operation") != "upload" or "basic" not in request.get("transfers", ["basic"]):
            raise _StubError(400, "hub stub: only LFS uploads with the basic transfer are modelled")
        revision = request.get("ref", {}).get("name", "main")
        self._tree(repo, revision)
        objects = []
        for item in request.get("objects", []):
            oid, size = item["oid"], item["size"]
            answer = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.lfs_objects:  # an object the Hub already has gets no actions: the client skips it
                answer["actions"] = {
                    "upload": {"href": f"{self.url}/_stub/lfs-storage/{oid}", "header": {}},
                    "verify": {"href": f"{self._base_url(repo)}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(answer)
        return 200, {"transfer": "basic", "objects": objects}

    def _lfs_store(self, params, query, body):
        oid = params["oid"]
        if hashlib.sha256(body).hexdigest() != oid:
            raise _StubError(400, f"LFS object body does not match its oid {oid}")
        self.lfs_objects[oid] = body
        return 200, b""

    def _lfs_verify(self, params, query, body):
        self._find(params)
        request = self._json(body)
        stored = self.lfs_objects.get(request.get("oid"))
        if stored is None or len(stored) != request.get("size"):
            raise _StubError(404, f"LFS object {request.get('oid')} not found or of another size")
        return 200, {"success": True}

    def _commit(self, params, query, body):
        repo = self._find(params)
        revision = params["rev"]
        if "create_pr" in query:
            raise _StubError(400, "hub stub: pull requests are not modelled")
        tree = self._tree(repo, revision)
        try:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        except ValueError as error:
            raise _StubError(400, f"commit body is not NDJSON ({error})") from None
        if not lines or lines[0].get("key") != "header":
            raise _StubError(400, "commit body must start with a header line")
        header = lines[0]["value"]
        if header.get("parentCommit") not in (None, repo.heads[revision]):
            raise _StubError(412, "A commit has happened since. Please refresh and try again.")
        files, modes, deleted = {}, {}, []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _StubError(400, f"unsupported encoding {value.get('encoding')!r} for {value.get('path')}")
                files[value["path"]], modes[value["path"]] = base64.b64decode(value["content"]), "regular"
            elif key == "lfsFile":
                content = self.lfs_objects.get(value.get("oid"))
                if content is None or ("size" in value and len(content) != value["size"]):
                    raise _StubError(400, f"Your push was rejected because an LFS pointer pointed to a file that "
                                          f"does not exist: {value.get('path')}")
                files[value["path"]], modes[value["path"]] = content, "lfs"
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                raise _StubError(400, f"unknown commit operation {key!r}")
        for path in deleted:
            prefix = path.rstrip("/") + "/"
            for existing in [p for p in tree if p == path or p.startswith(prefix)]:
                del tree[existing]
        tree.update(files)
        oid = self._new_oid(repo.repo_id, revision, header.get("summary"))
        repo.heads[revision] = oid
        repo.commits.append(Commit(oid, revision, header.get("summary", ""), files, modes, deleted))
        return 200, {"success": True, "commitOid": oid, "commitUrl": f"{self._base_url(repo)}/commit/{oid}",
                     "pullRequestUrl": None}


def _git_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck handler never keeps the test process alive
    allow_reuse_address = False

    def __init__(self, *args, **kwargs):
        self.stopped = False
        self._connections = set()
        self._connections_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def server_bind(self):
        if self.server_address[0] != HOST:  # belt and braces: loopback only
            raise ValueError(f"hub stub binds to {HOST} only, not {self.server_address[0]}")
        super().server_bind()

    def get_request(self):
        connection, address = super().get_request()
        with self._connections_lock:
            self._connections.add(connection)
        return connection, address

    def shutdown_request(self, request):
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self):
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's pooled client expects; every reply has a length
    timeout = 30  # an idle keep-alive connection's thread ends after this

    def log_message(self, format, *args):  # the default writes every request to stderr
        pass

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY_BYTES:
                    return None
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            return None
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str):
        body = self._read_body()
        if body is None:
            self.close_connection = True  # the unread body makes the connection unusable
            status, payload, extra = 413, {"error": f"request body over {MAX_BODY_BYTES} bytes"}, {}
        else:
            status, payload, extra = self.server.stub.handle(method, self.path, self.headers, body)
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if not isinstance(payload, bytes) else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")
