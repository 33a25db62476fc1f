"""Plan -> the bytes of a build context: templates under images/, their scripts; no downloads, no engine.

The image tag is a hash of everything the context holds plus the inputs that stand for what is fetched
later (the source identity, SDK sha256s), so an unchanged recipe maps to an existing image and nothing is
rebuilt. Files are rewritten only when their bytes change, so engine layer caches and mtimes survive.
"""

import hashlib
import os
import re
import shlex
from pathlib import Path

import jinja2

from builder import PROJECT_ROOT
from builder.core.errors import RecipeError
from builder.core.types import one_line
from builder.engines.cleanup import temp_path
from builder.fetch.sdk import SDK_DIR
from builder.recipe.models import BuildPlan, ImageBase

IMAGES_DIR = PROJECT_ROOT / "images"
SOURCE_DIR = "llama.cpp"  # where the llama.cpp tree lands in the context
QUALIFY_SOURCE = "qualify/llama-qualify.c"  # the qualification program, compiled by the toolchain stage
RPC_SEED_SOURCE = "qualify/llama-rpc-seed.c"  # fills ggml-rpc-server's tensor cache from a GGUF, compiled there too
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


def environment() -> jinja2.Environment:
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
    # Only the scripts this Containerfile uses: everything in a context is used (see .containerignore).
    scripts = ["build-llama.sh", "entrypoint.sh"] + (["apt-install.sh"] if apt_packages(plan) else [])
    containerfile = environment().get_template("Containerfile.j2").render(plan=plan)
    qualify = {name: (IMAGES_DIR / name).read_bytes() for name in (QUALIFY_SOURCE, RPC_SEED_SOURCE)}
    return {**context_files(containerfile, [IMAGES_DIR / "scripts" / s for s in scripts]), **qualify,
            **_apt_sources(plan)}


def context_files(containerfile: str, scripts: list[Path]) -> dict[str, bytes]:
    """A context's Containerfile, its scripts (under scripts/) and ignore files that say all of it is used."""
    ignore = b"# everything in this context is used by the Containerfile\n"
    files = {"Containerfile": containerfile.encode(), ".containerignore": ignore, ".dockerignore": ignore}
    return files | {f"scripts/{script.name}": script.read_bytes() for script in sorted(scripts)}


def content_hash(preamble: str, files: dict[str, bytes]) -> str:
    """sha256 over `preamble` (what stands for inputs fetched later) and every rendered file."""
    digest = hashlib.sha256(preamble.encode())
    for name in sorted(files):
        digest.update(f"{name}\0{hashlib.sha256(files[name]).hexdigest()}\0".encode())
    return digest.hexdigest()


def fingerprint(plan: BuildPlan, files: dict[str, bytes]) -> str:
    """A llama.cpp context's: the source tree and SDK trees are not hashed, their pinned sha256 stands for them."""
    sdks = "".join(f"sdk\0{name}\0{sdk.sha256}\0" for name, sdk in sorted(plan.sdks.items()))
    return content_hash(f"context-v{CONTEXT_VERSION}\0{plan.source.identity}\0{sdks}", files)


def write_if_changed(path: Path, data: bytes, mode: int | None = None) -> bool:
    """Replace `path` atomically when its bytes differ (mtimes and layer caches survive); True if it changed."""
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


