"""A small Hugging Face Hub-compatible server for tests: real HTTP on 127.0.0.1, nothing mocked.

It answers the requests huggingface_hub 2.4 really makes (read from ``file_download.py``,
``utils/_http.py``, ``hf_api.py``, ``_commit_api.py`` and ``lfs.py``):

* ``HEAD``/``GET /{repo}/resolve/{revision}/{path}``. A regular file answers 200 with ``ETag``
  (its git blob id), ``X-Repo-Commit`` and ``Content-Length``. An LFS file (``*.safetensors``)
  answers 302 to the CDN with ``X-Linked-Etag`` (its sha256), ``X-Linked-Size`` and
  ``X-Repo-Commit``: the CDN is another origin (another port), so huggingface_hub takes the
  metadata from the redirect itself and downloads from ``Location``, as with the real Hub.
* CDN ``HEAD``/``GET /lfs/{sha256}``, with ``Range: bytes=N-`` (206), used to resume downloads.
* Errors carry the Hub's ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo).
* Uploads: ``POST /api/repos/create``, ``/api/validate-yaml``, ``/api/models/{repo}/preupload/{rev}``,
  ``/{repo}.git/info/lfs/objects/batch`` (LFS "basic" transfer), CDN ``PUT /lfs-upload/{sha256}``
  and ``POST /api/models/{repo}/commit/{rev}`` (NDJSON). Xet is not spoken: clients must run with
  ``HF_HUB_DISABLE_XET=1`` to upload.

Every request is logged (``requests``) so tests can assert that none was made. Both listeners bind
127.0.0.1 only, the server stops by itself after ``max_lifetime`` seconds, idle connections time
out, and request bodies are read with fixed bounds.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

USER = "test-user"
MAX_BODY = 64 << 20
MAX_CHUNKS = 100_000
SEND_BLOCK = 64 << 10


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith(".safetensors")


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> {path: content}
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    gated: bool = False

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


@dataclass(frozen=True)
class LoggedRequest:
    listener: str  # "hub" or "cdn"
    method: str
    path: str
    range: str | None
    authorized: bool


@dataclass
class _Fault:
    """Cut GET responses for one blob at an absolute byte offset, then drop the connection."""

    sha256: str
    cut_at: int
    times: int | None  # how many responses to cut; None: all of them


def client_env(home: Path, endpoint: str | None = None, **extra: str) -> dict[str, str]:
    """A clean environment for a client process: its own HOME, HF_HOME and config folder, no proxies.

    ``HF_HUB_DISABLE_XET`` is set because this server speaks only the LFS upload protocol.
    """
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "HF_HOME": str(home / "hf"),
        "XDG_CONFIG_HOME": str(home / "config"),
        "HF_HUB_DISABLE_XET": "1",
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "200",
        "LANG": "C.UTF-8",
    }
    if endpoint is not None:
        env["HF_ENDPOINT"] = endpoint
    env.update(extra)
    return env


class HubServer:
    """Start with ``with HubServer() as hub:``; point ``HF_ENDPOINT`` at ``hub.endpoint``."""

    def __init__(self, *, token: str | None = None, max_lifetime: float = 120.0) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self._faults: list[_Fault] = []
        self._log: list[LoggedRequest] = []
        self._lock = threading.Lock()
        self._commit_counter = 0
        self._hub = _Listener(self, "hub")
        self._cdn = _Listener(self, "cdn")
        self._threads: list[threading.Thread] = []
        self._timer = threading.Timer(max_lifetime, self.stop)
        self._timer.daemon = True
        self._stopped = False

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_port}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_port}"

    def start(self) -> HubServer:
        for listener in (self._hub, self._cdn):
            thread = threading.Thread(target=listener.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._timer.start()
        return self

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._timer.cancel()
        for listener in (self._hub, self._cdn):
            listener.shutdown()
            listener.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- content -----------------------------------------------------------------------------
    def add_commit(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", gated: bool = False) -> str:
        """Commit ``files`` on top of ``branch`` (creating the repo if needed); returns the commit id."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo(gated=gated))
            parent = repo.refs.get(branch)
            tree = dict(repo.commits.get(parent, {})) if parent else {}
            tree.update(files)
            return self._commit(repo, tree, branch)

    def tag(self, repo_id: str, name: str, commit: str) -> None:
        with self._lock:
            self.repos[repo_id].refs[name] = commit

    def cut_downloads(self, content: bytes, *, at: int, times: int | None = None) -> None:
        """Send only the first ``at`` bytes of ``content`` (despite Content-Length), then hang up."""
        with self._lock:
            self._faults.append(_Fault(hashlib.sha256(content).hexdigest(), at, times))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def file_at(self, repo_id: str, revision: str, path: str) -> bytes | None:
        with self._lock:
            repo = self.repos.get(repo_id)
            commit = repo.resolve(revision) if repo else None
            return repo.commits[commit].get(path) if commit else None

    @property
    def requests(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._log)

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    # -- internals (called with or without the lock as noted) ---------------------------------
    def _commit(self, repo: Repo, tree: dict[str, bytes], branch: str) -> str:
        """Store a commit; caller holds the lock."""
        self._commit_counter += 1
        listing = sorted((path, hashlib.sha256(data).hexdigest()) for path, data in tree.items())
        commit = hashlib.sha1(json.dumps([self._commit_counter, listing]).encode()).hexdigest()
        repo.commits[commit] = tree
        repo.refs[branch] = commit
        for path, data in tree.items():
            if is_lfs(path):
                self.lfs_objects[hashlib.sha256(data).hexdigest()] = data
        return commit

    def _record(self, entry: LoggedRequest) -> None:
        with self._lock:
            self._log.append(entry)

    def _take_fault(self, sha256: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.sha256 == sha256 and (fault.times is None or fault.times > 0):
                    if fault.times is not None:
                        fault.times -= 1
                    return fault
        return None


class _Listener(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, hub: HubServer, name: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub = hub
        self.name = name


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # idle keep-alive connections end instead of holding a thread forever
    server: _Listener

    def log_message(self, format: str, *args: object) -> None:  # quiet; requests go to the log instead
        pass

    # -- dispatch ----------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_POST(self) -> None:
        self._dispatch(head=False)

    def do_PUT(self) -> None:
        self._dispatch(head=False)

    def _dispatch(self, head: bool) -> None:
        hub = self.server.hub
        path = urlsplit(self.path).path
        hub._record(LoggedRequest(self.server.name, self.command, path, self.headers.get("Range"), self._authorized()))
        parts = [unquote(part) for part in path.split("/")[1:]]
        if self.server.name == "cdn":
            if self.command in ("GET", "HEAD") and len(parts) == 2 and parts[0] == "lfs":
                return self._serve_blob(parts[1], head)
            if self.command == "PUT" and len(parts) == 2 and parts[0] == "lfs-upload":
                return self._receive_blob(parts[1])
            return self._error(404, "NotFound", "no such CDN object")
        if self.command in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), head)
        if self.command == "POST":
            if parts == ["api", "repos", "create"]:
                return self._create_repo()
            if parts == ["api", "validate-yaml"]:
                self._read_body()
                return self._json(200, {"errors": [], "warnings": []})
            if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
                return self._preupload(f"{parts[2]}/{parts[3]}")
            if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "commit":
                return self._commit(f"{parts[2]}/{parts[3]}", parts[5])
            if len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
                return self._lfs_batch(f"{parts[0]}/{parts[1][: -len('.git')]}")
        return self._error(404, "NotFound", f"no route for {self.command} {path}")

    # -- downloads ---------------------------------------------------------------------------
    def _resolve(self, repo_id: str, revision: str, file: str, head: bool) -> None:
        hub = self.server.hub
        repo = hub.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if repo.gated and not self._authorized():
            return self._error(403, "GatedRepo", "Access to this repo is restricted")
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        content = repo.commits[commit].get(file)
        if content is None:
            return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
        if is_lfs(file):
            sha256 = hashlib.sha256(content).hexdigest()
            headers = {
                "Location": f"{hub.cdn}/lfs/{sha256}",
                "X-Repo-Commit": commit,
                "X-Linked-Etag": f'"{sha256}"',
                "X-Linked-Size": str(len(content)),
                "ETag": f'"{git_blob_id(content)}"',
            }
            return self._send(302, b"", headers, head)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{git_blob_id(content)}"', "Accept-Ranges": "bytes"}
        self._send(200, content, headers, head)

    def _serve_blob(self, sha256: str, head: bool) -> None:
        content = self.server.hub.lfs_objects.get(sha256)
        if content is None:
            return self._error(404, "NotFound", "no such object")
        start, status = 0, 200
        headers = {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"}
        requested = self.headers.get("Range")
        if requested:
            first, _, last = requested.removeprefix("bytes=").partition("-")
            start = int(first)
            end = int(last) + 1 if last else len(content)
            if not 0 <= start < end <= len(content):
                return self._error(416, "RangeNotSatisfiable", "bad range", {"Content-Range": f"bytes */{len(content)}"})
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(content)}"
            content, status = content[start:end], 206
        fault = None if head else self.server.hub._take_fault(sha256)
        if fault is None:
            return self._send(status, content, headers, head)
        self._start_response(status, len(content), headers)
        self.wfile.write(content[: max(0, fault.cut_at - start)])
        self.wfile.flush()
        self.close_connection = True  # fewer bytes than Content-Length, then the connection is gone

    # -- uploads -----------------------------------------------------------------------------
    def _create_repo(self) -> None:
        if not self._authorized():
            return self._error(401, None, "Invalid credentials in Authorization header")
        payload = json.loads(self._read_body())
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        hub = self.server.hub
        url = f"{hub.endpoint}/{repo_id}"
        with hub._lock:
            if repo_id in hub.repos:
                return self._json(409, {"error": "You already created this model repo", "url": url})
            repo = hub.repos[repo_id] = Repo()
            hub._commit(repo, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "main")
        self._json(200, {"url": url, "name": repo_id})

    def _preupload(self, repo_id: str) -> None:
        payload = json.loads(self._read_body())
        repo = self.server.hub.repos.get(repo_id)
        if repo is None or not self._authorized():
            return self._error(404, "RepoNotFound", "Repository not found")
        current = repo.commits[repo.refs["main"]]
        answers = []
        for item in payload["files"]:
            existing = current.get(item["path"])
            oid = None
            if existing is not None:
                oid = hashlib.sha256(existing).hexdigest() if is_lfs(item["path"]) else git_blob_id(existing)
            mode = "lfs" if is_lfs(item["path"]) else "regular"
            answers.append({"path": item["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._json(200, {"files": answers})

    def _lfs_batch(self, repo_id: str) -> None:
        payload = json.loads(self._read_body())
        hub = self.server.hub
        if repo_id not in hub.repos or not self._authorized():
            return self._error(404, "RepoNotFound", "Repository not found")
        objects = []
        for item in payload["objects"]:
            answer = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if item["oid"] not in hub.lfs_objects:
                answer["actions"] = {"upload": {"href": f"{hub.cdn}/lfs-upload/{item['oid']}"}}
            objects.append(answer)
        self._json(200, {"transfer": "basic", "objects": objects})

    def _receive_blob(self, sha256: str) -> None:
        content = self._read_body()
        if hashlib.sha256(content).hexdigest() != sha256:
            return self._error(400, None, "content does not match its oid")
        with self.server.hub._lock:
            self.server.hub.lfs_objects[sha256] = content
        self._send(200, b"", {}, head=False)

    def _commit(self, repo_id: str, revision: str) -> None:
        hub = self.server.hub
        lines = [json.loads(line) for line in self._read_body().splitlines() if line.strip()]
        if repo_id not in hub.repos or not self._authorized():
            return self._error(404, "RepoNotFound", "Repository not found")
        with hub._lock:
            repo = hub.repos[repo_id]
            tree = dict(repo.commits[repo.refs[revision]])
            for line in lines:
                value = line["value"]
                if line["key"] == "file":
                    tree[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "lfsFile":
                    if value["oid"] not in hub.lfs_objects:
                        return self._error(400, None, f"LFS object {value['oid']} was never uploaded")
                    tree[value["path"]] = hub.lfs_objects[value["oid"]]
                elif line["key"] == "deletedFile":
                    tree.pop(value["path"], None)
            commit = hub._commit(repo, tree, revision)
        self._json(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{commit}", "commitOid": commit, "pullRequestUrl": None})

    # -- plumbing ----------------------------------------------------------------------------
    def _authorized(self) -> bool:
        token = self.server.hub.token
        return token is not None and self.headers.get("Authorization") == f"Bearer {token}"

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = bytearray()
            for _ in range(MAX_CHUNKS):
                size = int(self.rfile.readline(100).split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline(100)
                    return bytes(body)
                if len(body) + size > MAX_BODY:
                    raise ValueError("request body too large")
                body += self.rfile.read(size)
                self.rfile.readline(100)
            raise ValueError("too many chunks")
        length = int(self.headers.get("Content-Length", "0"))
        if length > MAX_BODY:
            raise ValueError("request body too large")
        return self.rfile.read(length)

    def _start_response(self, status: int, length: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _send(self, status: int, body: bytes, headers: dict[str, str], head: bool) -> None:
        self._start_response(status, len(body), headers)
        if not head:
            for offset in range(0, len(body), SEND_BLOCK):
                self.wfile.write(body[offset : offset + SEND_BLOCK])

    def _json(self, status: int, payload: object) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json"}, head=False)

    def _error(self, status: int, code: str | None, message: str, extra: dict[str, str] | None = None) -> None:
        headers = {"X-Error-Message": message, **(extra or {})}
        if code is not None:
            headers["X-Error-Code"] = code
        body = json.dumps({"error": message}).encode()
        self._send(status, body, {"Content-Type": "application/json", **headers}, head=self.command == "HEAD")
