"""A compiler cache both engines can use: ccache's HTTP remote storage, served on 127.0.0.1.

Docker's legacy builder has no cache mounts, so a ccache directory cannot be shared with a build the
way podman could. Every build runs on the host network instead, and ccache inside the build stage
talks to this small server, which keeps the objects in the host's cache folder. Podman and docker
builds of the same context then share one cache, and a cold second engine compiles almost nothing.
"""

import os
import re
import tempfile
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from builder.loopback import LoopbackServer, stable_port

_KEY = re.compile(r"^/[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*\Z")


class _Handler(BaseHTTPRequestHandler):
    root: Path  # set on the subclass made per store
    protocol_version = "HTTP/1.1"

    def _target(self) -> Path | None:
        path = self.path.split("?", 1)[0]
        if not _KEY.match(path) or ".." in path.split("/"):
            self._reply(400)
            return None
        return self.root / path.lstrip("/")

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
    """Serve `root` as ccache remote storage on 127.0.0.1 while the `with` block runs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        # The port is keyed by the folder alone, as it always was, so existing layer caches stay valid.
        super().__init__(type("Handler", (_Handler,), {"root": root}), stable_port(str(root)))
