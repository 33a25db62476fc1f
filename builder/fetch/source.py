"""Fetch the pinned llama.cpp source into a cache and hand out the extracted tree.

Archives are checked against their sha256 before use; trees are extracted once per identity. A local
directory or archive given on the command line overrides the recipe's pin (for development and tests).
"""

import hashlib
import os
import shutil
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import requests

from builder.core.digests import sha256_file
from builder.core.errors import ArchiveError, SourceError, raise_if_stopped
from builder.core.locks import lock_file, locked
from builder.core.paths import cache_subdir
from builder.core.run import run
from builder.engines.cleanup import temp_dir, temp_path
from builder.recipe.models import ArchiveSource, GitSource, PypiSource, SourceInfo

# Top-level folders of the llama.cpp tree that no build reads; left out of build contexts.
PRUNED = frozenset({".git", ".github", "docs", "media", "models", "gguf-py"})
DOWNLOAD_TIMEOUT = 60


@dataclass(frozen=True)
class SourceTree:
    info: SourceInfo
    path: Path


def iter_tree(root: Path) -> list[Path]:
    """Files of a llama.cpp tree that go into a build context, sorted, relative to root."""
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if rel == Path("."):
            dirnames[:] = [d for d in dirnames if d not in PRUNED]
        dirnames.sort()
        files.extend(rel / name for name in sorted(filenames))
    return files


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for rel in iter_tree(root):
        full = root / rel
        digest.update(f"{rel}\0{'x' if os.access(full, os.X_OK) else '-'}\0".encode())
        digest.update(full.read_bytes() if not full.is_symlink() else os.readlink(full).encode())
    return digest.hexdigest()


def find_llama_root(path: Path) -> Path:
    """The llama.cpp tree at or under `path` (itself, one top folder, or a vendor/llama.cpp inside)."""
    candidates = [path, path / "vendor" / "llama.cpp"]
    subdirs = [p for p in path.iterdir() if p.is_dir()] if path.is_dir() else []
    if len(subdirs) == 1:
        candidates += [subdirs[0], subdirs[0] / "vendor" / "llama.cpp"]
    for candidate in candidates:
        cmake = candidate / "CMakeLists.txt"
        if cmake.is_file() and "llama.cpp" in cmake.read_text(errors="replace")[:4000]:
            return candidate
    raise SourceError(f"{path}: no llama.cpp source tree found", "expected CMakeLists.txt of llama.cpp")


def _tar_epoch(archive: Path, identity: str) -> int:
    """The newest member's mtime: the archive's own date. Cached, since reading it decompresses all."""
    memo = cache_subdir("sources/trees") / f"{identity}.epoch"
    if memo.is_file():
        return int(memo.read_text())
    with tarfile.open(archive) as tar:
        epoch = int(max((m.mtime for m in tar.getmembers()), default=0))
    tmp = temp_path(memo.parent)
    tmp.write_text(str(epoch))
    os.replace(tmp, memo)
    return epoch


def _strict_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """tarfile's "data" filter (no '..', no links that leave the folder, no device files or FIFOs), and
    absolute names refused rather than made relative: an archive that has them is not a source release."""
    if member.name.startswith(("/", "\\")):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, dest)


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _extract(archive: Path, identity: str, subdir: str) -> Path:
    """Extract once into sources/trees/<identity>; returns the llama.cpp root inside it."""
    trees = cache_subdir("sources/trees")
    final = trees / identity
    if not final.is_dir():
        with temp_dir(trees) as tmp:
            try:
                with tarfile.open(archive) as tar:
                    tar.extractall(tmp, filter=_strict_filter)
                os.replace(tmp, final)
            except tarfile.FilterError as exc:
                raise ArchiveError(f"{archive}: refused, {_one_line(exc)}",
                                   "the archive is damaged or hostile; check its pin and where it came from") from None
            except (tarfile.TarError, OSError) as exc:
                raise SourceError(f"{archive}: cannot extract: {_one_line(exc)}") from None
    if subdir:
        tops = [p for p in final.iterdir() if p.is_dir()]
        for base in [final, *tops]:
            if (base / subdir).is_dir():
                return find_llama_root(base / subdir)
        raise SourceError(f"{archive}: subdir {subdir!r} not found in the archive")
    return find_llama_root(final)


def download(url: str, dest: Path) -> None:
    """url to dest, whole or not at all (a temp name beside it, renamed at the end); one line on failure."""
    tmp = temp_path(dest.parent)
    try:
        with requests.get(url, stream=True, timeout=DOWNLOAD_TIMEOUT) as resp:
            if resp.status_code != 200:
                raise SourceError(f"could not download {url}: the server answered {resp.status_code}",
                                  "check the URL in the recipe")
            with open(tmp, "wb") as f:
                for chunk in resp.iter_content(1 << 20):
                    f.write(chunk)
        os.replace(tmp, dest)
    except requests.RequestException as exc:
        raise SourceError(f"could not download {url}: {type(exc).__name__}",
                          "check that the site is reachable from this machine") from None
    finally:
        tmp.unlink(missing_ok=True)


def cache_verified(cached: Path, sha256: str, what: str, fetch: Callable[[Path], None]) -> Path:
    """`cached`, named by its sha256, made by `fetch` into a temp name beside it, checked, then renamed.

    Only a file whose bytes were checked ever has the name, so an interrupted or altered download is
    never taken for the pinned file; the lock keeps two runs from fetching the same file at once.
    """
    if cached.is_file():
        return cached
    with locked(lock_file(f"source-{sha256}"), f"fetching {what}"):
        if cached.is_file():
            return cached  # the run we waited for fetched it
        tmp = temp_path(cached.parent)
        try:
            fetch(tmp)
            actual = sha256_file(tmp)
            if actual != sha256:
                raise SourceError(f"{what}: sha256 mismatch: expected {sha256}, got {actual}",
                                  "the pin in the recipe is wrong or the download was altered")
            raise_if_stopped()
            os.replace(tmp, cached)
        finally:
            tmp.unlink(missing_ok=True)
    return cached


def _fetch_archive(spec: ArchiveSource) -> Path:
    def fetch(tmp: Path) -> None:
        if "://" in spec.url:
            download(spec.url, tmp)
        else:
            shutil.copyfile(Path(spec.url).expanduser(), tmp)
    return cache_verified(cache_subdir("sources/archives") / f"{spec.sha256}.tar", spec.sha256, spec.url, fetch)


def fetch_file(url: str, sha256: str) -> Path:
    """A single pinned file (an apt signing key, say), downloaded once and checked."""
    return cache_verified(cache_subdir("sources/files") / sha256, sha256, url, lambda tmp: download(url, tmp))


def _fetch_pypi(spec: PypiSource) -> Path:
    archives = cache_subdir("sources/archives")

    def fetch(tmp: Path) -> None:
        with temp_dir(archives) as folder:
            run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                 "--dest", folder, "--", f"{spec.package}=={spec.version}"], timeout=900)
            files = list(folder.iterdir())
            if len(files) != 1:
                raise SourceError(f"pip download of {spec.package}=={spec.version} gave {len(files)} files")
            os.replace(files[0], tmp)
    return cache_verified(archives / f"{spec.sha256}.tar", spec.sha256, f"{spec.package}=={spec.version}", fetch)


def git_checkout(spec: GitSource) -> Path:
    """Where a git pin is checked out in the cache (one folder per URL and ref)."""
    return cache_subdir("sources/git") / hashlib.sha256(f"{spec.url}\0{spec.ref}".encode()).hexdigest()[:24]


def _fetch_git(spec: GitSource) -> SourceTree:
    checkout = git_checkout(spec)
    if not (checkout / ".git").is_dir():
        with locked(lock_file(f"git-{checkout.name}"), f"fetching {spec.url}"), temp_dir(checkout.parent) as tmp:
            if not (checkout / ".git").is_dir():
                run(["git", "init", "-q", "--", tmp])
                # `--`: a URL or ref that looks like an option (--upload-pack=…) must stay an argument.
                run(["git", "-C", tmp, "fetch", "-q", "--depth", "1", "--", spec.url, spec.ref], timeout=1800)
                run(["git", "-C", tmp, "checkout", "-q", "FETCH_HEAD"])
                os.replace(tmp, checkout)
    commit = run(["git", "-C", checkout, "rev-parse", "HEAD"]).stdout.strip()
    epoch = int(run(["git", "-C", checkout, "log", "-1", "--format=%ct"]).stdout.strip())
    root = find_llama_root(checkout / spec.subdir if spec.subdir else checkout)
    return SourceTree(SourceInfo(locator=f"{spec.url}@{spec.ref}", identity=f"git:{commit}",
                                 version=spec.ref, epoch=epoch), root)


def resolve(spec: GitSource | ArchiveSource | PypiSource) -> SourceTree:
    """Fetch (once) and extract the recipe's pinned source."""
    if isinstance(spec, GitSource):
        return _fetch_git(spec)
    if isinstance(spec, PypiSource):
        archive = _fetch_pypi(spec)
        locator, version = f"pypi:{spec.package}=={spec.version}", spec.version
    else:
        archive = _fetch_archive(spec)
        locator, version = spec.url, PurePosixPath(spec.url).name
    if spec.subdir:
        locator += f"#{spec.subdir}"
    return _archive_tree(archive, spec.sha256, spec.subdir, locator, version)


def _archive_tree(archive: Path, sha256: str, subdir: str, locator: str, version: str) -> SourceTree:
    """The llama.cpp tree of an archive, extracted once (and its date read once) per sha256."""
    with locked(lock_file(f"source-tree-{sha256}"), f"extracting {locator}"):
        root = _extract(archive, sha256, subdir)
        epoch = _tar_epoch(archive, sha256)
    return SourceTree(SourceInfo(locator=locator, identity=f"sha256:{sha256}", version=version, epoch=epoch), root)


def resolve_override(path_or_archive: str) -> SourceTree:
    """A local llama.cpp directory or archive given with --llama-cpp-source (no pin to check)."""
    path = Path(path_or_archive).expanduser().resolve()
    if path.is_dir():
        root = find_llama_root(path)
        epoch = max((int((root / f).stat().st_mtime) for f in iter_tree(root)), default=0)
        info = SourceInfo(locator=str(root), identity=f"tree:{tree_hash(root)}", version="local", epoch=epoch)
        return SourceTree(info, root)
    if path.is_file():
        return _archive_tree(path, sha256_file(path), "", str(path), path.name)
    raise SourceError(f"--llama-cpp-source: {path_or_archive}: no such file or directory")

