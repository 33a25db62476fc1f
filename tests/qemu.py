"""A netbooted node under QEMU (software emulation): user-mode networking only, console to a file.

QEMU's user-mode network is private to the process: the guest reaches the host's 127.0.0.1 as 10.0.2.2,
its TFTP server is QEMU's own (tftp=), and hostfwd brings one guest port to the host's 127.0.0.1.
"""

import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

OVMF = Path("/usr/share/qemu/OVMF.fd")


@contextmanager
def node(tftp: Path, mac: str, console: Path, forward: tuple[int, int] | None = None,
         uefi: bool = False, memory_mb: int = 1024) -> Iterator[subprocess.Popen[bytes]]:
    netdev = f"user,id=n0,tftp={tftp},bootfile=boot.ipxe"
    if forward:
        netdev += f",hostfwd=tcp:127.0.0.1:{forward[0]}-:{forward[1]}"
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", str(memory_mb), "-smp", "2", "-display", "none",
            "-monitor", "none", "-no-reboot", "-boot", "n", "-netdev", netdev,
            "-device", f"virtio-net-pci,netdev=n0,mac={mac}", "-serial", f"file:{console}"]
    if uefi:
        argv += ["-bios", str(OVMF)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


def wait_for(console: Path, pattern: str, proc: subprocess.Popen[bytes], seconds: float) -> re.Match[str]:
    """Poll the console file until `pattern` appears; fail with the console's tail otherwise."""
    deadline = time.monotonic() + seconds
    regex = re.compile(pattern)
    text = ""
    while time.monotonic() < deadline:
        text = console.read_text(errors="replace") if console.exists() else ""
        found = regex.search(text)
        if found:
            return found
        if proc.poll() is not None:
            stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            pytest.fail(f"QEMU exited ({proc.returncode}) before {pattern!r}: {stderr}\n{text[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"no {pattern!r} on the console after {seconds:.0f} s:\n{text[-3000:]}")
