"""The gateway: HAProxy's config for one OpenAI-compatible endpoint in front of every service, and its control.

HAProxy does the work (routing on the body's `model`, least-connection balancing, health checks, retries on
another replica, the API key, Prometheus metrics); builder writes its config from the cluster file and reads
its stats. The key is read by HAProxy from a file (`-f` pattern file), so it is in no config, argv or log.
"""

import csv
import io
import json
import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from builder.cluster.model import Loaded
from builder.core.errors import BuilderError, RecipeError
from builder.core.run import run

# The whole request body must fit HAProxy's buffer (gateway.max_request, 1 MiB by default) to be routed by
# `model` (and retried): 1 MiB holds the prompts of long-context agents; a larger body is refused with 413
# rather than misrouted.
MAX_CONNECTIONS = 1024
# Generation can take minutes before the first byte of a non-streamed answer.
SERVER_TIMEOUT = "10m"


def _error(code: str, message: str, kind: str = "invalid_request_error", param: str | None = None) -> str:
    """An OpenAI-style error body, single-quoted for HAProxy (no escapes inside single quotes)."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}},
                      separators=(",", ":"))
    assert "'" not in body
    return f"'{body}'"


def backend_name(service: str) -> str:
    return f"svc_{service}"


def models_document(loaded: Loaded, created: int) -> str:
    """What `GET /v1/models` answers: the cluster's services, as OpenAI lists models."""
    data = [{"id": s.name, "object": "model", "created": created, "owned_by": "builder"}
            for s in loaded.cluster.services]
    return json.dumps({"object": "list", "data": data}, indent=1) + "\n"


def haproxy_config(loaded: Loaded, *, bind: str, addresses: dict[str, str], state: Path, key_file: Path) -> str:
    """The whole haproxy.cfg: users reach `bind`, backends are the services' servers at their nodes' addresses."""
    gateway = loaded.cluster.gateway
    buffer_size = int(gateway.max_request)
    names = " ".join(s.name for s in loaded.cluster.services)
    lines = [
        "# Written by builder from " + loaded.path.name + ": regenerate it, do not edit.",
        "global",
        f"    maxconn {MAX_CONNECTIONS}",
        f"    tune.bufsize {buffer_size}",
        "",
        "defaults",
        "    mode http",
        "    timeout connect 2s",
        "    timeout client 10m",
        f"    timeout server {SERVER_TIMEOUT}",
        "    timeout http-request 60s",
        "    timeout queue 60s",
        "    # a request that could not reach a server is sent to another one (the body is buffered)",
        "    retries 3",
        "    option redispatch 1",
        "    retry-on conn-failure empty-response",
        "    # tokens of a stream are forwarded as they come, not coalesced",
        "    option http-no-delay",
        "    http-error status 502 content-type application/json string "
        + _error("bad_gateway", "the model server failed to answer", "server_error"),
        "    http-error status 503 content-type application/json string "
        + _error("service_unavailable", "no healthy server for this model right now; try again", "server_error"),
        "    http-error status 504 content-type application/json string "
        + _error("timeout", "the model server did not answer in time", "server_error"),
        "",
        "frontend api",
        f"    bind {bind}:{gateway.port}",
        "    option http-buffer-request",
        "    http-request set-var(txn.key) req.fhdr(authorization),word(2,' ')",
        "    acl authorized req.fhdr(authorization),word(1,' ') -m str Bearer",
        f"    acl key_ok var(txn.key) -m str -f {key_file}",
        "    http-request return status 401 content-type application/json string "
        + _error("invalid_api_key", "missing or wrong API key: send Authorization: Bearer KEY")
        + " unless authorized key_ok",
        "    http-request return status 200 content-type application/json file "
        f"{state / 'models.json'} if {{ method GET }} {{ path /v1/models }}",
        "    http-request return status 404 content-type application/json string "
        + _error("not_found", "unknown endpoint: POST /v1/completions, /v1/chat/completions, /v1/embeddings "
                 "or GET /v1/models") + " unless { method POST }",
        "    http-request set-var(txn.size) req.body_size",
        "    http-request return status 413 content-type application/json string "
        + _error("request_too_large", f"the request body is larger than the gateway buffer ({buffer_size} bytes)")
        + " if { req.body_len,sub(txn.size) lt 0 }",
        "    http-request set-var(txn.model) req.body,json_query('$.model')",
        "    http-request return status 400 content-type application/json string "
        + _error("missing_model", "you must provide a model parameter", param="model")
        + " unless { var(txn.model) -m found }",
        f"    acl known_model var(txn.model) -m str {names}",
        "    http-request return status 404 content-type application/json lf-string "
        + "'{\"error\":{\"message\":\"The model `%[var(txn.model),json(utf8s)]` does not exist\","
        + "\"type\":\"invalid_request_error\",\"param\":\"model\",\"code\":\"model_not_found\"}}'"
        + " unless known_model",
    ]
    for service in loaded.cluster.services:
        lines.append(f"    use_backend {backend_name(service.name)} if {{ var(txn.model) -m str {service.name} }}")
    lines += [
        "",
        "frontend metrics",
        f"    bind 127.0.0.1:{gateway.metrics_port}",
        "    http-request use-service prometheus-exporter if { path /metrics }",
        "    stats enable",
        "    stats uri /stats",
        "    stats refresh 5s",
    ]
    for service in loaded.cluster.services:
        lines += [
            "",
            f"backend {backend_name(service.name)}",
            "    balance leastconn",
            "    # llama-server answers 503 while it loads the model; vllm serve opens its port once loaded",
            "    option httpchk GET /health",
            "    http-check expect status 200",
            "    default-server inter 1s fastinter 500ms downinter 1s rise 2 fall 2",
        ]
        for process in loaded.servers(service.name):
            lines.append(f"    server {process.node} {addresses[process.node]}:{process.port} check")
    return "\n".join(lines) + "\n"


def ensure_key(loaded: Loaded, state: Path) -> Path:
    """The API key's file: the cluster's key_file, else one generated once in the state folder (mode 0600)."""
    gateway = loaded.cluster.gateway
    if gateway.key_file:
        path = loaded.path.parent / gateway.key_file
        try:
            key = path.read_text().strip()
        except OSError as exc:
            raise RecipeError(f"{loaded.path.name}: gateway.key_file: cannot read {path}: {exc.strerror}",
                              "point key_file at a file holding the API key, or leave it out to generate one"
                              ) from None
        if not key or any(c.isspace() for c in key):
            raise RecipeError(f"{loaded.path.name}: gateway.key_file: {path} must hold one key without spaces",
                              "write the key alone on one line")
        return path
    path = state / "api-key"
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return path


def write_gateway(loaded: Loaded, state: Path, bind: str, addresses: dict[str, str]) -> Path:
    """haproxy.cfg and models.json in `state`, checked with `haproxy -c`; the config's path."""
    key_file = ensure_key(loaded, state)
    (state / "models.json").write_text(models_document(loaded, int(loaded.path.stat().st_mtime)))
    config = state / "haproxy.cfg"
    config.write_text(haproxy_config(loaded, bind=bind, addresses=addresses, state=state, key_file=key_file))
    run(["haproxy", "-c", "-q", "-f", config], timeout=30)
    return config


# glibc serves allocations above 128 KiB with mmap and returns them on free: every 1 MiB buffer HAProxy's pools
# give back to the system costs page faults when the next request needs it (about 35 faults a request,
# docs/benchmarks.md). Allocating them from the heap instead keeps freed buffers in the process.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=67108864"


def gateway_env() -> dict[str, str]:
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, (env.get("GLIBC_TUNABLES"), MALLOC_TUNABLES)))
    return env


def start_gateway(config: Path, pidfile: Path) -> None:
    run(["haproxy", "-D", "-f", config, "-p", pidfile], timeout=30, env=gateway_env())


def gateway_pid(pidfile: Path) -> int | None:
    """The running gateway's pid, or None (no file, or the pid is gone or is another program now)."""
    try:
        pid = int(pidfile.read_text().split()[0])
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        return None
    return pid if comm == "haproxy" else None


def stop_gateway(pidfile: Path) -> bool:
    """Stop the gateway whose pid the file holds; False when none was running."""
    pid = gateway_pid(pidfile)
    if pid is None:
        pidfile.unlink(missing_ok=True)
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pidfile.unlink(missing_ok=True)
        return False
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    pidfile.unlink(missing_ok=True)
    return True


@dataclass(frozen=True)
class ServerState:
    service: str
    node: str
    status: str  # UP, DOWN, MAINT, "no check" … as HAProxy reports it
    active: int  # requests in flight
    total: int  # requests sent so far
    last_check: str  # L7OK when the last /health answered 200; INI before the first check

    @property
    def healthy(self) -> bool:
        # HAProxy counts a server UP before its first check; only a passed check says it serves.
        return self.status == "UP" and self.last_check == "L7OK"

    def fields(self) -> dict[str, object]:
        """What `cluster status` shows of a server: its health ("starting" before the first check), the last
        check, and its requests in flight and so far."""
        return {"health": self.status if self.last_check != "INI" else "starting", "last_check": self.last_check,
                "active": self.active, "requests": self.total}


def read_stats(metrics_port: int) -> list[ServerState]:
    """Every backend server's state from HAProxy's CSV stats on loopback."""
    try:
        resp = requests.get(f"http://127.0.0.1:{metrics_port}/stats;csv", timeout=5)
        resp.raise_for_status()
    except requests.RequestException as exc:
        raise BuilderError(f"the gateway's stats on 127.0.0.1:{metrics_port} did not answer ({type(exc).__name__})",
                           "is the cluster up? `builder cluster up --local FILE`") from None
    rows = csv.DictReader(io.StringIO(resp.text.lstrip("# ")))
    out = []
    for row in rows:
        if row["pxname"].startswith("svc_") and row["svname"] not in ("FRONTEND", "BACKEND"):
            out.append(ServerState(row["pxname"][4:], row["svname"], row["status"].split()[0],
                                   int(row["scur"] or 0), int(row["stot"] or 0), row["check_status"].strip("* ")))
    return out
