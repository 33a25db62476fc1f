"""Where builder keeps its caches and logs (read when called, never at import time)."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """$BUILDER_CACHE, else $XDG_CACHE_HOME/builder, else ~/.cache/builder."""
    if os.environ.get("BUILDER_CACHE"):
        return Path(os.environ["BUILDER_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "builder"


def cache_subdir(name: str) -> Path:
    path = cache_dir() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def inside(root: Path, path: Path, what: str) -> Path:
    """`path`, after checking that it resolves to a place under `root` (names from elsewhere build it)."""
    from builder.core.errors import RegistryError  # paths stays importable without the rest of builder

    base = root.resolve()
    resolved = path.resolve()
    if resolved != base and base not in resolved.parents:
        raise RegistryError(f"{what}: {path} would lie outside {root}", "refused; nothing was placed")
    return path
