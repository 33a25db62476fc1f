"""Pinned SDKs a variant's build needs (OpenVINO's runtime wheel, for one): fetched once, checked, unpacked.

A wheel is fetched with `pip download` for exactly the tags its file name states, so the pin does not depend
on the Python that runs builder. Its sha256 is checked before it is unpacked into the cache; build contexts
get hard links to the unpacked tree (sdk/<name>), so rendering again neither downloads nor copies.
"""

import os
import re
import stat
import sys
import zipfile
from pathlib import Path

from builder.core.errors import ArchiveError, CommandError, SourceError
from builder.core.locks import lock_file, locked
from builder.core.paths import cache_subdir
from builder.core.run import run
from builder.engines.cleanup import temp_dir
from builder.fetch.source import cache_verified
from builder.recipe.models import WheelSdk, wheel_tags

SDK_DIR = "sdk"  # where SDK trees land in a build context; /opt/sdk/<name> in the build stage


def pip_download_argv(spec: WheelSdk, dest: Path) -> list[str]:
    """`pip download` of exactly this wheel: its platform, ABI and Python tags, no dependencies."""
    tags = wheel_tags(spec.file)
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
            "--dest", str(dest)]
    python = tags["python"].split(".")[0]
    if python.startswith("cp"):
        argv += ["--implementation", "cp", "--python-version", python[2:]]
    elif python.startswith("py") and python[2:].isdigit():
        argv += ["--python-version", python[2:]]
    argv += ["--abi", tags["abi"]]
    for platform in tags["platform"].split("."):
        argv += ["--platform", platform]
    return [*argv, "--", f"{spec.package}=={spec.version}"]


def fetch_wheel(spec: WheelSdk) -> Path:
    """The wheel file, downloaded once into the cache and checked against its pin."""
    wheels = cache_subdir("sdks/wheels")

    def fetch(tmp: Path) -> None:
        with temp_dir(wheels) as folder:
            try:
                run(pip_download_argv(spec, folder), timeout=900)
            except CommandError as exc:
                raise SourceError(f"cannot fetch {spec.file}: {exc.last_line}",
                                  "check package, version and file in the recipe, and that the package index is "
                                  "reachable") from None
            got = folder / spec.file
            if not got.is_file():
                names = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
                raise SourceError(f"pip download of {spec.package}=={spec.version} gave {names}, not {spec.file}",
                                  "check the wheel's file name in the recipe (sdks.<name>.file)")
            os.replace(got, tmp)
    return cache_verified(wheels / f"{spec.sha256}.whl", spec.sha256, spec.file, fetch)


def _unsafe_member(member: zipfile.ZipInfo) -> str | None:
    """Why a wheel member must not be unpacked, or None: it would land outside the folder or is not a file."""
    name = member.filename
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in re.split(r"[/\\]", name):
        return "its name leaves the folder"
    kind = stat.S_IFMT(member.external_attr >> 16)
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "it is a link or a special file"
    return None


def _extract(wheel: Path, dest: Path, name: str) -> None:
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            why = _unsafe_member(member)
            if why:
                raise ArchiveError(f"{name}: member {member.filename!r}: refused, {why}",
                                  "the wheel is damaged or hostile; check its pin and where it came from")
        for member in archive.infolist():
            path = Path(archive.extract(member, dest))
            mode = (member.external_attr >> 16) & 0o777
            if not member.is_dir() and mode:
                path.chmod(mode | stat.S_IRUSR)


def unpacked(spec: WheelSdk) -> Path:
    """The wheel's contents, unpacked once per sha256 into the cache."""
    trees = cache_subdir("sdks/trees")
    final = trees / spec.sha256
    if final.is_dir():
        return final
    wheel = fetch_wheel(spec)
    with locked(lock_file(f"sdk-tree-{spec.sha256}"), f"unpacking {spec.file}"):
        if final.is_dir():
            return final
        with temp_dir(trees) as tmp:
            try:
                _extract(wheel, tmp, spec.file)
                os.replace(tmp, final)
            except (zipfile.BadZipFile, OSError) as exc:
                raise SourceError(f"{spec.file}: cannot unpack: {exc}") from None
    return final


def missing_ship_patterns(spec: WheelSdk, tree: Path) -> list[str]:
    """`ship` globs that match nothing in the unpacked wheel (a newer wheel may rename its libraries)."""
    return [pattern for pattern in spec.ship if not any(tree.glob(pattern))]
