"""What people look up about a llama.cpp source: its commit, and the ggml RPC protocol its workers speak.

Only what the pinned source records is shown: a git pin's commit; for the llama-cpp-python sdist, the commit its
CHANGELOG names for that release. Nothing is made up where the source says nothing (no build number: no pin has one).
"""

import re
from pathlib import Path

from builder.core.errors import SourceError
from builder.core.paths import cache_subdir
from builder.fetch.source import find_llama_root, git_checkout
from builder.recipe.models import ArchiveSource, GitSource, PypiSource, SourceInfo

_RPC_DEFINE = re.compile(r"^#define\s+RPC_PROTO_(MAJOR|MINOR|PATCH)_VERSION\s+(\d+)\s*$", re.M)
_UPDATE = re.compile(r"update llama\.cpp to \S+?@([0-9a-f]{7,40})\b", re.I)
_RELEASE = re.compile(r"^## \[([^\]]+)\]", re.M)


def rpc_protocol(root: Path) -> str | None:
    """RPC_PROTO_MAJOR.MINOR.PATCH from ggml/include/ggml-rpc.h; None when the tree has no such header."""
    try:
        text = (root / "ggml" / "include" / "ggml-rpc.h").read_text(errors="replace")
    except OSError:
        return None
    parts = dict(_RPC_DEFINE.findall(text))
    if not {"MAJOR", "MINOR", "PATCH"} <= parts.keys():
        return None
    return f"{parts['MAJOR']}.{parts['MINOR']}.{parts['PATCH']}"


def _changelog_commit(root: Path, version: str) -> str | None:
    """The commit llama-cpp-python's CHANGELOG names for `version` (or the nearest release before it that
    updated llama.cpp): the sdist vendors that tree under vendor/llama.cpp."""
    if root.parent.name != "vendor":
        return None
    try:
        text = (root.parent.parent / "CHANGELOG.md").read_text(errors="replace")
    except OSError:
        return None
    heading = next((m for m in _RELEASE.finditer(text) if m.group(1) == version), None)
    if heading is None:
        return None
    found = _UPDATE.search(text, heading.end())
    return found.group(1) if found else None


def llama_commit(info: SourceInfo, root: Path) -> str | None:
    """The llama.cpp commit of a resolved source, where the pin records one; else None."""
    if info.identity.startswith("git:"):
        return info.identity.removeprefix("git:")
    if info.locator.startswith("pypi:llama-cpp-python=="):
        return _changelog_commit(root, info.version)
    return None


def cached_root(spec: GitSource | ArchiveSource | PypiSource) -> Path | None:
    """The llama.cpp root of a pin already fetched into the cache; None when it is not (nothing is fetched)."""
    if isinstance(spec, GitSource):
        checkout = git_checkout(spec)
        base = checkout / spec.subdir if spec.subdir else checkout
        candidates = [base] if (checkout / ".git").is_dir() else []
    else:
        tree = cache_subdir("sources/trees") / spec.sha256
        tops = [p for p in tree.iterdir() if p.is_dir()] if tree.is_dir() else []
        candidates = [b / spec.subdir for b in [tree, *tops] if spec.subdir and (b / spec.subdir).is_dir()]
        candidates += [] if spec.subdir or not tree.is_dir() else [tree]
    for candidate in candidates:
        try:
            return find_llama_root(candidate)
        except (SourceError, OSError):  # a half-made cache entry: as if not fetched
            return None
    return None


def pin_line(spec: GitSource | ArchiveSource | PypiSource, where: str) -> str:
    """One line on the shared llama.cpp pin for `builder targets`, from the cache only (nothing is fetched)."""
    if isinstance(spec, PypiSource):
        name, locator = f"{spec.package} {spec.version}", f"pypi:{spec.package}=={spec.version}"
    elif isinstance(spec, GitSource):
        name = locator = f"{spec.url}@{spec.ref}"
    else:
        name = locator = spec.url
    root = cached_root(spec)
    if root is None:
        return f"llama.cpp ({where}): {name}; its commit and ggml RPC protocol: `builder plan --target cpu` " \
               "(fetches the source)"
    commit: str | None = None
    if isinstance(spec, GitSource):
        head = (root / ".git" / "HEAD") if (root / ".git").is_dir() else None
        text = head.read_text().strip() if head is not None and head.is_file() else ""
        commit = text if re.fullmatch(r"[0-9a-f]{40}", text) else None
    elif isinstance(spec, PypiSource):
        info = SourceInfo(locator=locator, identity=f"sha256:{spec.sha256}", version=spec.version, epoch=0)
        commit = llama_commit(info, root)
    protocol = rpc_protocol(root)
    return (f"llama.cpp ({where}): {name}, commit {commit or 'not recorded by this source'}, "
            f"ggml RPC protocol {protocol or 'not found'}")
