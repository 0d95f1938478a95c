"""A small stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1, for push tests.

It speaks what ``huggingface_hub`` (0.36 and 1.x/2.x) calls to create a repo and upload a folder: whoami, repo
create and info, YAML validation, preupload, the Git LFS batch API with "basic" uploads, the NDJSON commit and
the tree listing. It does not speak Xet: clients must run with ``HF_HUB_DISABLE_XET=1``. Files that arrive are
kept in memory (``files(repo_id)``: path -> bytes), every request is recorded, and ``fail(...)`` makes chosen
requests answer an error, e.g. a 500 on the commit after the LFS uploads went through.

    with HubStandin(token="hf_x") as hub:          # serves until the block ends
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_x", "HF_HUB_DISABLE_XET": "1"}
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".h5", ".pt", ".pth", ".png", ".msgpack", ".ckpt", ".index")
MAX_BODY = 512 * 1024 * 1024  # refuse anything larger than a test could mean to send

ERROR_TEXT = {401: "Invalid credentials in Authorization header", 403: "You don't have the rights to do this",
              404: "Repository not found", 500: "Internal Error - We're working hard to fix this"}


@dataclass
class Repo:
    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict[str, Any]] = field(default_factory=list)  # {"summary", "paths", "oid"}


@dataclass
class Failure:
    status: int
    endpoint: str  # "commit", "preupload", "lfs-batch", "lfs-upload", "create", "whoami", "info"
    times: Optional[int]  # None: until cleared
    match: Optional[str]  # commit summary must contain it


class HubStandin:
    def __init__(self, token: str, user: str = "standin-user"):
        self.token, self.user = token, user
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.unhandled: list[str] = []
        self.failures: list[Failure] = []
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------------------------------- control
    def __enter__(self) -> "HubStandin":
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    @property
    def url(self) -> str:
        assert self._server is not None, "use HubStandin as a context manager"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail(self, status: int, endpoint: str = "commit", times: Optional[int] = 1,
             match: Optional[str] = None) -> None:
        """Answer ``status`` to the next ``times`` requests to ``endpoint`` (None: until ``clear_failures``)."""
        with self._lock:
            self.failures.append(Failure(status, endpoint, times, match))

    def clear_failures(self) -> None:
        with self._lock:
            self.failures.clear()

    def files(self, repo_id: str) -> dict[str, bytes]:
        """The repo's files at its head commit: path -> bytes."""
        return dict(self.repos[repo_id].files) if repo_id in self.repos else {}

    def commits(self, repo_id: str) -> list[dict[str, Any]]:
        return list(self.repos[repo_id].commits) if repo_id in self.repos else []

    # ------------------------------------------------------------------------------------------- logic
    def _take_failure(self, endpoint: str, summary: str = "") -> Optional[int]:
        with self._lock:
            for f in self.failures:
                if f.endpoint == endpoint and (f.match is None or f.match in summary):
                    if f.times is not None:
                        f.times -= 1
                        if f.times <= 0:
                            self.failures.remove(f)
                    return f.status
        return None

    def _commit(self, repo: Repo, lines: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
        header = next((line["value"] for line in lines if line.get("key") == "header"), {})
        summary = header.get("summary", "")
        status = self._take_failure("commit", summary)
        if status is not None:
            return status, {"error": ERROR_TEXT.get(status, "error")}
        changes: dict[str, Optional[bytes]] = {}
        for line in lines:
            key, value = line.get("key"), line.get("value", {})
            if key == "file":
                changes[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                blob = self.lfs.get(value["oid"])
                if blob is None or len(blob) != value["size"]:
                    return 422, {"error": f"LFS object {value['oid']} was not uploaded"}
                changes[value["path"]] = blob
            elif key in ("deletedFile", "deletedFolder"):
                changes[value["path"]] = None
        with self._lock:
            for path, data in changes.items():
                if data is None:
                    for p in [p for p in repo.files if p == path or p.startswith(path.rstrip("/") + "/")]:
                        del repo.files[p]
                else:
                    repo.files[path] = data
            oid = hashlib.sha1(f"{repo.repo_id}{len(repo.commits)}{summary}".encode()).hexdigest()
            repo.commits.append({"summary": summary, "paths": sorted(changes), "oid": oid})
        return 200, {"commitUrl": f"{self.url}/{repo.repo_id}/commit/{oid}", "commitOid": oid, "success": True}


def _read_chunked(rfile: Any) -> bytes:
    out = bytearray()
    while len(out) <= MAX_BODY:
        size = int(rfile.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return bytes(out)
        out += rfile.read(size)
        rfile.readline()
    raise ValueError("request body too large")


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandin
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection closes instead of holding a thread

    def log_message(self, *args: Any) -> None:  # quiet: the test reads hub.requests instead
        pass

    # ------------------------------------------------------------------------------------------- plumbing
    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return _read_chunked(self.rfile)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("request body too large")
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload: Any = None, content_type: str = "application/json") -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if status >= 400:
            self.send_header("X-Error-Message", (payload or {}).get("error", "error"))
        self.end_headers()
        self.wfile.write(data)
        self.hub.requests.append((self.command, self.path, status))

    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {self.hub.token}"

    def _error(self, status: int) -> None:
        self._send(status, {"error": ERROR_TEXT.get(status, "error")})

    def _gate(self, endpoint: str, auth: bool = True) -> bool:
        """False when an injected failure or a bad token answered the request already."""
        status = self.hub._take_failure(endpoint) if endpoint != "commit" else None
        if status is not None:
            self._error(status)
            return False
        if auth and not self._authorized():
            self._error(401)
            return False
        return True

    def _repo(self, repo_id: str) -> Optional[Repo]:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._send(404, {"error": ERROR_TEXT[404]})
        return repo

    # ------------------------------------------------------------------------------------------- routes
    def do_GET(self) -> None:
        path = urlparse(self.path).path
        if path == "/api/whoami-v2":
            if self._gate("whoami"):
                self._send(200, {"type": "user", "name": self.hub.user, "fullname": self.hub.user, "orgs": [],
                                 "auth": {"type": "access_token",
                                          "accessToken": {"displayName": "standin", "role": "write"}}})
            return
        if path == "/api/agent-harnesses":  # huggingface_hub 1.x+ fetches this registry for its user agent
            return self._send(200, {"standardEnvVars": [], "harnesses": {}})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
        if m:
            if self._gate("info") and (repo := self._repo(m.group(1))):
                prefix = (m.group(3) or "").strip("/")
                entries = [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                           for p, b in sorted(repo.files.items()) if not prefix or p.startswith(prefix + "/")]
                self._send(200, entries)
            return
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
        if m:
            if self._gate("info") and (repo := self._repo(m.group(1))):
                head = repo.commits[-1]["oid"] if repo.commits else "0" * 40
                self._send(200, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": head, "private": repo.private,
                                 "siblings": [{"rfilename": p} for p in sorted(repo.files)]})
            return
        self._unhandled()

    def do_PUT(self) -> None:
        m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", urlparse(self.path).path)
        if not m:
            return self._unhandled()
        data = self._body()  # read first: the client is sending it either way
        if not self._gate("lfs-upload", auth=False):  # a presigned URL: no Authorization header
            return
        if hashlib.sha256(data).hexdigest() != m.group(1):
            return self._send(400, {"error": "sha256 mismatch"})
        self.hub.lfs[m.group(1)] = data
        self._send(200)

    def do_POST(self) -> None:
        path = urlparse(self.path).path
        body = self._body()
        if path == "/api/repos/create":
            return self._create(json.loads(body or b"{}"))
        if path == "/api/validate-yaml":
            return self._send(200, {}) if self._gate("info") else None
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path)
        if m:
            if self._gate("preupload") and (self._repo(m.group(1))):
                files = json.loads(body)["files"]
                self._send(200, {"files": [{"path": f["path"], "shouldIgnore": False,
                                            "uploadMode": "lfs" if self._is_lfs(f) else "regular"}
                                           for f in files]})
            return
        m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if m:
            if self._gate("lfs-batch") and self._repo(m.group(1)):
                objects = []
                for obj in json.loads(body)["objects"]:
                    entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                    if obj["oid"] not in self.hub.lfs:  # already stored: no upload action
                        entry["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{obj['oid']}",
                                                       "expires_in": 3600}}
                    objects.append(entry)
                self._send(200, {"transfer": "basic", "objects": objects},
                           content_type="application/vnd.git-lfs+json")
            return
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path)
        if m:
            if self._gate("commit") and (repo := self._repo(m.group(1))):
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                self._send(*self.hub._commit(repo, lines))
            return
        self._unhandled()

    def _create(self, payload: dict[str, Any]) -> None:
        if not self._gate("create"):
            return
        namespace = payload.get("organization") or self.hub.user
        if namespace != self.hub.user:
            return self._send(403, {"error": f"You don't have the rights to create a model under {namespace}"})
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            return self._send(409, {"error": "You already created this model repo", "url": url})
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        self.hub.repos[repo_id] = Repo(repo_id, private)
        self._send(200, {"url": url, "name": repo_id})

    @staticmethod
    def _is_lfs(entry: dict[str, Any]) -> bool:
        sample = base64.b64decode(entry.get("sample", ""))
        return entry["path"].endswith(LFS_SUFFIXES) or b"\0" in sample or entry.get("size", 0) > 10 * 2**20

    def _unhandled(self) -> None:
        self.hub.unhandled.append(f"{self.command} {self.path}")
        self._send(404, {"error": f"not served by the stand-in: {self.command} {self.path}"})
