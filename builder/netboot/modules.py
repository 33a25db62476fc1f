"""Kernel modules by name: their dependencies in load order, read from the kernel's modules.dep."""

import gzip
import lzma
from pathlib import Path

from builder.core.errors import CommandError, EngineError
from builder.core.paths import cache_subdir
from builder.core.run import run
from builder.engines.cleanup import temp_dir


def _name(path: str) -> str:
    """A module's name as the kernel spells it: the file's, without .ko and compression, `-` as `_`."""
    return plain_name(path).removesuffix(".ko").replace("-", "_")


def read_deps(moddir: Path) -> dict[str, tuple[str, list[str]]]:
    """module name -> (its path relative to moddir, the paths it depends on)."""
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[_name(path)] = (path, rest.split())
    return deps


def load_order(moddir: Path, wanted: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(paths in an order insmod accepts, names that are neither modules nor built in).

    Built-in drivers need no loading; modules that this kernel does not have are reported, not fatal,
    so one list of network drivers serves every kernel.
    """
    deps = read_deps(moddir)
    builtin_file = moddir / "modules.builtin"
    builtin = {_name(line) for line in builtin_file.read_text().split()} if builtin_file.is_file() else set()
    by_path = {path: name for name, (path, _) in deps.items()}
    order: list[str] = []
    missing: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        # modules.dep lists every (transitive) dependency; visiting each first puts it before its users
        for dep in deps[by_path[path]][1]:
            visit(dep)
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key in deps:
            visit(deps[key][0])
        elif key not in builtin:
            missing.append(name)
    return order, missing


def module_bytes(path: Path) -> bytes:
    """A module's ELF bytes, decompressed: the initramfs loads modules with busybox's insmod."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        with temp_dir(cache_subdir("netboot")) as tmp:
            try:
                run(["zstd", "-d", "-q", "-o", tmp / "module", "--", path], timeout=120)
            except CommandError as exc:
                raise EngineError(f"cannot decompress {path}: {exc.last_line[:200]}") from None
            return (tmp / "module").read_bytes()
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    return data


def plain_name(path: str) -> str:
    """The file name a module gets once decompressed."""
    base = path.rsplit("/", 1)[-1]
    for suffix in (".xz", ".zst", ".gz"):
        base = base.removesuffix(suffix)
    return base
