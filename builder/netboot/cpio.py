"""A minimal writer for the cpio "newc" format the kernel unpacks as an initramfs.

Written here rather than with the cpio tool so the archive is the same bytes on every run (fixed owners,
times and inode numbers) and device nodes can be added without root.
"""

import gzip
import stat
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    name: str  # path inside the archive, without a leading slash
    mode: int  # full st_mode: file type and permissions
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)  # major, minor of a device node


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _header(ino: int, entry: Entry, size: int, name: bytes) -> bytes:
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (ino, entry.mode, 0, 0, nlink, 0, size, 0, 0, entry.rdev[0], entry.rdev[1], len(name) + 1, 0)
    return b"070701" + b"".join(f"{value:08X}".encode() for value in fields)


def archive(entries: list[Entry]) -> bytes:
    """The newc archive of `entries` (parents before children), ending with the trailer."""
    out = bytearray()
    for ino, entry in enumerate([*entries, Entry("TRAILER!!!", 0)], start=1):
        name = entry.name.encode()
        head = _header(0 if entry.name == "TRAILER!!!" else ino, entry, len(entry.data), name)
        out += head + name + b"\0"
        out += _pad(len(head) + len(name) + 1)
        out += entry.data + _pad(len(entry.data))
    return bytes(out)


def directory(name: str) -> Entry:
    return Entry(name, stat.S_IFDIR | 0o755)


def file(name: str, data: bytes, mode: int = 0o644) -> Entry:
    return Entry(name, stat.S_IFREG | mode, data)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, stat.S_IFLNK | 0o777, target.encode())


def chardev(name: str, major: int, minor: int, mode: int = 0o600) -> Entry:
    return Entry(name, stat.S_IFCHR | mode, rdev=(major, minor))


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)
