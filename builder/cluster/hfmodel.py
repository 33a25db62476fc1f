"""A Hugging Face-format model folder (what a vLLM service serves) and its content hash.

The hash is sha256 over the lines `SHA256  PATH` of every regular file in the folder, one line each, sorted by
PATH (relative, `/`-separated, compared as UTF-8 bytes), each line ending in a newline: exactly what
coreutils prints for

    (cd DIR && find . -type f -printf '%P\\0' | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum

so a user can check it without builder (`builder cluster hash-model DIR` prints it too). The folder is
mounted read-only into the servers' containers, so anything that would not be the same file there is
refused: symbolic links (a Hugging Face cache snapshot is made of links into blobs/: copy it with `cp -rL`),
sockets, devices and names that sha256sum would escape.
"""

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from builder.core.digests import sha256_file
from builder.core.errors import RecipeError


@dataclass(frozen=True)
class ModelFolder:
    files: tuple[tuple[str, int], ...]  # (relative path, size), sorted as the hash sorts them

    @property
    def size(self) -> int:
        return sum(size for _, size in self.files)


def scan(folder: Path, where: str, shown: str | None = None) -> ModelFolder:
    """The folder's regular files; one line naming `where` (file and field) for anything else in it. `shown` is
    how the folder is named in those lines (as the user wrote it)."""
    name = shown or str(folder)
    try:
        top = os.lstat(folder)
    except OSError as exc:
        raise RecipeError(f"{where}: {name} does not exist ({exc.strerror})",
                          "give the Hugging Face model folder's path relative to the cluster file") from None
    if stat.S_ISLNK(top.st_mode):
        raise RecipeError(f"{where}: {name} is a symbolic link",
                          "give the folder itself (the link's target, or a copy made with cp -rL)")
    if not stat.S_ISDIR(top.st_mode):
        raise RecipeError(f"{where}: {name} is not a folder",
                          "a vLLM service serves a Hugging Face model folder (config.json, *.safetensors, tokenizer)")
    try:
        found = _regular_files(folder, where, name)
    except OSError as exc:
        raise RecipeError(f"{where}: cannot read {name}: {exc.strerror} ({exc.filename})",
                          "make the model folder readable") from None
    if not any(file == "config.json" for file, _ in found):
        raise RecipeError(f"{where}: {name} has no config.json: not a Hugging Face model folder",
                          "give the folder that holds config.json, the weights and the tokenizer")
    return ModelFolder(tuple(sorted(found, key=lambda item: item[0].encode())))


def _regular_files(folder: Path, where: str, name: str) -> list[tuple[str, int]]:
    found: list[tuple[str, int]] = []
    for root, dirs, names in os.walk(folder, followlinks=False, onerror=_raise):
        for entry in sorted(dirs + names):
            path = Path(root) / entry
            relative = path.relative_to(folder).as_posix()
            if any(c in relative for c in "\\\n\r") or not relative.isprintable():
                raise RecipeError(f"{where}: {relative!r} in {name} has a control character or backslash in its "
                                  "name", "rename the file (sha256sum would escape its name)")
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                raise RecipeError(f"{where}: {relative} in {name} is a symbolic link (to {os.readlink(path)})",
                                  "copy the model without links: cp -rL SRC DEST (Hugging Face cache snapshots "
                                  "are links into blobs/)")
            if stat.S_ISREG(info.st_mode):
                found.append((relative, info.st_size))
            elif not stat.S_ISDIR(info.st_mode):
                raise RecipeError(f"{where}: {relative} in {name} is not a regular file or folder",
                                  "remove it from the model folder")
    return found


def _raise(exc: OSError) -> None:
    raise exc


def folder_hash(folder: Path, where: str, shown: str | None = None) -> str:
    """The folder's content hash (see the module docstring)."""
    return hash_lines([(relative, sha256_file(folder / relative)) for relative, _ in scan(folder, where, shown).files])


def hash_lines(files: list[tuple[str, str]]) -> str:
    """The content hash from each file's (relative path, hex sha256); the order is the hash's own."""
    lines = hashlib.sha256()
    for relative, sha in sorted(files, key=lambda item: item[0].encode()):
        lines.update(f"{sha}  {relative}\n".encode())
    return lines.hexdigest()
