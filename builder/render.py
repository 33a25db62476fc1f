"""BuildPlan -> build context on disk: the Containerfile from images/, the shared scripts, plan.json.

The image tag is a hash of everything the context holds plus the source identity, so an unchanged
recipe maps to an existing image and nothing is rebuilt. Files are rewritten only when their bytes
change, and the source tree is hard-linked, so engine layer caches and mtimes survive re-rendering.
"""

import hashlib
import json
import os
import re
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote

import jinja2

from builder import PROJECT_ROOT
from builder.cleanup import temp_path
from builder.errors import RecipeError
from builder.models import BuildPlan, ImageBase
from builder.sdk import SDK_DIR, missing_ship_patterns, unpacked
from builder.source import fetch_file, iter_tree
from builder.types import one_line

IMAGES_DIR = PROJECT_ROOT / "images"
SOURCE_DIR = "llama.cpp"  # where the llama.cpp tree lands in the context
APT_DIR = "apt"  # vendor apt sources (rendered) and their signing keys and .deb files (fetched at build time)
# Folders of a context that `build` (and `render --with-source`) fill from pinned inputs; not in plain renders.
STAGED_AT_BUILD = (SOURCE_DIR, SDK_DIR, APT_DIR)
# Bump when the meaning of a context changes in a way its bytes do not show.
CONTEXT_VERSION = "1"


def _quote(value: str) -> str:
    """A double-quoted Containerfile string (LABEL/ENV values), taken literally: no `$` expansion."""
    try:
        one_line(value)
    except ValueError:
        # The loaders check every value; this is the last guard before a Containerfile line.
        raise RecipeError(f"{value[:40]!r}…: label and env values must be one line without control characters",
                          "fix the recipe's labels, env or description") from None
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def _shell_word(value: str) -> str:
    """One word of a RUN line's shell command, quoted so that no value can add shell syntax to it."""
    # A newline would end the instruction early; other control characters have no place in a flag. Anything
    # else (any letter, even a bidi mark) is inert inside single quotes.
    return shlex.quote(one_line(value))


# A CMake cache entry as `-D` takes it: NAME or NAME:TYPE (the value may be anything printable).
_CMAKE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.+-]*(:[A-Z]+)?")


def check_cmake_flags(plan: BuildPlan) -> None:
    """Refuse a flag that cannot travel as one `-DNAME=VALUE` word, naming it, before anything is written."""
    for key, value in plan.cmake.items():
        if not _CMAKE_KEY.fullmatch(key):
            raise RecipeError(f"{plan.recipe}: cmake: {key!r} is not a CMake variable name",
                              "use NAME or NAME:TYPE (letters, digits, _ . + -), e.g. CMAKE_CUDA_ARCHITECTURES")
        try:
            one_line(value)
        except ValueError:
            raise RecipeError(f"{plan.recipe}: cmake.{key}: the value holds a line break or control character",
                              "write the value on one line (CMake lists are separated by ';')") from None


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(IMAGES_DIR),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["q"] = _quote
    env.filters["sh"] = _shell_word
    return env


def apt_packages(plan: BuildPlan) -> bool:
    """Whether a base of the plan is a registry image with apt packages to add."""
    return any(isinstance(b, ImageBase) and (b.packages or b.debs) for b in (plan.toolchain, plan.runtime))


def _apt_sources(plan: BuildPlan) -> dict[str, bytes]:
    """apt/<stage>/sources.list.d/<name>.list for the vendor repositories of image bases."""
    files = {}
    for stage, base in (("toolchain", plan.toolchain), ("runtime", plan.runtime)):
        for repo in base.repositories if isinstance(base, ImageBase) else []:
            components = " ".join(repo.components)
            line = f"deb [signed-by=/etc/apt/keyrings/{repo.name}.asc] {repo.url} {repo.suite} {components}\n"
            files[f"{APT_DIR}/{stage}/sources.list.d/{repo.name}.list"] = line.encode()
    return files


def render_files(plan: BuildPlan) -> dict[str, bytes]:
    """The rendered context without the source tree: relative path -> bytes."""
    check_cmake_flags(plan)
    files = {"Containerfile": _environment().get_template("Containerfile.j2").render(plan=plan).encode()}
    files.update(_apt_sources(plan))
    # Only the scripts this Containerfile uses: everything in a context is used (see .containerignore).
    scripts = ["build-llama.sh", "entrypoint.sh"] + (["apt-install.sh"] if apt_packages(plan) else [])
    for script in sorted(scripts):
        files[f"scripts/{script}"] = (IMAGES_DIR / "scripts" / script).read_bytes()
    files[".containerignore"] = b"# everything in this context is used by the Containerfile\n"
    files[".dockerignore"] = files[".containerignore"]
    return files


def fingerprint(plan: BuildPlan, files: dict[str, bytes]) -> str:
    digest = hashlib.sha256(f"context-v{CONTEXT_VERSION}\0{plan.source.identity}\0".encode())
    # SDK trees are not hashed: their pinned sha256 stands for them, as the source's does.
    for name, sdk in sorted(plan.sdks.items()):
        digest.update(f"sdk\0{name}\0{sdk.sha256}\0".encode())
    for name in sorted(files):
        digest.update(f"{name}\0{hashlib.sha256(files[name]).hexdigest()}\0".encode())
    return digest.hexdigest()


def image_tag(plan: BuildPlan, fp: str) -> str:
    return f"{plan.repository}:{plan.variant}-{fp[:16]}"


def floating_tag(plan: BuildPlan) -> str:
    return f"{plan.repository}:{plan.variant}"


def plan_document(plan: BuildPlan, fp: str) -> dict[str, object]:
    return {**plan.model_dump(mode="json"), "fingerprint": fp, "image": image_tag(plan, fp)}


def _write_if_changed(path: Path, data: bytes, mode: int | None = None) -> bool:
    if path.is_file() and path.read_bytes() == data:
        changed = False
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path.parent)
        tmp.write_bytes(data)
        os.replace(tmp, path)
        changed = True
    if mode is not None and path.stat().st_mode & 0o777 != mode:
        path.chmod(mode)
    return changed


def write_context(out: Path, plan: BuildPlan, files: dict[str, bytes], fp: str) -> list[str]:
    """Write the rendered files and plan.json into `out`; returns the names that changed."""
    out.mkdir(parents=True, exist_ok=True)
    changed = []
    for name, data in files.items():
        mode = 0o755 if name.startswith("scripts/") else 0o644
        if _write_if_changed(out / name, data, mode):
            changed.append(name)
    doc = json.dumps(plan_document(plan, fp), indent=2, sort_keys=True) + "\n"
    if _write_if_changed(out / "plan.json", doc.encode(), 0o644):
        changed.append("plan.json")
    return changed


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
            _write_if_changed(out / APT_DIR / stage / "keyrings" / f"{repo.name}.asc", key.read_bytes(), 0o644)
        for deb in base.debs if isinstance(base, ImageBase) else []:
            name = unquote(deb.url.rsplit("/", 1)[-1])
            data = fetch_file(deb.url, deb.sha256).read_bytes()
            _write_if_changed(out / APT_DIR / stage / "debs" / name, data, 0o644)


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
