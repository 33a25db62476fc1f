"""A small HTTP server on 127.0.0.1 for the length of a build, which builds reach over the host network.

The port is the caller's choice (0: any free one); when a chosen port is taken, any free port serves.
"""

import hashlib
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self


def stable_port(key: str) -> int:
    return 20000 + int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 30000


class LoopbackServer:
    """Serves with `handler` on 127.0.0.1 while the `with` block runs."""

    def __init__(self, handler: Callable[..., BaseHTTPRequestHandler], port: int) -> None:
        try:
            self.server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        except OSError:
            self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/"

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
