"""The shared libraries an ELF program needs (its DT_NEEDED entries), read without running anything.

The initramfs carries dmsetup from Debian's package, a dynamic program: it needs its libraries and the
loader beside it, found in the extracted kernel tree.
"""

import struct
from pathlib import Path

from builder.core.errors import EngineError

_DT_NEEDED, _SHT_DYNAMIC = 1, 6


def needed(path: Path) -> list[str]:
    """The sonames `path` (a 64-bit little-endian ELF file) names as needed, in order."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise EngineError(f"{path}: not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = []
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind != _SHT_DYNAMIC:
            continue
        strtab = sections[link][4]
        for at in range(offset, offset + size, entsize or 16):
            tag, value = struct.unpack_from("<qQ", data, at)
            if tag == _DT_NEEDED:
                names.append(data[strtab + value:data.index(b"\0", strtab + value)].decode())
    return names


def _find(tree: Path, soname: str) -> Path:
    for folder in ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu", "usr/lib64", "lib64", "usr/lib", "lib"):
        candidate = tree / folder / soname
        if candidate.exists():
            return candidate.resolve()
    raise EngineError(f"{soname} is not in {tree}", "remove the kernel tree from the cache to fetch it again")


def closure(tree: Path, program: Path) -> dict[str, Path]:
    """soname -> file in `tree` for every library `program` needs, directly or not, and the loader."""
    found: dict[str, Path] = {}
    todo = needed(program) + ["ld-linux-x86-64.so.2"]
    while todo:
        soname = todo.pop()
        if soname in found:
            continue
        found[soname] = _find(tree, soname)
        todo += needed(found[soname])
    return found
