"""A stand-in for the Hugging Face hub on 127.0.0.1: the few answers huggingface_hub's public API needs to
resolve a revision and download files, for repositories held in memory.

* GET /api/models/ORG/REPO/revision/REV (`HfApi.model_info`, `?blobs=true` for `files_metadata=True`):
  the commit (`sha`) and the files (`siblings`: size, git blob id, and for LFS files their sha256 and size).
* HEAD and GET /ORG/REPO/resolve/REV/PATH (`hf_hub_download`, `get_hf_file_metadata`): the bytes, with
  X-Repo-Commit, ETag (an LFS file's sha256, else its git blob id, as the hub gives them) and Content-Length.

Unknown repositories, revisions and files get the hub's 404 with its X-Error-Code. Every request is recorded
(method, path, Authorization header) so tests can see what the client sent.
"""

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


@dataclass
class Repo:
    commit: str
    files: dict[str, bytes]
    lfs: set[str]  # the files stored with Git LFS
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    # Metadata served instead of the bytes' own (a hub that lies about a file): path -> bytes it claims to hold
    claimed: dict[str, bytes] = field(default_factory=dict)

    def meta_bytes(self, path: str) -> bytes:
        return self.claimed.get(path, self.files[path])

    def etag(self, path: str) -> str:
        data = self.meta_bytes(path)
        return hashlib.sha256(data).hexdigest() if path in self.lfs else git_blob_id(data)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    authorization: str | None


class LocalHub:
    """The server; use as a context manager. `url` is what HF_ENDPOINT names."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                hub._answer(self, body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                hub._answer(self, body=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "LocalHub":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def add(self, repo_id: str, files: dict[str, bytes], lfs: set[str], commit: str,
            refs: tuple[str, ...] = ("main",)) -> Repo:
        repo = Repo(commit, dict(files), set(lfs), {ref: commit for ref in refs})
        self.repos[repo_id] = repo
        return repo

    def _commit(self, repo: Repo, revision: str) -> str | None:
        if re.fullmatch(r"[0-9a-f]{40}", revision):
            return revision if revision == repo.commit else None
        return repo.refs.get(revision)

    def _send(self, handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str],
              with_body: bool) -> None:
        handler.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            handler.send_header(name, value)
        handler.end_headers()
        if with_body:
            handler.wfile.write(body)

    def _missing(self, handler: BaseHTTPRequestHandler, code: str, message: str, with_body: bool) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(handler, 404, body, {"Content-Type": "application/json", "X-Error-Code": code,
                                        "X-Error-Message": message}, with_body)

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = handler.path.split("?", 1)[0]
        self.requests.append(Request(handler.command, path, handler.headers.get("Authorization")))
        info = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        found = info or resolve
        if not found:
            return self._missing(handler, "EntryNotFound", f"no route {path}", body)
        repo = self.repos.get(found[1])
        if repo is None:
            return self._missing(handler, "RepoNotFound", f"Repository {found[1]} not found", body)
        commit = self._commit(repo, found[2])
        if commit is None:
            return self._missing(handler, "RevisionNotFound", f"Invalid rev id: {found[2]}", body)
        if info:
            siblings = []
            for name in sorted(repo.files):
                meta = repo.meta_bytes(name)
                sibling: dict[str, Any] = {"rfilename": name, "size": len(meta), "blobId": git_blob_id(meta)}
                if name in repo.lfs:
                    sibling["lfs"] = {"sha256": hashlib.sha256(meta).hexdigest(), "size": len(meta),
                                      "pointerSize": 134}
                siblings.append(sibling)
            doc = {"id": found[1], "modelId": found[1], "sha": commit, "private": False, "siblings": siblings}
            return self._send(handler, 200, json.dumps(doc).encode(), {"Content-Type": "application/json"}, body)
        name = found[3]
        if name not in repo.files:
            return self._missing(handler, "EntryNotFound", f"{name} does not exist at {commit}", body)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{repo.etag(name)}"', "Content-Type": "application/octet-stream"}
        if name in repo.lfs:
            headers["X-Linked-Etag"] = f'"{repo.etag(name)}"'
            headers["X-Linked-Size"] = str(len(repo.meta_bytes(name)))
        self._send(handler, 200, repo.files[name], headers, body)


def placeholder_hub(hub: LocalHub, models: list[str]) -> None:
    """Serve a placeholder GGUF (its own bytes per name) under each `hf://ORG/REPO@REV/FILE` name, at commit
    0…0: what docs/examples/cluster.lock was made from (its values are not the real models')."""
    for model in models:
        repo, rest = model.removeprefix("hf://").split("@", 1)
        file = rest.split("/", 1)[1]
        hub.add(repo, {file: f"GGUF placeholder for {model}: run `builder lock FILE` yourself\n".encode()}, {file},
                "0" * 40, refs=(rest.split("/", 1)[0],))
