"""Servers on 127.0.0.1 for the registry tests: a test CA (openssl), a token service that signs real JWTs
for docker-registry's `auth: token`, a CONNECT proxy, and a registry that answers from a table of crafted
replies (for what no real registry would send)."""

import base64
import hashlib
import json
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

# --- a test CA -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TestCA:
    ca: Path  # the CA certificate clients must trust
    cert: Path  # a server certificate for the names given, signed by the CA
    key: Path


def make_ca(folder: Path, names: tuple[str, ...] = ("registry.test", "localhost"),
            ips: tuple[str, ...] = ("127.0.0.1",)) -> TestCA:
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=builder test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", f"/CN={names[0]}")
    san = ",".join([f"DNS:{n}" for n in names] + [f"IP:{ip}" for ip in ips])
    (folder / "ext.cnf").write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
                                    "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
                                    "authorityKeyIdentifier=keyid\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")
    return TestCA(folder / "ca.crt", folder / "server.crt", folder / "server.key")


# --- a table-driven HTTP server ------------------------------------------------------------------------

@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    cut_at: int | None = None  # send only this many body bytes (Content-Length still says all), then close
    no_length: bool = False  # no Content-Length: the body ends when the connection closes


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


Route = Reply | Callable[[Seen], Reply]


class Crafted:
    """Answers (METHOD, PATH) from `routes` (PATH without the query); 404 with a registry error otherwise."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Route] = {}
        self.fallback: Callable[[Seen], Reply | None] = lambda seen: None  # asked when no route matches
        self.seen: list[Seen] = []
        crafted = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                crafted.seen.append(seen)
                route = crafted.routes.get((self.command, urlsplit(self.path).path))
                if route is None and self.command == "HEAD":
                    route = crafted.routes.get(("GET", urlsplit(self.path).path))
                reply = (route(seen) if callable(route) else route) if route is not None else \
                    crafted.fallback(seen) or Reply(404, {"Content-Type": "application/json"},
                                                    b'{"errors":[{"code":"NAME_UNKNOWN","message":"not here"}]}')
                self.send_response(reply.status)
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                if reply.no_length:
                    self.send_header("Connection", "close")
                else:
                    self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(reply.body if reply.cut_at is None else reply.body[:reply.cut_at])
                if reply.cut_at is not None or reply.no_length:
                    self.close_connection = True
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- a token service for docker-registry's `auth: token` ----------------------------------------------

def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenService:
    """Issues RS256 JWTs the registry verifies against `cert` (x5c header), for user/password only.
    `lifetime` is the JWT's own validity; `expires_in` what the reply announces; `reply` overrides all."""

    folder: Path
    user: str
    password: str
    service: str = "builder-test-registry"
    issuer: str = "builder-test-issuer"
    lifetime: float = 300
    expires_in: int | None = 300
    identity_token: str | None = None  # accepted as an OAuth2 refresh_token on POST
    reply: Callable[[Seen], Reply] | None = None
    issued: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "sign.key",
                        "-out", "sign.crt", "-days", "2", "-subj", "/CN=builder test token signer"],
                       check=True, capture_output=True, cwd=self.folder)
        self.cert = self.folder / "sign.crt"
        der = subprocess.run(["openssl", "x509", "-in", "sign.crt", "-outform", "DER"], check=True,
                             capture_output=True, cwd=self.folder).stdout
        self._x5c = base64.b64encode(der).decode()
        self.crafted = Crafted()
        self.crafted.routes[("GET", "/token")] = self._answer
        self.crafted.routes[("POST", "/token")] = self._answer

    @property
    def realm(self) -> str:
        return f"http://{self.crafted.host}/token"

    def registry_auth(self) -> dict[str, Any]:
        return {"token": {"realm": self.realm, "service": self.service, "issuer": self.issuer,
                          "rootcertbundle": str(self.cert)}}

    def _answer(self, seen: Seen) -> Reply:
        if self.reply is not None:
            return self.reply(seen)
        query = parse_qs(urlsplit(seen.path).query)
        if seen.method == "POST":
            form = parse_qs(seen.body.decode())
            query = form
            ok = self.identity_token is not None and form.get("refresh_token") == [self.identity_token]
        else:
            expected = "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            ok = seen.headers.get("authorization") == expected
        if not ok:
            return Reply(401, {"Content-Type": "application/json"}, b'{"details":"bad credentials"}')
        access = []
        for scope in query.get("scope", []):
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = time.time()
        claims = {"iss": self.issuer, "sub": self.user, "aud": self.service, "iat": int(now) - 5,
                  "nbf": int(now) - 5, "exp": int(now + self.lifetime), "jti": hashlib.sha256(
                      str(now).encode()).hexdigest()[:16], "access": access}
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.folder / "sign.key")],
                                   input=signing_input.encode(), check=True, capture_output=True).stdout
        token = f"{signing_input}.{_b64url(signature)}"
        self.issued.append(claims)
        body: dict[str, Any] = {"token": token, "access_token": token}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        return Reply(200, {"Content-Type": "application/json"}, json.dumps(body).encode())

    def close(self) -> None:
        self.crafted.close()


# --- a raw TCP listener on loopback --------------------------------------------------------------------

class LoopbackListener:
    """Listens on 127.0.0.1 (a free port) and hands each connection to `handle` on a thread of its own."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self.handle = handle
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]
        self.stopped = False
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        self.stopped = True
        self.sock.close()

    def _serve(self) -> None:
        while not self.stopped:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.handle, args=(client,), daemon=True).start()


# --- a CONNECT proxy -----------------------------------------------------------------------------------

class ConnectProxy:
    """An HTTPS proxy on 127.0.0.1: CONNECT NAME:PORT is tunnelled to routes[NAME:PORT] (a loopback
    HOST:PORT) and refused for anything else, so nothing leaves the machine."""

    def __init__(self, routes: dict[str, str]) -> None:
        self.routes = routes
        self.seen: list[str] = []
        self.listener = LoopbackListener(self._tunnel)
        self.port = self.listener.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.listener.close()

    def _tunnel(self, client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            self.seen.append(f"{method} {target}")
            upstream_addr = self.routes.get(target) if method == "CONNECT" else None
            if upstream_addr is None:
                client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            host, port = upstream_addr.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=10) as upstream:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                pair = {client: upstream, upstream: client}
                while True:
                    ready, _, _ = select.select(list(pair), [], [], 30)
                    if not ready:
                        return
                    for sock in ready:
                        try:
                            data = sock.recv(65536)
                        except ConnectionResetError:  # a side that resets ends the tunnel, as a closed one does
                            return
                        if not data:
                            return
                        pair[sock].sendall(data)
