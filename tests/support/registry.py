"""A real OCI registry for tests (Debian's docker-registry: the CNCF distribution registry) on 127.0.0.1,
optionally behind htpasswd, and a small fault-injecting proxy in front of it."""

import hashlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from builder.registry.client import RegistryClient, Repository
from conftest import free_port, require_tool
from servers import LoopbackListener

BINARY = "docker-registry"


@dataclass
class Registry:
    host: str  # 127.0.0.1:PORT
    proc: subprocess.Popen[bytes]
    root: Path
    auth: tuple[str, str] | None = None

    def url(self, path: str) -> str:
        return f"http://{self.host}/v2/{path}"

    def digest(self, repo: str, ref: str) -> str | None:
        """What the registry serves for repo:ref, read directly (bypassing builder's client)."""
        accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
        resp = requests.head(self.url(f"{repo}/manifests/{ref}"), headers={"Accept": accept},
                             auth=self.auth, timeout=10)
        return resp.headers["Docker-Content-Digest"] if resp.status_code == 200 else None

    def tags(self, repo: str) -> list[str]:
        resp = requests.get(self.url(f"{repo}/tags/list"), auth=self.auth, timeout=10)
        return list(resp.json().get("tags") or []) if resp.status_code == 200 else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def require_registry() -> None:
    require_tool(BINARY, "docker-registry")


@contextmanager
def start_registry(root: Path, auth: tuple[str, str] | None = None, *, token_auth: dict[str, Any] | None = None,
                   tls: tuple[Path, Path, Path] | None = None) -> Iterator[Registry]:
    """docker-registry serving root/storage on 127.0.0.1:<free port>; with auth, htpasswd (bcrypt); with
    token_auth, distribution's `auth: token` section; with tls (certificate, key, CA), https only."""
    require_registry()
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(root / "storage")}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }
    if auth:
        htpasswd = root / "htpasswd"
        subprocess.run(["htpasswd", "-Bbc", str(htpasswd), auth[0], auth[1]], check=True, capture_output=True)
        config["auth"] = {"htpasswd": {"realm": "test", "path": str(htpasswd)}}
    if token_auth:
        config["auth"] = token_auth
    if tls:
        config["http"] = {"addr": f"127.0.0.1:{port}", "tls": {"certificate": str(tls[0]), "key": str(tls[1])}}
    (root / "config.yml").write_text(json.dumps(config))  # JSON is YAML
    log = open(root / "registry.log", "wb")
    # The registry reads REGISTRY_* variables as configuration (REGISTRY_AUTH_FILE would become auth.file).
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    proc = subprocess.Popen([BINARY, "serve", str(root / "config.yml")], stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    registry = Registry(f"127.0.0.1:{port}", proc, root, auth)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                probe = f"https://{registry.host}/v2/" if tls else registry.url("")
                if requests.get(probe, timeout=2, verify=str(tls[2]) if tls else True).status_code in (200, 401):
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"registry did not start:\n{(root / 'registry.log').read_text()[-2000:]}")
            time.sleep(0.1)
        yield registry
    finally:
        registry.stop()
        log.close()


@dataclass
class Proxy:
    """Forwards 127.0.0.1:port to the registry; `fault` decides per request what goes wrong."""

    upstream: str
    fault: Callable[[str, str, int], str | None] = lambda method, path, length: None  # None | "500" | "cut"
    cut_after: int = 64 * 1024  # bytes of a request body forwarded before a "cut"
    on_cut: Callable[[], None] = lambda: None
    seen: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, what happened)
    port: int = 0

    def __post_init__(self) -> None:
        self.listener = LoopbackListener(self._handle)
        self.port = self.listener.port

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.listener.close()

    def _handle(self, client: socket.socket) -> None:
        with client:
            client.settimeout(30)
            while True:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = client.recv(65536)
                    if not chunk:
                        return
                    head += chunk
                raw_head, _, body = head.partition(b"\r\n\r\n")
                lines = raw_head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
                length = int(headers.get("content-length", "0"))
                action = self.fault(method, path, length)
                if action == "500":
                    while len(body) < length:
                        more = client.recv(min(65536, length - len(body)))
                        if not more:
                            return
                        body += more
                    self.seen.append((method, path, "500"))
                    client.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                                   b"Content-Length: 2\r\n\r\n{}")
                    continue
                if action == "cut":
                    while len(body) < min(length, self.cut_after):
                        more = client.recv(65536)
                        if not more:
                            break
                        body += more
                    self.seen.append((method, path, f"cut after {len(body)} of {length} bytes"))
                    self.on_cut()
                    return  # connection dropped mid-request
                self.seen.append((method, path, "forwarded"))
                if not self._forward(client, method, path, headers, body, length):
                    return

    def _forward(self, client: socket.socket, method: str, path: str, headers: dict[str, str], body: bytes,
                 length: int) -> bool:
        while len(body) < length:
            more = client.recv(min(1 << 20, length - len(body)))
            if not more:
                return False
            body += more
        forward = {k: v for k, v in headers.items() if k not in ("host", "connection", "content-length")}
        try:
            resp = requests.request(method, f"http://{self.upstream}{path}", headers=forward,
                                    data=body if length else None, allow_redirects=False, timeout=60)
        except requests.RequestException:
            return False
        out = [f"HTTP/1.1 {resp.status_code} {resp.reason}"]
        content = resp.content
        for key, value in resp.headers.items():
            if key.lower() in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                continue
            if key.lower() == "location":
                value = value.replace(self.upstream, self.host)
            out.append(f"{key}: {value}")
        out.append(f"Content-Length: {len(content)}")
        client.sendall(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + (b"" if method == "HEAD" else content))
        return True


def publish_empty_image(reg: Registry, repository: str, tag: str) -> str:
    """An image with no layers pushed to `reg` under REPOSITORY:TAG (as `builder publish` leaves one); its
    reference by digest, as the registry serves it."""
    client = RegistryClient(Repository(reg.host, repository), push=True)
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    digest = "sha256:" + hashlib.sha256(config).hexdigest()
    client.push_blob(digest, len(config), config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": digest, "size": len(config)}, "layers": []}).encode()
    client.put_manifest(tag, manifest, "application/vnd.oci.image.manifest.v1+json")
    return f"{reg.host}/{repository}@{reg.digest(repository, tag)}"
