"""The gateway: HAProxy's config for one OpenAI-compatible endpoint in front of every service, and its control.

HAProxy does the work (routing on the body's `model`, least-connection balancing, health checks, retries on
another replica, the API key, Prometheus metrics); builder renders its config from the cluster file
(images/gateway/haproxy.cfg.j2) and reads its stats. What the gateway lets through, and in which order it
checks, is docs/security.md's. The key is read by HAProxy from a 0600 map file while it parses its config, so
it is in no config, argv or log, and compared in constant time (`secure_memcmp`).
"""

import ipaddress
import json
import os
import pwd
import re
import secrets
import signal
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import jinja2
import requests

from builder import PROJECT_ROOT
from builder.cluster import runtime
from builder.cluster.model import SERVICE_NAME, Loaded
from builder.core.errors import BuilderError, RecipeError
from builder.core.run import run
from builder.netboot.plan import AGENT_PORT

# The whole request body must fit HAProxy's buffer (gateway.max_request, 1 MiB by default) to be routed by
# `model` (and retried): 1 MiB holds the prompts of long-context agents; a larger body is refused with 413
# rather than misrouted.
MAX_CONNECTIONS = 1024
# One client address may hold this many of them (an agent fleet behind one NAT still fits).
MAX_PER_CLIENT = 256
# Before its key matched a client can hold a connection only this long (headers), and an authorized one has
# as long again for its body.
REQUEST_SECONDS = 10
# Headers: at most this many lines and bytes (an OpenAI SDK sends about 15 lines, well under 2 KiB).
MAX_HEADERS = 64
MAX_HEADER_BYTES = 16384
# Generation can take minutes before the first byte of a non-streamed answer.
SERVER_TIMEOUT = "10m"
# The only paths the gateway passes, by method (docs/security.md); GET /v1/models it answers itself.
POST_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")
TEMPLATES = PROJECT_ROOT / "images" / "gateway"
# The key as HAProxy reads it (a map from one word to the key), written from the key file, mode 0600.
KEY_MAP = "api-key.map"
# How often the gateway asks a netbooted node's agent whether a server may take requests (its device is there).
AGENT_INTERVAL = "2s"
# Where a reload finds each server's state as it was (`show servers state`, written just before).
SERVER_STATE = "server-state"
# How long a reload may take before its new worker answers on the runtime API.
RELOAD_SECONDS = 20
# Paths that reach the config must be plain words: HAProxy splits its lines on blanks and reads quotes.
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9/._+-]+")


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
            for s in loaded.cluster.services if loaded.servers(s.name)]
    return json.dumps({"object": "list", "data": data}, indent=1) + "\n"


def _plain_path(path: Path) -> str:
    if not _PLAIN_PATH.fullmatch(str(path)):
        raise BuilderError(f"{path}: the gateway's files must have a path of plain characters (letters, digits, "
                           "/ . _ + -)", "set XDG_CACHE_HOME to such a folder")
    return str(path)


def _ip_literal(value: str, what: str) -> str:
    """An IP address as HAProxy reads it (IPv6 in brackets), refusing names and zones."""
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        ip = None
    if ip is None or "%" in str(ip):
        raise BuilderError(f"{what} {value!r} is not an IP address", "give it as an IP address without a zone")
    return f"[{ip}]" if ip.version == 6 else str(ip)


@dataclass(frozen=True)
class Drop:
    """Who HAProxy becomes once it has bound its ports and read its files, when started as root."""

    uid: int
    gid: int
    chroot: str


def privilege_drop(state: Path) -> Drop | None:
    """Debian's haproxy account (its package makes one), else nobody, in an empty folder; None when builder does
    not run as root (HAProxy then keeps the caller's user and cannot chroot)."""
    if os.geteuid() != 0:
        return None
    for name in ("haproxy", "nobody"):
        try:
            account = pwd.getpwnam(name)
        except KeyError:
            continue
        empty = state / "empty"
        empty.mkdir(mode=0o555, exist_ok=True)
        return Drop(account.pw_uid, account.pw_gid, _plain_path(empty))
    raise BuilderError("there is neither a haproxy nor a nobody account to run the gateway as",
                       "install Debian's haproxy package (it creates the haproxy user)")


def _template() -> jinja2.Template:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False)
    return env.get_template("haproxy.cfg.j2")


def haproxy_config(loaded: Loaded, *, bind: str, addresses: dict[str, str], state: Path,
                   drop: Drop | None = None, agents: frozenset[str] = frozenset()) -> str:
    """The whole haproxy.cfg: users reach `bind`, backends are the services' servers at their nodes' addresses;
    the key is read from `state`/api-key.map and the model list from `state`/models.json. The llama-servers on
    the nodes in `agents` (netbooted ones) are also asked by agent-check, on the node's AGENT_PORT, whether they
    may take requests: a node whose device is missing answers `down` for them (images/netboot/plan.sh)."""
    gateway = loaded.cluster.gateway
    buffer_size = int(gateway.max_request)
    services = []
    for service in loaded.cluster.services:
        # The model's pattern keeps names plain; the template interpolates them as words, so check again here.
        if not re.fullmatch(SERVICE_NAME, service.name):
            raise BuilderError(f"{loaded.path.name}: service name {service.name!r} is not plain", "rename it")
        agent = {"port": AGENT_PORT, "interval": AGENT_INTERVAL} if service.engine == "llama.cpp" else None
        servers = [{"node": p.node, "address": f"{_ip_literal(addresses[p.node], 'node ' + p.node)}:{p.port}",
                    "port": int(p.port), "agent": agent if p.node in agents else None}
                   for p in loaded.servers(service.name)]
        if not servers:
            continue  # workers only: their head, outside the file, is not behind this gateway
        services.append({"name": service.name, "backend": backend_name(service.name), "servers": servers})
    paths = ", ".join(POST_PATHS)
    answers = {
        "health": "'{\"status\":\"ok\"}'",
        "headers_too_large": _error("headers_too_large", f"the request headers exceed {MAX_HEADER_BYTES} bytes"),
        "unauthorized": _error("invalid_api_key", "missing or wrong API key: send Authorization: Bearer KEY"),
        "get_only": _error("method_not_allowed", "/v1/models takes GET"),
        "post_only": _error("method_not_allowed", f"{paths} take POST"),
        "not_found": _error("not_found", f"unknown endpoint: POST {paths} or GET /v1/models"),
        "too_large": _error("request_too_large",
                            f"the request body is larger than the gateway buffer ({buffer_size} bytes)"),
        "missing_model": _error("missing_model", "you must provide a model parameter", param="model"),
        "model_not_found": "'{\"error\":{\"message\":\"The model `%[var(txn.model),json(utf8s)]` does not exist\","
                           "\"type\":\"invalid_request_error\",\"param\":\"model\",\"code\":\"model_not_found\"}}'",
    }
    http_errors = [
        (400, _error("bad_request", "the request is not valid HTTP or has too many headers")),
        (408, _error("request_timeout", f"the request was not sent within {REQUEST_SECONDS} s")),
        (502, _error("bad_gateway", "the model server failed to answer", "server_error")),
        (503, _error("service_unavailable", "no healthy server for this model right now; try again", "server_error")),
        (504, _error("timeout", "the model server did not answer in time", "server_error")),
    ]
    limits = {"connections": MAX_CONNECTIONS, "per_client": MAX_PER_CLIENT, "buffer": buffer_size,
              "header_count": MAX_HEADERS, "header_bytes": MAX_HEADER_BYTES, "request_seconds": REQUEST_SECONDS,
              "server_timeout": SERVER_TIMEOUT}
    source = "".join(c if c.isprintable() else "?" for c in loaded.path.name)
    return _template().render(
        source=source, limits=limits, key_map=_plain_path(state / KEY_MAP),
        admin_socket=_plain_path(runtime.socket_path(state)), server_state=_plain_path(state / SERVER_STATE),
        models_file=_plain_path(state / "models.json"), drop=drop, bind=_ip_literal(bind, "the gateway's address"),
        port=gateway.port, metrics_port=gateway.metrics_port, services=services, answers=answers,
        http_errors=http_errors)


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
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise RecipeError(f"{loaded.path.name}: gateway.key_file: {path} can be read by other users "
                              f"(mode {mode:04o})", f"chmod 600 {path}")
        return path
    path = state / "api-key"
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return path


def _write_private(path: Path, text: str) -> None:
    """`text` into `path`, readable by its owner only, whatever mode an older file had."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)


def write_gateway(loaded: Loaded, state: Path, bind: str, addresses: dict[str, str],
                  agents: frozenset[str] = frozenset()) -> Path:
    """haproxy.cfg, models.json and the key's map in `state` (a 0700 folder, 0600 files), checked with
    `haproxy -c`; the config's path. `agents`: the nodes that answer agent-check (haproxy_config)."""
    state.chmod(0o700)
    key = ensure_key(loaded, state).read_text().strip()
    if not key.isprintable() or any(c.isspace() for c in key):
        raise RecipeError(f"{loaded.path.name}: gateway.key_file: the key must be one word of printable characters",
                          "write the key alone on one line")
    _write_private(state / KEY_MAP, f"key {key}\n")
    _write_private(state / "models.json", models_document(loaded, int(loaded.path.stat().st_mtime)))
    config = state / "haproxy.cfg"
    _write_private(config, haproxy_config(loaded, bind=bind, addresses=addresses, state=state,
                                          drop=privilege_drop(state), agents=agents))
    run(["haproxy", "-c", "-q", "-f", config], timeout=30)
    return config


# glibc serves allocations above 128 KiB with mmap and returns them on free: every 1 MiB buffer HAProxy's pools
# give back to the system costs page faults when the next request needs it (about 35 faults a request,
# docs/benchmarks.md). Allocating them from the heap instead keeps freed buffers in the process.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=67108864"


def start_gateway(config: Path, pidfile: Path) -> None:
    """HAProxy in master-worker mode (-W), in the background: the pid file names the master, which a reload
    signals."""
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, (env.get("GLIBC_TUNABLES"), MALLOC_TUNABLES)))
    run(["haproxy", "-W", "-D", "-f", config, "-p", pidfile], timeout=30, env=env)


def apply_config(config: Path, pidfile: Path) -> bool:
    """Run the gateway on `config` (written by write_gateway into its state folder): started when none runs,
    else reloaded without dropping the requests in flight (a gateway without the runtime API, from an older
    builder, is restarted). True when this call started it."""
    state = config.parent
    if gateway_pid(pidfile) is not None and runtime.socket_path(state).is_socket():
        reload_gateway(state, pidfile)
        return False
    stop_gateway(pidfile)
    (state / SERVER_STATE).unlink(missing_ok=True)  # a fresh start forgets drains (a reload keeps them)
    start_gateway(config, pidfile)
    return True


def save_server_state(state: Path) -> None:
    """Each server's state (drained, in maintenance) where the next worker reads it (`server-state-file`); nothing
    when the running gateway has no runtime API (started by an older builder: it has no drains to keep)."""
    sock = runtime.socket_path(state)
    if not sock.is_socket():
        return
    answer = runtime.command(sock, "show servers state")
    tmp = state / f".{SERVER_STATE}.tmp"
    _write_private(tmp, answer)
    os.replace(tmp, state / SERVER_STATE)


def reload_gateway(state: Path, pidfile: Path) -> None:
    """A new worker on the config in `state`, and the old one finishes the requests it holds (SIGUSR2 to the
    master); returns once the new worker answers. Servers keep their state across it (save_server_state)."""
    pid = gateway_pid(pidfile)
    if pid is None:
        raise BuilderError(f"no gateway is running from {pidfile}", "builder cluster up FILE")
    sock = runtime.socket_path(state)
    before = runtime.worker_pid(sock)
    save_server_state(state)
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + RELOAD_SECONDS
    while True:
        try:
            if runtime.worker_pid(sock) != before:
                return
        except BuilderError:
            pass  # the socket moves from the old worker to the new one
        if time.monotonic() > deadline:
            raise BuilderError(f"the gateway did not start a new worker within {RELOAD_SECONDS} s of its reload",
                               f"check the config: haproxy -c -f {state / 'haproxy.cfg'}")
        time.sleep(0.1)


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
    why: str = ""  # what a netbooted node's agent said when it took the server out ("degraded: …")

    @property
    def healthy(self) -> bool:
        # a drained one (`builder cluster drain`) passes its checks too: it takes no new requests until enabled
        return runtime.serving(self.status, self.last_check)

    def fields(self) -> dict[str, object]:
        """What `cluster status` shows of a server: its health ("starting" before the first check), the last
        check, and its requests in flight and so far."""
        return {"health": self.status if self.last_check != "INI" else "starting", "last_check": self.last_check,
                "active": self.active, "requests": self.total, **({"why": self.why} if self.why else {})}


def read_stats(metrics_port: int) -> list[ServerState]:
    """Every backend server's state from HAProxy's CSV stats on loopback."""
    try:
        resp = requests.get(f"http://127.0.0.1:{metrics_port}/stats;csv", timeout=5)
        resp.raise_for_status()
    except requests.RequestException as exc:
        raise BuilderError(f"the gateway's stats on 127.0.0.1:{metrics_port} did not answer ({type(exc).__name__})",
                           "is the cluster up? `builder cluster up --local FILE`") from None
    return [ServerState(s.backend[len(backend_name("")):], s.node, s.status, s.active, s.total, s.check, s.why)
            for s in runtime.parse_stats(resp.text) if s.backend.startswith(backend_name(""))]
