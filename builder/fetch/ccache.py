"""A compiler cache both engines can use: ccache's HTTP remote storage, served on 127.0.0.1.

Docker's legacy builder has no cache mounts, so a ccache directory cannot be shared with a build the
way podman could. Every build runs on the host network instead, and ccache inside the build stage
talks to this small server, which keeps the objects in the host's cache folder. Podman and docker
builds of the same context then share one cache, and a cold second engine compiles almost nothing.

Objects end up linked into shipped binaries, so no other local process may write (or read) them: each
store listens on a random port and answers only under a random path prefix made for this build alone
(`/<secret>/<key>`); anything else gets 403. The objects themselves are kept by key, outside the
prefix, so every build hits what earlier builds stored.

The URL reaches the build as the predefined FTP_PROXY build argument, with its value in the engine's
environment (never on a command line, where any local user can read it). Docker and buildah leave the
predefined proxy arguments out of the image history and out of the layer cache key: the secret leaves
no trace in any image, and a new secret each build does not invalidate the compile step's layer.
Nothing in a build uses FTP; the build script moves the value to CCACHE_REMOTE_STORAGE.
"""

import hmac
import os
import re
import secrets
import tempfile
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from builder.core.loopback import LoopbackServer

_KEY = re.compile(r"^/[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*\Z")
URL_ARG = "FTP_PROXY"  # the build argument that carries the store's URL (see above)


class _Handler(BaseHTTPRequestHandler):
    root: Path  # set on the subclass made per store
    prefix: str  # "/<secret>", likewise
    protocol_version = "HTTP/1.1"

    def _target(self) -> Path | None:
        path = self.path.split("?", 1)[0]
        given, rest = path[:len(self.prefix)], path[len(self.prefix):]
        if not hmac.compare_digest(given.encode(), self.prefix.encode()):
            self._reply(403)
            return None
        if not _KEY.match(rest) or ".." in rest.split("/"):
            self._reply(400)
            return None
        return self.root / rest.lstrip("/")

    def _reply(self, code: int, body: bytes = b"") -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        target = self._target()
        if target is None:
            return
        try:
            self._reply(200, target.read_bytes())
        except (FileNotFoundError, IsADirectoryError):
            self._reply(404)

    def do_HEAD(self) -> None:  # noqa: N802
        target = self._target()
        if target is not None:
            self._reply(200 if target.is_file() else 404)

    def do_PUT(self) -> None:  # noqa: N802
        target = self._target()
        if target is None:
            return
        length = int(self.headers.get("Content-Length", "0"))
        data = self.rfile.read(length)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".put-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
        self._reply(201)

    def do_DELETE(self) -> None:  # noqa: N802
        target = self._target()
        if target is None:
            return
        try:
            target.unlink()
            self._reply(200)
        except FileNotFoundError:
            self._reply(404)

    def log_message(self, format: str, *args: object) -> None:
        pass


class CcacheStore(LoopbackServer):
    """Serve `root` as ccache remote storage on 127.0.0.1 while the `with` block runs, to this build only."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.secret = secrets.token_hex(16)
        root.mkdir(parents=True, exist_ok=True)
        handler = type("Handler", (_Handler,), {"root": root, "prefix": f"/{self.secret}"})
        super().__init__(handler, 0)  # a random free port

    @property
    def url(self) -> str:
        """The storage URL ccache needs, secret included: keep it off command lines and out of logs."""
        return f"{super().url}{self.secret}/"

    def build_args(self) -> dict[str, str]:
        """Build arguments whose values must reach the build through the environment only."""
        return {URL_ARG: self.url}
