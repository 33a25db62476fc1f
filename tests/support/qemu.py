"""A netbooted node under QEMU (software emulation): user-mode networking only, console to a file.

QEMU's user-mode network is private to the process: the guest reaches the host's 127.0.0.1 as 10.0.2.2,
its TFTP server is QEMU's own (tftp=), and hostfwd brings one guest port to the host's 127.0.0.1.
"""

import os
import re
import struct
import subprocess
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

OVMF = Path("/usr/share/qemu/OVMF.fd")
# The nodes running now: console -> (QEMU's start, the boot's index in the time summary), until a ready line
_BOOTING: dict[Path, tuple[float, int]] = {}


@contextmanager
def node(tftp: Path, mac: str, console: Path, forward: tuple[int, int] | None = None,
         uefi: bool = False, memory_mb: int = 1024, disk: Path | None = None,
         serial: str = "cache0", hostfwd: tuple[str, ...] = (),
         prefix: tuple[str, ...] = (), cpu: str | None = None, cpus: int = 2,
         tap: tuple[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A QEMU machine that netboots; `disk` is a raw image attached as a virtio disk with `serial`
    (/dev/disk/by-id/virtio-SERIAL to udev); `hostfwd` adds QEMU hostfwd rules as they are; `prefix` runs
    QEMU under a command (e.g. nsenter into a network namespace); `cpu` is QEMU's -cpu model (`max`: every
    instruction TCG emulates, AVX2 included); `cpus` its -smp; `tap` (IFNAME, MAC) a second NIC on that existing tap
    device (the data network; no boot ROM, so the node boots from its first NIC)."""
    netdev = f"user,id=n0,tftp={tftp},bootfile=boot.ipxe"
    if forward:
        netdev += f",hostfwd=tcp:127.0.0.1:{forward[0]}-:{forward[1]}"
    netdev += "".join(f",hostfwd={rule}" for rule in hostfwd)
    argv = [*prefix, "qemu-system-x86_64", "-accel", "tcg", "-m", str(memory_mb), "-smp", str(cpus), "-display", "none",
            "-monitor", "none", "-no-reboot", "-boot", "n", "-netdev", netdev,
            "-device", f"virtio-net-pci,netdev=n0,mac={mac}", "-serial", f"file:{console}"]
    if tap:
        argv += ["-netdev", f"tap,id=n1,ifname={tap[0]},script=no,downscript=no",
                 "-device", f"virtio-net-pci,netdev=n1,mac={tap[1]},romfile="]
    if uefi:
        argv += ["-bios", str(OVMF)]
    if cpu:
        argv += ["-cpu", cpu]
    if disk:
        argv += ["-drive", f"file={disk},if=none,id=d0,format=raw",
                 "-device", f"virtio-blk-pci,drive=d0,serial={serial}"]
    import timing  # the plugin pytest loaded (tests/conftest.py's pytest_plugins): the time summary counts boots

    _BOOTING[console] = (time.monotonic(), timing.record_boot(os.environ.get("PYTEST_CURRENT_TEST", "?")))
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        _BOOTING.pop(console, None)
        proc.kill()
        proc.wait(timeout=30)


def wait_for(console: Path, pattern: str, proc: subprocess.Popen[bytes], seconds: float) -> re.Match[str]:
    """Poll the console file until `pattern` appears; fail with the console's tail otherwise. The first match of
    a pattern that names `ready` gives the boot's time to ready (the time summary's QEMU section)."""
    deadline = time.monotonic() + seconds
    regex = re.compile(pattern)
    text = ""
    while time.monotonic() < deadline:
        text = console.read_text(errors="replace") if console.exists() else ""
        found = regex.search(text)
        if found:
            if "ready" in pattern and console in _BOOTING:
                import timing

                started, index = _BOOTING.pop(console)
                timing.record_ready(index, time.monotonic() - started)
            return found
        if proc.poll() is not None:
            stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            pytest.fail(f"QEMU exited ({proc.returncode}) before {pattern!r}: {stderr}\n{console_summary(text)}")
        time.sleep(0.5)
    pytest.fail(f"no {pattern!r} on the console after {seconds:.0f} s:\n{console_summary(text)}")


# What a failing boot's message shows first: the node's own lines and the kernel's alerts (a lockup, a stall, a
# hung task, an oops), whose headers a stack trace pushes out of the console's tail.
NOTABLE = re.compile(r"builder-node|BUG:|WARNING:|INFO:|Oops|stall|lockup|blocked for more than|Out of memory|"
                     r"segfault|Kernel panic|systemd\[1\]: .*(Failed|failed)")


def console_summary(text: str) -> str:
    """The console's notable lines (the last 60) and then its tail."""
    notable = [line for line in text.splitlines() if NOTABLE.search(line)][-60:]
    return "notable lines:\n" + "\n".join(notable) + "\n--- the console's tail:\n" + text[-2000:]


SECTOR = 512
PARTITION_START = 2048  # the partition gpt_disk makes starts here (sectors): 1 MiB into the disk


def gpt_disk(path: Path, size_mb: int, label: str) -> int:
    """A sparse raw disk image with a GPT and one Linux partition named `label` (what PARTLABEL= finds),
    otherwise zeros; returns the partition's offset in bytes."""
    sectors = size_mb * 2048
    entries = bytearray(128 * 128)
    name = label.encode("utf-16-le").ljust(72, b"\0")
    struct.pack_into("<16s16sQQQ72s", entries, 0, uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4").bytes_le,
                     uuid.uuid4().bytes_le, PARTITION_START, sectors - 34, 0, name)
    disk_guid = uuid.uuid4().bytes_le

    def header(current: int, backup: int, entries_at: int) -> bytes:
        fields = [b"EFI PART", 0x10000, 92, 0, 0, current, backup, 34, sectors - 34, disk_guid, entries_at, 128,
                  128, zlib.crc32(entries)]
        crc = zlib.crc32(struct.pack("<8sIIIIQQQQ16sQIII", *fields))
        fields[3] = crc
        return struct.pack("<8sIIIIQQQQ16sQIII", *fields).ljust(SECTOR, b"\0")

    mbr = bytearray(SECTOR)
    struct.pack_into("<B3sB3sII", mbr, 446, 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1,
                     min(sectors - 1, 0xFFFFFFFF))
    mbr[510:512] = b"\x55\xaa"
    with path.open("wb") as f:
        f.truncate(sectors * SECTOR)
        f.write(mbr + header(1, sectors - 1, 2) + entries)
        f.seek((sectors - 33) * SECTOR)
        f.write(entries + header(sectors - 1, 1, sectors - 33))
    return PARTITION_START * SECTOR
