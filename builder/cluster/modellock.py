"""cluster.lock: what each `hf://` model of the cluster files in one folder resolved to when `builder lock FILE`
ran, so that every later run serves exactly those bytes.

One JSON file beside the cluster files (every cluster file of a folder shares it; an entry is keyed by the model's
name as the file writes it):

    {"version": 1, "models": {"hf://ORG/REPO@REVISION/FILE.gguf": {
        "repo": "ORG/REPO", "revision": "REVISION", "commit": "<40 hex>",
        "sha256": "<the GGUF's sha256, or the folder's content hash (hfmodel.py)>",
        "files": [{"path": "FILE.gguf", "size": 1234, "sha256": "<64 hex>"}]}}}

`sha256` follows from `files` (it is there for people and for `cluster commands`), and is checked on reading.
The lock holds names, commits, sizes and digests only: never a token or anything else from the environment.
"""

import json
import os
import tempfile
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError

from builder.cluster.hfmodel import hash_lines
from builder.cluster.hub import HubFile, valid_file
from builder.core.errors import RecipeError
from builder.recipe.load import display_path
from builder.recipe.models import Strict

LOCK_NAME = "cluster.lock"
LOCK_VERSION: Literal[1] = 1
SHA256 = r"^[0-9a-f]{64}$"


class LockedFile(Strict):
    path: Annotated[str, Field(min_length=1, max_length=4096)]
    size: Annotated[int, Field(ge=0)]
    sha256: Annotated[str, Field(pattern=SHA256)]


class LockedModel(Strict):
    repo: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,96}/[A-Za-z0-9._-]{1,96}$")]
    revision: Annotated[str, Field(min_length=1, max_length=128)]
    commit: Annotated[str, Field(pattern=r"^[0-9a-f]{40}$")]
    sha256: Annotated[str, Field(pattern=SHA256)]
    files: Annotated[list[LockedFile], Field(min_length=1)]

    @property
    def hub_files(self) -> tuple[HubFile, ...]:
        return tuple(HubFile(f.path, f.size, f.sha256) for f in self.files)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


class ClusterLock(Strict):
    version: Literal[1]
    models: dict[str, LockedModel]


def lock_path(cluster_file: Path) -> Path:
    """The lock beside a cluster file."""
    return cluster_file.parent / LOCK_NAME


def content_hash(files: tuple[HubFile, ...], folder: bool) -> str:
    """A GGUF's sha256, or a folder's content hash computed from its files' sha256s (hfmodel.py's format)."""
    return hash_lines([(f.path, f.sha256) for f in files]) if folder else files[0].sha256


def read(path: Path) -> dict[str, LockedModel]:
    """The lock's entries, empty when there is no lock; one line for a lock that is not one."""
    where = display_path(path)
    hint = f"fix or delete {where}, then run `builder lock CLUSTER.yaml`"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{where}: cannot read the lock: {getattr(exc, 'strerror', None) or exc}", hint) from None
    try:
        lock = ClusterLock.model_validate(json.loads(text))
    except (ValueError, RecursionError) as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) else None
        problem = (f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}" if first
                   else f"not JSON: {str(exc).splitlines()[0][:120]}")
        raise RecipeError(f"{where}: {problem[:200]}", hint) from None
    for name, entry in lock.models.items():
        if not all(valid_file(f.path) for f in entry.files):
            raise RecipeError(f"{where}: models.{name[:120]}: a file path is not a plain relative path", hint)
        folder = "@" in name and "/" not in name.rsplit("@", 1)[1]
        if content_hash(entry.hub_files, folder) != entry.sha256 or (not folder and len(entry.files) != 1):
            raise RecipeError(f"{where}: models.{name[:120]}.sha256: does not follow from its files", hint)
    return lock.models


def entry(base: Path, location: str, where: str, field: str) -> LockedModel:
    """The entry for `location` in the lock in `base` (the cluster file's folder); one line saying how to make it
    when there is none."""
    path = base / LOCK_NAME
    found = read(path).get(location)
    if found is None:
        raise RecipeError(f"{where}: {field}: {location} is not in {display_path(path)}",
                          f"run `builder lock {where}` (it records the model's commit, sizes and sha256s)")
    return found


def write(cluster_file: Path, entries: dict[str, LockedModel]) -> Path:
    """Merge `entries` into the lock beside `cluster_file` (other files' entries stay), atomically."""
    path = lock_path(cluster_file)
    models = {**read(path), **entries}
    doc = ClusterLock(version=LOCK_VERSION, models=dict(sorted(models.items())))
    text = json.dumps(doc.model_dump(), indent=2) + "\n"
    fd, scratch = tempfile.mkstemp(prefix=f".{LOCK_NAME}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(scratch, 0o644)
        os.replace(scratch, path)
    except OSError as exc:
        Path(scratch).unlink(missing_ok=True)
        raise RecipeError(f"{display_path(path)}: cannot write the lock: {exc.strerror}",
                          "check the folder's permissions") from None
    return path
