"""Locked .deb files kept by sha256 in the builder cache, and a local apt repository made of them.

sid and experimental drop a version as soon as a newer one lands, so a base is bootstrapped from the
.debs its lock names, kept in the cache under their sha256 (checked on every use; a damaged file is
fetched again). mmdebstrap then installs from a repository made of exactly those files: the same
packages on every rebuild, whatever the archive holds by then.
"""

import hashlib
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlparse

import requests

from builder.core.digests import sha256_file
from builder.core.errors import LockError
from builder.core.run import run
from builder.fetch.debian import SNAPSHOT_EXAMPLE, AptSource
from builder.recipe.models import LockedDeb

DOWNLOAD_TIMEOUT = 60
PARALLEL = 4
REFRESH_HINT = (f"run `builder lock --refresh` to move the lock to the archive's current versions, or keep these by "
                f"setting the base's mirror to Debian's snapshot archive (e.g. {SNAPSHOT_EXAMPLE})")


class _Gone(Exception):
    """The mirror answered 404: the file is not there (any more)."""


def _copy_file(mirror: str, filename: str, dest: Path) -> None:
    parsed = urlparse(mirror)
    if parsed.scheme == "file":
        try:
            shutil.copyfile(Path(unquote(parsed.path)) / filename, dest)
        except FileNotFoundError:
            raise _Gone() from None
        return
    with requests.get(f"{mirror}/{filename}", stream=True, timeout=DOWNLOAD_TIMEOUT) as resp:
        if resp.status_code in (404, 410):
            raise _Gone()
        resp.raise_for_status()
        with open(dest, "wb") as out:
            for chunk in resp.iter_content(1 << 20):
                out.write(chunk)


class DebStore:
    """`<root>/<sha256>.deb`, written under a temporary name and renamed once its sha256 is right."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, deb: LockedDeb) -> Path:
        return self.root / f"{deb.sha256}.deb"

    def has(self, deb: LockedDeb) -> bool:
        """Whether the store holds this .deb intact; a damaged one (cut short, changed) is removed."""
        path = self.path(deb)
        if not path.is_file():
            return False
        if path.stat().st_size == deb.size and sha256_file(path) == deb.sha256:
            return True
        path.unlink(missing_ok=True)
        return False

    def fetch(self, deb: LockedDeb, sources: list[AptSource], where: str) -> Path:
        """The .deb from the store, else from the first source that has it; LockError when none does."""
        if self.has(deb):
            return self.path(deb)
        # The source of its own suite first; a mirror of another suite may still hold the same pool file.
        uris = [s.uri for s in sources if s.suite == deb.suite] + [s.uri for s in sources]
        what = f"{deb.name} {deb.version} ({deb.suite})"
        problem = ""
        for uri in dict.fromkeys(uris):
            fd, name = tempfile.mkstemp(dir=self.root, prefix=".fetch-", suffix=".part")
            os.close(fd)
            partial = Path(name)
            try:
                _copy_file(uri, deb.filename, partial)
                if hashlib.sha256(partial.read_bytes()).hexdigest() != deb.sha256:
                    problem = f"{uri}/{deb.filename} does not match the sha256 in the lock"
                    continue
                os.replace(partial, self.path(deb))
                return self.path(deb)
            except _Gone:
                continue
            except requests.RequestException as exc:
                problem = f"could not download it from {uri}: {type(exc).__name__}"
            finally:
                partial.unlink(missing_ok=True)
        if problem:
            raise LockError(f"{where}: {what}: {problem}", "check that the mirror is reachable, then build again")
        raise LockError(f"{where}: {what} is no longer in the archive ({sources[0].uri}) nor in the cache",
                        REFRESH_HINT)

    def fetch_all(self, debs: list[LockedDeb], sources: list[AptSource], where: str) -> list[Path]:
        """Every .deb of a lock, a few downloads at a time; the first missing one stops it, in lock order."""
        with ThreadPoolExecutor(PARALLEL) as pool:
            futures = [pool.submit(self.fetch, deb, sources, where) for deb in debs]
        return [f.result() for f in futures]


def write_repository(debs: list[LockedDeb], store: DebStore, suite: str, arch: str, out: Path) -> None:
    """A one-suite apt repository at `out` holding exactly `debs` (from the store), for a copy:// source."""
    pool = out / "pool"
    pool.mkdir(parents=True)
    stanzas = []
    for deb in debs:
        name = f"{deb.sha256}.deb"
        os.symlink(store.path(deb), pool / name)
        control = run(["dpkg-deb", "--field", "--", store.path(deb)]).stdout.strip()
        # The archive's index overrides a package's own priority (apt is required there, important in its
        # control file), and minbase selects by the archive's: keep the locked one.
        control = re.sub(r"(?m)^Priority: .*\n?", "", control).strip()
        stanzas.append(f"{control}\nPriority: {deb.priority}\nFilename: pool/{name}\nSize: {deb.size}\n"
                       f"SHA256: {deb.sha256}\n")
    index = "\n".join(stanzas).encode()
    binary = out / "dists" / suite / "main" / f"binary-{arch}"
    binary.mkdir(parents=True)
    (binary / "Packages").write_bytes(index)
    relpath = f"main/binary-{arch}/Packages"
    (out / "dists" / suite / "Release").write_text(
        f"Suite: {suite}\nCodename: {suite}\nDate: Thu, 01 Jan 1970 00:00:00 UTC\nArchitectures: {arch}\n"
        "Components: main\n"
        f"Description: the locked packages of a builder base\nSHA256:\n"
        f" {hashlib.sha256(index).hexdigest()} {len(index)} {relpath}\n")
