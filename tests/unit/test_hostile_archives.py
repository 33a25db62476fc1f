"""Crafted archives: a llama.cpp source tarball and an SDK wheel that try to write outside their folder.

Absolute names, '..', links that point out (soft and hard), device files and FIFOs are refused with one
line and exit 2; nothing lands outside the folder and no half-unpacked tree stays in the cache.
"""

import hashlib
import io
import stat
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import run_cli_inproc
from hostile import CPU, changed, fake_llama_tree, refused, write_yaml

CMAKE = b"project(llama.cpp)\n"


def _file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _special(tar: tarfile.TarFile, name: str, kind: bytes, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    if kind == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 1, 3
    tar.addfile(info)


TarAttack = Callable[[tarfile.TarFile, Path], None]
TAR_ATTACKS: dict[str, TarAttack] = {
    "absolute-name": lambda tar, marker: _file(tar, str(marker), b"x"),
    "dotdot-name": lambda tar, marker: _file(tar, "src/../../../" + marker.name, b"x"),
    "symlink-out-then-write": lambda tar, marker: (_special(tar, "src/out", tarfile.SYMTYPE, str(marker.parent)),
                                                   _file(tar, f"src/out/{marker.name}", b"x")),
    "relative-symlink-out": lambda tar, marker: _special(tar, "src/up", tarfile.SYMTYPE, "../../../../.."),
    "hardlink-out": lambda tar, marker: _special(tar, "src/passwd", tarfile.LNKTYPE, "/etc/passwd"),
    "device-file": lambda tar, marker: _special(tar, "src/null", tarfile.CHRTYPE),
    "fifo": lambda tar, marker: _special(tar, "src/pipe", tarfile.FIFOTYPE),
}


@pytest.mark.parametrize("attack", sorted(TAR_ATTACKS))
def test_source_archive_cannot_write_outside_its_folder(tmp_path: Path, attack: str) -> None:
    marker = tmp_path / "PWNED"
    archive = tmp_path / "llama.tar"
    with tarfile.open(archive, "w") as tar:
        _file(tar, "src/CMakeLists.txt", CMAKE)
        TAR_ATTACKS[attack](tar, marker)
    cache, out = tmp_path / "cache", tmp_path / "out"
    proc = run_cli_inproc("render", "--target", "cpu", "--llama-cpp-source", str(archive), "--out", str(out),
                          env={"BUILDER_CACHE": str(cache)})
    refused(proc, "llama.tar", "refused", absent=(marker, out))
    trees = cache / "sources" / "trees"
    assert not [p for p in trees.iterdir() if not p.name.endswith(".epoch")], "a tree stayed in the cache"


def _wheel(path: Path, member: zipfile.ZipInfo, data: bytes) -> str:
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr("evil/__init__.py", b"")
        whl.writestr(member, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _member(name: str, mode: int = stat.S_IFREG | 0o644) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = mode << 16
    return info


ZIP_ATTACKS: dict[str, Callable[[Path], tuple[zipfile.ZipInfo, bytes]]] = {
    "absolute-name": lambda marker: (_member(str(marker)), b"x"),
    "dotdot-name": lambda marker: (_member("evil/../../../../" + marker.name), b"x"),
    "backslash-dotdot": lambda marker: (_member("evil\\..\\..\\" + marker.name), b"x"),
    "symlink": lambda marker: (_member("evil/libx.so", stat.S_IFLNK | 0o777), b"/etc/shadow"),
    "device-file": lambda marker: (_member("evil/null", stat.S_IFCHR | 0o666), b""),
}


@pytest.mark.parametrize("attack", sorted(ZIP_ATTACKS))
def test_sdk_wheel_cannot_write_outside_its_folder(tmp_path: Path, attack: str) -> None:
    marker = tmp_path / "PWNED"
    cache = tmp_path / "cache"
    wheels = cache / "sdks" / "wheels"
    wheels.mkdir(parents=True)
    # The wheel sits in the cache under its pin, as after a download: only unpacking is under test.
    member, data = ZIP_ATTACKS[attack](marker)
    sha = _wheel(tmp_path / "w.whl", member, data)
    (tmp_path / "w.whl").rename(wheels / f"{sha}.whl")
    sdk = {"kind": "wheel", "package": "evil", "version": "1.0", "file": "evil-1.0-py3-none-any.whl", "sha256": sha}
    recipe = write_yaml(tmp_path / "evil.yaml", changed(CPU, "variants.cpu.sdks", {"evil": sdk}))
    out = tmp_path / "out"
    proc = run_cli_inproc("render", "--recipe", str(recipe), "--with-source", "--out", str(out),
                          "--llama-cpp-source", str(fake_llama_tree(tmp_path / "llama")),
                          env={"BUILDER_CACHE": str(cache)})
    refused(proc, "evil-1.0-py3-none-any.whl", "refused", absent=(marker, out / "sdk"))
    assert list((cache / "sdks" / "trees").iterdir()) == [], "a half-unpacked tree stayed in the cache"
