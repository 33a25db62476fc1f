"""A vLLM service's model on netbooted nodes: a Hugging Face folder on the control node, packed into one
read-only squashfs (fixed times and owners, so the same files give the same bytes) and published into
pxe-root by its sha256.

The node fetches it like a GGUF model (onto its cache disk when it has one, hashing it before use)
and mounts it read-only: no unpacking, so a model costs its size once on the disk and nothing in RAM.
Packing is cached by the folder's file list (names, sizes, modification times): a second publish of an
unchanged folder packs nothing.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

from builder.core.errors import RecipeError
from builder.core.paths import cache_subdir
from builder.core.run import run_logged
from builder.engines.cleanup import temp_dir


def _inside(path: Path, folder: Path) -> bool:
    """Whether a link in the model folder stays in the model: inside the folder, or, for a Hugging Face hub
    snapshot (REPO/snapshots/REV/), in that repository's blobs/. A link anywhere else is refused: it would
    publish another file of the control node to every node."""
    real, base = path.resolve(), folder.resolve()
    if real.is_relative_to(base):
        return True
    return base.parent.name == "snapshots" and real.parent == base.parent.parent / "blobs"


def _files(folder: Path) -> list[tuple[str, Path]]:
    """The folder's regular files (hub snapshots' links followed), by relative path; hidden ones left out
    (.cache/, .git/): they are not the model."""
    found = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or path.is_dir():
            continue
        if path.is_symlink() and not _inside(path, folder):
            raise RecipeError(f"{path}: a link out of the model folder (to {path.resolve()})",
                              "copy the file into the folder if it belongs to the model")
        if not path.is_file():
            raise RecipeError(f"{path}: not a regular file", "a model folder holds files and folders only")
        found.append((rel.as_posix(), path))
    return found


def pack_model(folder: Path) -> Path:
    """The squashfs of a model folder, made once per set of files."""
    files = _files(folder)
    listing = [(rel, path.stat().st_size, path.stat().st_mtime_ns) for rel, path in files]
    key = hashlib.sha256(json.dumps([str(folder.resolve()), listing]).encode()).hexdigest()[:24]
    out = cache_subdir("netboot") / "models" / f"{key}.squashfs"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with temp_dir(out.parent) as work:
        tree = work / "model"
        for rel, path in files:
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path.resolve(), tree / rel)  # no copy of a large weights file where one filesystem holds both
            except OSError:
                shutil.copyfile(path, tree / rel)
        # Weights barely compress: store data and fragments as they are, so the node reads them at disk speed.
        run_logged(["mksquashfs", str(tree), str(work / "model.squashfs"), "-noappend", "-no-xattrs", "-all-root",
                    "-mkfs-time", "0", "-all-time", "0", "-no-progress", "-noD", "-noF"],
                   work / "mksquashfs.log", title=f"squashfs of the model {folder}")
        os.replace(work / "model.squashfs", out)
    return out
