"""A small Hugging Face Hub compatible server on 127.0.0.1, for the real ``huggingface_hub`` client via ``endpoint=``.

Serves what ``HfApi.model_info(files_metadata=True)`` and ``hf_hub_download`` call in huggingface_hub 2.4:

- ``GET /api/models/{owner}/{name}`` and ``/api/models/{owner}/{name}/revision/{rev}``: ``id``, ``sha`` and
  ``siblings`` (``rfilename``, ``size``, ``blobId``, ``lfs`` for weight files);
- ``HEAD``/``GET /{owner}/{name}/resolve/{rev}/{path}``: the file with ``X-Repo-Commit``, ``ETag`` and
  ``Content-Length``, and ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) on errors.
A repo with a token answers 401 ``RepoNotFound`` without ``Authorization: Bearer <token>``, as the Hub does for
private repos. No Xet headers are ever sent, so the client takes the plain HTTP path.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from urllib.parse import unquote, urlsplit

from tests.support.servers.background import BackgroundServer

_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str
    token: str | None = None
    revisions: tuple[str, ...] = ("main",)


class FakeHub(BackgroundServer):
    """``with FakeHub() as hub: hub.add_repo("me/lora", {"x.safetensors": data}); endpoint=hub.endpoint``."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.fail_resolve_gets = 0   # answer that many resolve GETs with 503 first
        self._lock = threading.Lock()
        super().__init__(_handler_class(self))

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_repo(self, repo_id: str, files: dict[str, bytes], token: str | None = None,
                 revisions: tuple[str, ...] = ("main",)) -> str:
        """Add a repo; returns its commit hash."""
        commit = hashlib.sha1(repo_id.encode() + b"".join(sorted(files.values()))).hexdigest()
        self.repos[repo_id] = Repo(files, commit, token, revisions)
        return commit

    def count(self, prefix: str = "") -> int:
        with self._lock:
            return sum(1 for _, path in self.requests if path.startswith(prefix))

    def record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def take_failure(self) -> bool:
        with self._lock:
            if self.fail_resolve_gets > 0:
                self.fail_resolve_gets -= 1
                return True
            return False



def _sibling(name: str, data: bytes) -> dict:
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    entry = {"rfilename": name, "size": len(data), "blobId": blob}
    if name.endswith(LFS_SUFFIXES):
        entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
    return entry


def _handler_class(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: object) -> None:
            """Quiet: tests read ``hub.requests``."""

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  send_body: bool = True) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def _repo(self, repo_id: str, rev: str | None, send_body: bool) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is not None and repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
                repo = None
                status = 401
            else:
                status = 404
            if repo is None:
                self._send(status, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound"}, send_body)
                return None
            if rev is not None and rev not in repo.revisions and rev != repo.commit:
                self._send(404, b'{"error":"Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"}, send_body)
                return None
            return repo

        def do_GET(self) -> None:
            self._answer(send_body=True)

        def do_HEAD(self) -> None:
            self._answer(send_body=False)

        def _answer(self, send_body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.record(self.command, path)
            info = _INFO.match(path)
            if info and self.command == "GET":
                repo = self._repo(info["repo"], info["rev"], send_body)
                if repo is not None:
                    body = {"id": info["repo"], "sha": repo.commit,
                            "siblings": [_sibling(name, data) for name, data in sorted(repo.files.items())]}
                    self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})
                return
            resolve = _RESOLVE.match(path)
            if resolve is None:
                self._send(404, b"not found", send_body=send_body)
                return
            repo = self._repo(resolve["repo"], resolve["rev"], send_body)
            if repo is None:
                return
            data = repo.files.get(resolve["file"])
            commit = {"X-Repo-Commit": repo.commit}
            if data is None:
                self._send(404, b"Entry not found", {**commit, "X-Error-Code": "EntryNotFound"}, send_body)
                return
            if send_body and hub.take_failure():
                self._send(503, b"busy", commit)
                return
            etag = hashlib.sha256(data).hexdigest()
            self._send(200, data, {**commit, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"},
                       send_body)

    return Handler
