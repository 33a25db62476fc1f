"""Fetch a llama.cpp image's pinned inputs into its build context: the source tree, SDKs, vendor apt files.

The only network stage before the engine (besides resolving the source, which the plan needs): every file
is checked against its pin on the way into the cache, and the context gets hard links, so re-staging is
cheap and mtimes survive.
"""

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote

from builder.errors import RecipeError
from builder.models import BuildPlan, ImageBase
from builder.render import APT_DIR, SOURCE_DIR, write_if_changed
from builder.sdk import SDK_DIR, missing_ship_patterns, unpacked
from builder.source import fetch_file, iter_tree


def stage_source(tree: Path, out: Path) -> None:
    """Mirror the llama.cpp tree (minus pruned folders) into out/llama.cpp with hard links."""
    _mirror(tree, out / SOURCE_DIR, set(iter_tree(tree)), iter_tree)


def _all_files(root: Path) -> list[Path]:
    return [p.relative_to(root) for p in root.rglob("*") if p.is_file() or p.is_symlink()]


def stage_sdks(plan: BuildPlan, out: Path) -> None:
    """Unpack (once, into the cache) every SDK of the plan and mirror it into out/sdk/<name>."""
    for name, spec in plan.sdks.items():
        tree = unpacked(spec)
        missing = missing_ship_patterns(spec, tree)
        if missing:
            raise RecipeError(f"{plan.recipe}: sdks.{name}.ship: {', '.join(missing)} match nothing in {spec.file}",
                              "list the files the runtime needs as they are named inside the wheel")
        _mirror(tree, out / SDK_DIR / name, set(_all_files(tree)), _all_files)
    if (out / SDK_DIR).is_dir():
        for stale in (out / SDK_DIR).iterdir():
            if stale.name not in plan.sdks:
                shutil.rmtree(stale)


def stage_apt_files(plan: BuildPlan, out: Path) -> None:
    """Fetch (once, checked by sha256) vendor repository keys and .deb files into apt/<stage>/."""
    for stage, base in (("toolchain", plan.toolchain), ("runtime", plan.runtime)):
        for repo in base.repositories if isinstance(base, ImageBase) else []:
            key = fetch_file(repo.key_url, repo.key_sha256)
            write_if_changed(out / APT_DIR / stage / "keyrings" / f"{repo.name}.asc", key.read_bytes(), 0o644)
        for deb in base.debs if isinstance(base, ImageBase) else []:
            name = unquote(deb.url.rsplit("/", 1)[-1])
            data = fetch_file(deb.url, deb.sha256).read_bytes()
            write_if_changed(out / APT_DIR / stage / "debs" / name, data, 0o644)


def _mirror(tree: Path, dest: Path, wanted: set[Path], listing: Callable[[Path], list[Path]]) -> None:
    """Make dest hold exactly `wanted` (paths relative to tree), hard-linked where possible."""
    for rel in wanted:
        src, dst = tree / rel, dest / rel
        if dst.exists() and os.path.samefile(src, dst):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    if dest.is_dir():
        for rel in set(listing(dest)) - wanted:
            (dest / rel).unlink()
