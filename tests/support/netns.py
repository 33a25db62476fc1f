"""A network namespace of a test's own: its loopback up, with addresses the test chooses on it. Programs run inside
it through the `enter` prefix (nsenter), and this thread's own sockets and child processes through `inside()`.
Nothing outside it is touched: its addresses live on its own loopback, so traffic to them never leaves it.
"""

import ctypes
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000
_LIBC = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _LIBC.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass(frozen=True)
class Namespace:
    """A network namespace, held open by the process `pid` (killed when the namespace's context ends)."""

    pid: int

    @property
    def enter(self) -> tuple[str, ...]:
        """The command prefix that runs a program inside the namespace."""
        return ("nsenter", f"--net=/proc/{self.pid}/ns/net", "--")

    @contextmanager
    def inside(self) -> Iterator[None]:
        """This thread inside the namespace (a namespace is a thread's own under Linux): the sockets it opens and
        the processes it starts belong to the namespace until the block ends."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        there = os.open(f"/proc/{self.pid}/ns/net", os.O_RDONLY)
        try:
            _setns(there)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(there)
            os.close(own)


@contextmanager
def network_namespace(*addresses: str) -> Iterator[Namespace]:
    """A fresh network namespace: loopback up, with each of `addresses` on it as a /32."""
    holder = subprocess.Popen(["unshare", "--net", "--", "sleep", "infinity"])
    try:
        own = os.readlink("/proc/self/ns/net")
        for _ in range(100):
            if os.readlink(f"/proc/{holder.pid}/ns/net") != own:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("unshare --net did not give its process a namespace of its own within 5 s")
        namespace = Namespace(holder.pid)
        subprocess.run([*namespace.enter, "ip", "link", "set", "lo", "up"], check=True, timeout=30)
        for address in addresses:
            subprocess.run([*namespace.enter, "ip", "addr", "add", f"{address}/32", "dev", "lo"], check=True,
                           timeout=30)
        yield namespace
    finally:
        holder.kill()
        holder.wait(timeout=10)
