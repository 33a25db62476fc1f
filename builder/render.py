"""BuildPlan -> build context on disk: the Containerfile from images/, the shared scripts, plan.json.

The image tag is a hash of everything the context holds plus the source identity, so an unchanged
recipe maps to an existing image and nothing is rebuilt. Files are rewritten only when their bytes
change, and the source tree is hard-linked, so engine layer caches and mtimes survive re-rendering.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import jinja2

from builder import PROJECT_ROOT
from builder.models import BuildPlan
from builder.source import iter_tree

IMAGES_DIR = PROJECT_ROOT / "images"
SOURCE_DIR = "llama.cpp"  # where the llama.cpp tree lands in the context
# Bump when the meaning of a context changes in a way its bytes do not show.
CONTEXT_VERSION = "1"


def _quote(value: str) -> str:
    """A double-quoted Containerfile string (LABEL/ENV values)."""
    if "\n" in value:
        raise ValueError("label and env values must be one line")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(IMAGES_DIR),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["q"] = _quote
    return env


def render_files(plan: BuildPlan) -> dict[str, bytes]:
    """The rendered context without the source tree: relative path -> bytes."""
    files = {"Containerfile": _environment().get_template("Containerfile.j2").render(plan=plan).encode()}
    for script in sorted((IMAGES_DIR / "scripts").iterdir()):
        files[f"scripts/{script.name}"] = script.read_bytes()
    files[".containerignore"] = b"# everything in this context is used by the Containerfile\n"
    files[".dockerignore"] = files[".containerignore"]
    return files


def fingerprint(plan: BuildPlan, files: dict[str, bytes]) -> str:
    digest = hashlib.sha256(f"context-v{CONTEXT_VERSION}\0{plan.source.identity}\0".encode())
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
        tmp = path.with_name(f".{path.name}.tmp")
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
    dest = out / SOURCE_DIR
    wanted = set(iter_tree(tree))
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
        for rel in set(iter_tree(dest)) - wanted:
            (dest / rel).unlink()
