"""Resolving a wheel lock with uv (`uv pip compile`) for the image's Python and platform, not the host's.

uv evaluates environment markers for the Python version it is told (`--python-version`) and picks wheels
for the platform it is told (`--python-platform`), so a lock for Python 3.12 can be made from a 3.11
environment. It reads the package indexes pip uses on the machine (`pip config list`: index-url,
extra-index-url, find-links, constraint, cert, no-index), in pip's order, so that uv and pip see the same
packages (a proxy reaches uv through HTTPS_PROXY, as for pip). uv writes a PEP 751 `pylock.toml`, which
names every wheel of each pinned version that fits the platform; builder keeps the one pip would install
(the first in pip's order of supported tags) and checks that each pinned wheel's tags fit the image's
Python and platform.
"""

import ast
import re
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from builder.core.errors import RecipeError, SourceError
from builder.core.run import run

GLIBC_MINOR = 36  # the newest glibc the images' base has: Debian bookworm's 2.36
_OLDEST_GLIBC_MINOR = 17  # manylinux_2_17 (CentOS 7 era)
_PYTHON = re.compile(r"3\.([0-9]{1,2})")


@dataclass(frozen=True)
class Resolved:
    """One pinned wheel: its distribution's canonical name, version, file name and sha256."""

    name: str
    version: str
    file: str
    sha256: str


@dataclass(frozen=True)
class PipSources:
    """Where pip on this machine looks for packages, as `pip config list` tells it."""

    index_url: str = "https://pypi.org/simple"
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    constraints: tuple[str, ...] = ()
    cert: str | None = None
    no_index: bool = False


def parse_pip_config(text: str) -> PipSources:
    """`pip config list` output (`section.key='value'` lines) into the sources `pip install` would use.

    pip's own precedence: the environment (`:env:`) over the `[install]` section over `[global]`; options
    that take several values hold them separated by whitespace.
    """
    found: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        key, sep, raw = line.partition("=")
        section, dot, name = key.strip().rpartition(".")
        if not sep or not dot or section not in (":env:", "install", "global"):
            continue
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            continue
        if isinstance(value, str):
            found.setdefault(name, {})[section] = value

    def get(name: str) -> str | None:
        sections = found.get(name, {})
        return next((sections[s] for s in (":env:", "install", "global") if s in sections), None)

    def many(name: str) -> tuple[str, ...]:
        return tuple((get(name) or "").split())

    no_index = (get("no-index") or "").strip().lower() in ("1", "true", "yes", "on")
    return PipSources(index_url=get("index-url") or PipSources.index_url, extra_index_urls=many("extra-index-url"),
                      find_links=many("find-links"), constraints=many("constraint"), cert=get("cert"),
                      no_index=no_index)


def pip_sources() -> PipSources:
    """The package indexes pip uses on this machine (its config files and PIP_* variables)."""
    proc = run([sys.executable, "-m", "pip", "config", "list"], timeout=60)
    return parse_pip_config(proc.stdout)


def python_tuple(python: str) -> tuple[int, int]:
    match = _PYTHON.fullmatch(python)
    if not match:
        raise RecipeError(f"python: {python!r} is not a Python 3 version such as 3.11")
    return 3, int(match.group(1))


def platforms(arch: str) -> list[str]:
    """Platform tags of a glibc Linux image, in the order pip prefers them (`--platform` flags and their
    PEP 599 widening of manylinux2014)."""
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(GLIBC_MINOR, _OLDEST_GLIBC_MINOR - 1, -1)]
    return [*tags, f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}", f"linux_{arch}"]


def supported_tags(python: str, arch: str) -> list[Tag]:
    """Every wheel tag the image's CPython runs, best first: what pip computes for --python-version and
    --platform."""
    version = python_tuple(python)
    plats = platforms(arch)
    return [*cpython_tags(version, platforms=plats),
            *compatible_tags(version, f"cp{version[0]}{version[1]}", plats)]


def uv_argv(uv: str, requirements: Path, out: Path, python: str, arch: str, sources: PipSources,
            index: str | None) -> list[str]:
    """`uv pip compile` for the image: its Python and platform, wheels only, pip's indexes in pip's order.

    pip gathers the files of all indexes and takes the best; uv looks at a version's files on the first
    index (in the order given) that has it, so the indexes go in pip's order with `unsafe-best-match`.
    """
    # --python: builder's own interpreter, so uv does not search the machine for one of the target version
    argv = [uv, "pip", "compile", "--quiet", "--no-progress", "--no-config", "--no-header", "--format", "pylock.toml",
            "--output-file", str(out), "--python", sys.executable, "--python-version", python, "--python-platform",
            f"{arch}-manylinux_2_{GLIBC_MINOR}", "--only-binary", ":all:", "--generate-hashes",
            "--index-strategy", "unsafe-best-match"]
    if sources.no_index:
        argv.append("--no-index")
    else:
        indexes = [sources.index_url, *sources.extra_index_urls, *([index] if index else [])]
        for url in dict.fromkeys(indexes):
            argv += ["--index", url]
        argv += ["--default-index", sources.index_url]
    for link in sources.find_links:
        argv += ["--find-links", link]
    for constraint in sources.constraints:
        argv += ["--constraints", constraint]
    if sources.cert:
        argv += ["--cert", sources.cert]
    return [*argv, "--", str(requirements)]


def _version(text: str) -> str:
    try:
        return str(Version(text))
    except InvalidVersion:
        return ""  # no wheel file name gives an empty version: the package is refused


def _file_name(wheel: dict[str, Any]) -> str:
    where = wheel.get("name") or wheel.get("url") or wheel.get("path") or ""
    return unquote(urlsplit(str(where)).path.rsplit("/", 1)[-1])


def pick_wheels(pylock: dict[str, Any], python: str, arch: str) -> list[Resolved]:
    """For each package of a pylock.toml, the wheel pip would install: the best-ranked tag that the image
    supports. A package none of whose wheels fits the image's Python and platform is an error."""
    rank = {tag: i for i, tag in reversed(list(enumerate(supported_tags(python, arch))))}
    out = []
    for package in pylock.get("packages", []):
        name, version = str(package.get("name", "")), str(package.get("version", ""))
        best: tuple[int, str, str] | None = None
        for wheel in package.get("wheels", []):
            file = _file_name(wheel)
            sha256 = str(wheel.get("hashes", {}).get("sha256", ""))
            try:
                wheel_name, wheel_version, _, tags = parse_wheel_filename(file)
            except InvalidWheelFilename:
                raise SourceError(f"{name}: uv named a wheel {file!r} that is not a valid wheel file name") from None
            if canonicalize_name(wheel_name) != canonicalize_name(name) or str(wheel_version) != _version(version):
                raise SourceError(f"{name} {version}: uv gave the wheel {file}, which is another package or version")
            fits = [rank[tag] for tag in tags if tag in rank]
            if fits and re.fullmatch(r"[0-9a-f]{64}", sha256) and (best is None or min(fits) < best[0]):
                best = (min(fits), file, sha256)
        if best is None:
            raise SourceError(f"{name} {version}: no wheel with a sha256 fits CPython {python} on "
                              f"manylinux_2_{GLIBC_MINOR}_{arch}",
                              "pin another version in the recipe's requirements, or leave the package out")
        out.append(Resolved(canonicalize_name(name), version, best[1], best[2]))
    return sorted(out, key=lambda r: r.name)


def resolve(python: str, requirements: list[str], index: str | None, arch: str,
            sources: PipSources | None = None) -> list[Resolved]:
    """Resolve requirements with uv for the image's Python and platform: one wheel per package."""
    from uv import find_uv_bin  # the uv binary of the `uv` package

    python_tuple(python)
    sources = pip_sources() if sources is None else sources
    with tempfile.TemporaryDirectory(prefix="builder-lock-") as folder:
        tmp = Path(folder)
        wanted = tmp / "requirements.in"
        wanted.write_text("\n".join(requirements) + "\n")
        out = tmp / "pylock.toml"
        run(uv_argv(find_uv_bin(), wanted, out, python, arch, sources, index), timeout=900)
        pylock = tomllib.loads(out.read_text())
    return pick_wheels(pylock, python, arch)
