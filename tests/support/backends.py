"""Stand-ins for a model server on 127.0.0.0/8, behind the real HAProxy in the gateway tests: they answer
`/health` and the OpenAI API's chat completions with OpenAI-shaped JSON, and can be told to hang (accept
connections, answer nothing, health checks included) or to hold completions until released (requests in
flight for drain and reload tests)."""

import contextlib
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from builder.cluster.gateway import apply_config, read_stats, stop_gateway, write_gateway
from builder.cluster.local import Local
from builder.cluster.model import load_cluster
from builder.cluster.remote import Remote

# the longest a stand-in holds a request (a hung or held one), so no test thread outlives its test for long
HOLD_LIMIT = 120.0


@dataclass
class Backend:
    host: str
    port: int
    name: str
    hang: threading.Event = field(default_factory=threading.Event)  # set: answer nothing
    down: threading.Event = field(default_factory=threading.Event)  # set: 503 to everything (booting, broken)
    hold: threading.Event = field(default_factory=threading.Event)  # set: completions wait for `release`
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)
    received: int = 0  # completions that reached it
    answered: int = 0
    held: int = 0  # completions waiting now (held or hung)
    server: ThreadingHTTPServer | None = None
    booted: list[str] = field(default_factory=list)  # the root images it booted (a node's stand-in, see below)

    def count(self, what: str, delta: int = 1) -> None:
        with self.lock:
            setattr(self, what, getattr(self, what) + delta)

    def stop(self) -> None:
        self.stopping.set()
        self.release.set()
        self.hang.clear()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def completion(model: str, backend: str) -> bytes:
    return json.dumps({"id": "chatcmpl-0", "object": "chat.completion", "created": 0, "model": model,
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": f"from {backend}"}}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}).encode()


def start_backend(host: str, port: int, name: str) -> Backend:
    backend = Backend(host, port, name)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _hung(self) -> bool:
            """Accepted, answers nothing while the backend hangs; True when it hung."""
            if not backend.hang.is_set():
                return False
            backend.count("held")
            try:
                backend.release.wait(HOLD_LIMIT)
            finally:
                backend.count("held", -1)
            self.close_connection = True
            return True

        def do_GET(self) -> None:
            if self._hung():
                return
            if backend.down.is_set():
                self._answer(503, b'{"error":{"message":"Loading model","type":"unavailable_error","code":503}}')
            elif self.path == "/health":
                self._answer(200, b'{"status":"ok"}')
            else:
                self._answer(404, b'{"error":{"message":"not found","type":"invalid_request_error"}}')

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path != "/v1/chat/completions":
                self._answer(404, b'{"error":{"message":"not found","type":"invalid_request_error"}}')
                return
            backend.count("received")
            if self._hung():
                return
            if backend.down.is_set():
                self._answer(503, b'{"error":{"message":"Loading model","type":"unavailable_error","code":503}}')
                return
            if backend.hold.is_set():
                backend.count("held")
                try:
                    backend.release.wait(HOLD_LIMIT)
                finally:
                    backend.count("held", -1)
            model = json.loads(body or b"{}").get("model", "")
            self._answer(200, completion(str(model), backend.name))
            backend.count("answered")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # HAProxy closes check and killed connections without waiting

    backend.server = Server((host, port), Handler)
    threading.Thread(target=backend.server.serve_forever, daemon=True).start()
    return backend


@dataclass(frozen=True)
class LoopbackGateway:
    """The real HAProxy, configured by builder for a cluster file whose service `chat` runs on nodes a and b."""

    url: str
    key: str
    state: Path
    metrics_port: int
    cluster: Path
    backends: dict[str, Backend]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def ask(self, timeout: float = 60) -> Any:
        import requests
        return requests.post(f"{self.url}/v1/chat/completions", headers=self.headers(), timeout=timeout,
                             json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]})


def cluster_file(folder: Path, port: int, gateway_port: int, metrics_port: int, nodes: tuple[str, ...],
                 addresses: dict[str, str] | None = None) -> Path:
    """A cluster file with one llama.cpp service `chat` on `nodes`, its model a small file beside it; with
    `addresses`, the nodes are netbooted ones at those addresses and the control node is 127.0.0.1."""
    import hashlib

    import yaml
    model = b"GGUF" + bytes(1000)
    (folder / "tiny.gguf").write_bytes(model)
    data: dict[str, Any] = {
            "gateway": {"port": gateway_port, "metrics_port": metrics_port},
            "nodes": [{"name": n, "mac": f"52:54:00:12:34:0{i}", "target": "cpu", "memory": "4GiB",
                       **({"address": addresses[n]} if addresses else {})} for i, n in enumerate(nodes)],
            "services": [{"name": "chat", "model": "tiny.gguf", "sha256": hashlib.sha256(model).hexdigest(),
                          "nodes": list(nodes), "port": port}]}
    if addresses:
        data["control"] = {"address": "127.0.0.1", "http_port": 8000}
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def wait_for(what: str, check: Callable[[], bool], limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {limit} s"
        time.sleep(0.1)


def states(gw: LoopbackGateway) -> dict[str, str]:
    """Each node's server status in the gateway's stats (UP, DOWN, DRAIN, MAINT)."""
    return {s.node: s.status for s in read_stats(gw.metrics_port) if s.service == "chat"}


@contextlib.contextmanager
def loopback_gateway(folder: Path, free_port: Callable[[], int], monkeypatch: Any,
                     nodes: tuple[str, ...] = ("a", "b"), netboot: bool = False) -> Iterator[LoopbackGateway]:
    """The gateway builder writes for a cluster file whose `chat` runs on `nodes` (127.0.0.1, 127.0.0.2, …), in the
    state folder `builder cluster … --local` uses for that file, with a stand-in backend on each node. BUILDER_CACHE
    (set through pytest's `monkeypatch`, so commands run by the test see it) is a short folder: the runtime API's
    socket path must fit in 107 bytes. With `netboot`, the nodes are netbooted ones (mac and address) and the
    gateway is in the state folder of the netbooted nodes' gateway (`builder cluster … FILE` without --local)."""
    cache = Path(tempfile.mkdtemp(prefix="bgw-"))
    monkeypatch.setenv("BUILDER_CACHE", str(cache))
    port, gw_port, metrics = free_port(), free_port(), free_port()
    addresses = {n: f"127.0.0.{i + 1}" for i, n in enumerate(nodes)}
    backends = {n: start_backend(addresses[n], port, n) for n in nodes}
    path = cluster_file(folder, port, gw_port, metrics, nodes, addresses if netboot else None)
    loaded = load_cluster(path)
    state = Remote.of(loaded).state if netboot else Local.of(loaded).state
    config = write_gateway(loaded, state, "127.0.0.1", addresses)
    pidfile = state / "haproxy.pid"
    try:
        apply_config(config, pidfile)
        gw = LoopbackGateway(f"http://127.0.0.1:{gw_port}", (state / "api-key").read_text().strip(), state,
                             metrics, path, backends)
        wait_for("every server healthy", lambda: all(s.healthy for s in read_stats(metrics)))
        yield gw
    finally:
        stop_gateway(pidfile)
        for backend in backends.values():
            backend.stop()
        shutil.rmtree(cache, ignore_errors=True)


def boot_from(root: Path, stem: str) -> str:
    """The root image a node with this MAC stem boots, read the way its boot.ipxe chains: its pin's script, else
    the current generation's (builder/netboot/publish.py)."""
    pinned = root / "pins" / f"{stem}.ipxe"
    script = pinned if pinned.exists() else root / "current" / "nodes" / f"{stem}.ipxe"
    words = [w for w in script.read_text().split() if w.startswith("builder.sha256=")]
    return words[0].split("=", 1)[1]


def rebootable(backend: Backend, flag: Path, root: Path, stem: str, broken: set[str],
               down_seconds: float = 3.0) -> None:
    """Make `backend` stand for a netbooted node: when `flag` appears (what the test's reboot command makes), it
    goes down (503, as llama-server while it loads) for `down_seconds`, boots the root image its boot files name
    now, and serves again unless that image is in `broken` (a generation whose server never becomes healthy)."""
    backend.booted.append(boot_from(root, stem))

    def watch() -> None:
        while not backend.stopping.is_set():
            if flag.exists():
                flag.unlink()
                backend.down.set()
                time.sleep(down_seconds)
                image = boot_from(root, stem)
                backend.booted.append(image)
                if image not in broken:
                    backend.down.clear()
            time.sleep(0.05)
    threading.Thread(target=watch, daemon=True).start()
