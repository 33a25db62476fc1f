"""What a run leaves lying around while it works, and removing it however the run ends.

Temp files and folders, scratch image tags and export containers are recorded, one JSON line each, in
this process's claim file (cache/claims/<id>), on which the process holds an flock while it lives. The
run removes them itself when it finishes, fails, or is stopped with Ctrl-C or SIGTERM (`release`). When it
was killed outright (SIGKILL, the OOM killer, a power cut) nobody holds its claim any more: the next run's
`sweep` takes the lock and removes what the claim lists. Every entry is written down before the thing it
names is created, so nothing a killed run made goes unlisted.
"""

import atexit
import fcntl
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from builder.core.paths import cache_subdir

if TYPE_CHECKING:
    from builder.engines.cli import Engine

TEMP_PREFIX = ".tmp-"  # every temp entry builder makes next to its final place starts with this
_NEW_CLAIM_GRACE = 60.0  # seconds a claim file may stay half-made before a sweep removes it


class _Claim:
    def __init__(self) -> None:
        folder = cache_subdir("claims")
        token = secrets.token_hex(8)
        new = folder / f".new-{token}"
        self.fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        # Made under another name and renamed once locked, so a sweep never sees it unlocked.
        self.path = folder / token
        os.rename(new, self.path)
        self.entries: list[list[str]] = []
        self.pid = os.getpid()

    def add(self, entry: list[str]) -> None:
        os.write(self.fd, (json.dumps(entry) + "\n").encode())
        self.entries.append(entry)

    def forget(self, entry: list[str]) -> None:
        """Removed already: nothing for `release` to do (a sweep after a kill finds it gone anyway)."""
        if entry in self.entries:
            self.entries.remove(entry)


_claim: _Claim | None = None


def _current() -> _Claim:
    global _claim
    if _claim is None or _claim.pid != os.getpid():
        _claim = _Claim()
        atexit.register(release)
    return _claim


def record_path(path: Path) -> Path:
    """Note a temp file or folder about to be made; returns it."""
    _current().add(["path", str(path.absolute())])
    return path


def record_image(engine: str, ref: str) -> str:
    """Note a scratch image tag about to be made by `engine`; returns it."""
    _current().add(["image", engine, ref])
    return ref


def record_container(engine: str, name: str) -> str:
    _current().add(["container", engine, name])
    return name


def forget_image(engine: str, ref: str) -> None:
    """The scratch tag is gone (promoted and untagged, or removed)."""
    _current().forget(["image", engine, ref])


def forget_container(engine: str, name: str) -> None:
    _current().forget(["container", engine, name])


def temp_path(parent: Path, suffix: str = "") -> Path:
    """A fresh, recorded name in `parent` (nothing is created): write there, then rename into place."""
    parent.mkdir(parents=True, exist_ok=True)
    return record_path(parent / f"{TEMP_PREFIX}{secrets.token_hex(6)}{suffix}")


@contextmanager
def temp_dir(parent: Path) -> Iterator[Path]:
    """A recorded temp folder in `parent` (same filesystem, so its contents can be renamed into place)."""
    path = temp_path(parent)
    path.mkdir()
    try:
        yield path
    finally:
        remove_path(path)
        _current().forget(["path", str(path.absolute())])


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@cache  # one availability check per engine and process, not one per entry
def _engine(name: str) -> "Engine | None":
    from builder.engines import ENGINES  # here: the engines import this module
    make = ENGINES.get(name)
    if make is None:
        return None
    engine = make()
    return engine if engine.available() is None else None


def _remove(entry: list[str]) -> bool:
    """Remove what `entry` names; False when it is still there afterwards."""
    kind = entry[0]
    if kind == "path":
        path = Path(entry[1])
        remove_path(path)
        return not path.exists() and not path.is_symlink()
    if len(entry) != 3:
        return True  # not an entry this version writes
    engine = _engine(entry[1])
    if engine is None:
        return True  # an engine that is gone has nothing left to remove
    if kind == "image":
        engine.remove(entry[2])
        return engine.inspect(entry[2]) is None
    if kind == "container":
        engine.remove_container(entry[2])
    return True


def _repair(engines: set[str]) -> None:
    """An engine command stopped while it wrote an image can leave half of one in the storage."""
    for name in sorted(engines):
        engine = _engine(name)
        if engine is not None:
            try:
                engine.repair()
            except Exception:  # noqa: BLE001 (a repair that fails leaves the storage as it was)
                pass


def release() -> None:
    """Remove everything this process recorded and drop its claim; safe to call more than once."""
    global _claim
    claim = _claim
    if claim is None or claim.pid != os.getpid():
        return
    left = False
    for entry in reversed(claim.entries):
        try:
            left = not _remove(entry) or left
        except Exception:  # noqa: BLE001 (clean-up goes on with the next entry whatever one of them did)
            left = True
    _repair({entry[1] for entry in claim.entries if entry[0] == "image"})
    if not left:  # else the claim stays, unlocked once closed, for the next run's sweep
        claim.path.unlink(missing_ok=True)
    os.close(claim.fd)
    _claim = None


def sweep() -> int:
    """Remove what runs that died without cleaning up had recorded; returns how many claims were swept."""
    folder = cache_subdir("claims")
    swept = 0
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".new-"):
            try:
                if time.time() - path.stat().st_mtime > _NEW_CLAIM_GRACE:
                    path.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            continue
        if _claim is not None and path == _claim.path:
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its run is alive
            with os.fdopen(os.dup(fd)) as f:
                lines = f.read().splitlines()
            left, engines = False, set()
            for line in reversed(lines):
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line cut short by the kill: nothing was made for it yet
                if not (isinstance(entry, list) and len(entry) >= 2 and all(isinstance(x, str) for x in entry)):
                    continue
                if entry[0] == "image":
                    engines.add(entry[1])
                left = not _remove(entry) or left
            _repair(engines)
            if not left:
                path.unlink(missing_ok=True)
            swept += 1
        finally:
            os.close(fd)
    return swept
