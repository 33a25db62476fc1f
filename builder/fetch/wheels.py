"""Python packages pinned by hash: lock files, a wheel cache, and a wheelhouse served on 127.0.0.1.

A lock is a pip requirements file with one `name===version --hash=sha256:…` line per package, resolved
with uv for the image's Python and platform, not the host's (`fetch/resolve.py`). Builds install with
`--require-hashes`, so the same files go into the image whether pip reads them from builder's cache or
from the package index.
The wheels are downloaded once into the cache; during a build builder serves that folder on 127.0.0.1
(builds use the host network) and pip inside the build reads it with `--no-index --find-links`.
"""

import hashlib
import os
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from http.server import SimpleHTTPRequestHandler
from pathlib import Path

from builder.core.digests import json_hash, sha256_file
from builder.core.errors import RecipeError, SourceError
from builder.core.locks import lock_file, locked
from builder.core.loopback import LoopbackServer, stable_port
from builder.core.paths import cache_subdir
from builder.core.run import run
from builder.engines.cleanup import temp_dir, temp_path
from builder.fetch.resolve import PipSources, platforms, resolve

# Names and versions of a lock reach requirements files and RUN lines: plain characters only, matched whole.
_LINE = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]{0,127})===([A-Za-z0-9][A-Za-z0-9.+!_-]{0,127}) "
                   r"--hash=sha256:([0-9a-f]{64})")
_HEADER = re.compile(r"# ([a-z]+): ([^\x00-\x1f\x7f]*)")
_STAMP = "%Y-%m-%dT%H:%M:%SZ"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    match = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    return canonical(match.group(1)) if match else spec


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    sha256: str

    def line(self) -> str:
        # `===` matches exactly this version string: `==2.13.0` would also match a `2.13.0+cpu` wheel, and an
        # older pip picks that one and then fails its hash check instead of trying the next candidate.
        return f"{self.name}==={self.version} --hash=sha256:{self.sha256}"


@dataclass(frozen=True)
class Lock:
    """A parsed lock file: header fields (python, requirements, inputs, locked) and the pins."""

    header: dict[str, str]
    pins: tuple[Pin, ...]

    def text(self) -> str:
        lines = [f"# {key}: {value}" for key, value in self.header.items()]
        return "\n".join([*lines, *(p.line() for p in self.pins)]) + "\n"

    def version_of(self, name: str) -> str | None:
        return next((p.version for p in self.pins if canonical(p.name) == canonical(name)), None)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text().encode()).hexdigest()

    @property
    def epoch(self) -> int:
        stamp = self.header.get("locked", "1970-01-01T00:00:00Z")
        return int(datetime.strptime(stamp, _STAMP).replace(tzinfo=UTC).timestamp())


def inputs_key(python: str, requirements: list[str], index: str | None, arch: str, leave_out: list[str]) -> str:
    """What a lock was resolved from; a recipe whose inputs differ has a stale lock."""
    doc: dict[str, object] = {"python": python, "requirements": requirements, "index": index, "arch": arch}
    if leave_out:
        doc["leave_out"] = sorted(canonical(n) for n in leave_out)
    return json_hash(doc)[:16]


def parse_lock(path: Path, where: str) -> Lock:
    """A lock file, every line checked; anything else is one line naming the file and the line."""
    hint = "regenerate it with `builder lock --flavour vllm --target TARGET`"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{where}: not a text file (invalid UTF-8)", hint) from None
    except OSError as exc:
        raise RecipeError(f"{where}: cannot read: {exc.strerror}", hint) from None
    header: dict[str, str] = {}
    pins: list[Pin] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        head = _HEADER.fullmatch(line)
        if head:
            header[head.group(1)] = head.group(2)
            continue
        if line.startswith("#") and not re.search(r"[\x00-\x1f\x7f]", line):
            continue
        pin = _LINE.fullmatch(line)
        if not pin:
            raise RecipeError(f"{where} line {number}: expected `NAME===VERSION --hash=sha256:HEX`", hint)
        pins.append(Pin(*pin.groups()))
    if not pins:
        raise RecipeError(f"{where}: the lock pins no packages", hint)
    if "locked" in header:
        try:
            datetime.strptime(header["locked"], _STAMP)
        except ValueError:
            raise RecipeError(f"{where}: locked: {header['locked'][:40]!r} is not a time like 2026-01-31T12:00:00Z",
                              hint) from None
    return Lock(header, tuple(pins))


def pins_from_lines(lines: list[str]) -> tuple[Pin, ...]:
    """Pins from lock lines that were already checked (a plan's lock_pins)."""
    pins = []
    for line in lines:
        match = _LINE.fullmatch(line)
        if not match:
            raise RecipeError(f"not a lock line: {line!r}")
        pins.append(Pin(*match.groups()))
    return tuple(pins)


def _target_flags(python: str, arch: str) -> list[str]:
    # pip takes one platform tag per --platform and does not widen manylinux_2_N to older N itself.
    return ["--only-binary", ":all:", "--python-version", python, "--implementation", "cp",
            *(flag for tag in platforms(arch) for flag in ("--platform", tag))]


def resolve_lock(python: str, requirements: list[str], index: str | None, arch: str, header: dict[str, str],
                 leave_out: list[str], sources: PipSources | None = None) -> Lock:
    """Resolve requirements with uv for the image's Python and platform; pins with the index's hashes.

    Packages in `leave_out` are resolved (their own requirements stay in the lock) and then dropped.
    """
    dropped = {canonical(n) for n in leave_out}
    pins = [Pin(r.name, r.version, r.sha256) for r in resolve(python, requirements, index, arch, sources)
            if canonical(r.name) not in dropped]
    stamp = datetime.now(UTC).strftime(_STAMP)
    return Lock({**header, "locked": stamp}, tuple(sorted(pins, key=lambda p: canonical(p.name))))


def _wheel_key(file: Path) -> tuple[str, str] | None:
    """(canonical name, version) from a wheel's file name: NAME-VERSION(-BUILD)?-PY-ABI-PLATFORM.whl."""
    parts = file.name.removesuffix(".whl").split("-")
    return (canonical(parts[0]), parts[1]) if file.suffix == ".whl" and len(parts) >= 5 else None


def _present(cache: Path, pins: tuple[Pin, ...]) -> set[Pin]:
    """The pins whose wheel is in the cache with the pinned bytes."""
    by_key: dict[tuple[str, str], list[Path]] = {}
    for file in cache.glob("*.whl"):
        key = _wheel_key(file)
        if key is not None:
            by_key.setdefault(key, []).append(file)
    return {pin for pin in pins
            if any(sha256_file(f) == pin.sha256 for f in by_key.get((canonical(pin.name), pin.version), []))}


def fetch_wheels(lock: Lock, python: str, arch: str, index: str | None) -> Path:
    """Download every pinned wheel once into the cache; returns the cache folder.

    pip downloads into a temp folder beside the cache; each wheel enters the cache (one rename) only once
    its sha256 matches its pin, so a download cut short never sits in the cache under a wheel's name.
    """
    cache = cache_subdir("wheels")
    marker = cache / f".complete-{lock.digest[:24]}"
    if marker.is_file():
        return cache
    with locked(lock_file("wheels"), "fetching wheels"):
        if marker.is_file():
            return cache
        missing = [pin for pin in lock.pins if pin not in _present(cache, lock.pins)]
        if missing:
            with temp_dir(cache) as tmp:
                requirements = tmp / "requirements.txt"
                requirements.write_text(Lock({}, tuple(missing)).text())
                argv = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes",
                        "--dest", str(tmp / "wheels"), *_target_flags(python, arch), "-r", str(requirements)]
                if index:
                    argv += ["--extra-index-url", index]
                run(argv, timeout=3600)
                wanted = {p.sha256 for p in missing}
                for file in sorted((tmp / "wheels").iterdir()):
                    if sha256_file(file) not in wanted:
                        raise SourceError(f"pip download gave {file.name}, whose sha256 no pin of the lock names",
                                          "regenerate the lock: builder lock --flavour vllm --target TARGET")
                    os.replace(file, cache / file.name)
        done = temp_path(cache)
        done.write_text(f"{len(lock.pins)} wheels\n")
        os.replace(done, marker)
    return cache


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class Wheelhouse(LoopbackServer):
    """Serve a folder of wheels (with an index page pip's --find-links reads) on 127.0.0.1."""

    def __init__(self, root: Path) -> None:
        super().__init__(partial(_QuietHandler, directory=str(root)), stable_port(f"wheels\0{root}"))
