"""A service's model, one type wherever a cluster file's model is handled: where it comes from (a path relative
to the cluster file, an http(s) URL, or a Hugging Face name `hf://ORG/REPO@REVISION[/FILE.gguf]` locked in
cluster.lock: hub.py, modellock.py) and the sha256 that says what it is (a GGUF's sha256, or a Hugging Face model
folder's content hash, hfmodel.py).

On a box builder does not boot the model is named by that sha256 alone (`<sha256>.gguf`, a folder `<sha256>`),
so a file's identity on the box is its content, never its name.
"""

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from builder.cluster import hub, modellock
from builder.cluster.hfmodel import folder_hash, scan
from builder.core.digests import sha256_file
from builder.core.errors import RecipeError
from builder.core.types import http_url
from builder.fetch.source import fetch_file

URL_SCHEMES = ("http://", "https://")


@dataclass(frozen=True)
class ModelRef:
    """A GGUF file (folder False) or a Hugging Face model folder (folder True), with its sha256."""

    location: str  # as the cluster file writes it: a path relative to the file, an http(s) URL or an hf:// name
    sha256: str  # "" for an hf:// name until the lock gives it (locked_sha256)
    folder: bool

    @property
    def is_url(self) -> bool:
        return self.location.startswith(URL_SCHEMES)

    @property
    def is_hub(self) -> bool:
        return hub.is_hub(self.location)

    def path(self, base: Path) -> Path | None:
        """The file or folder on this machine (`base`: the cluster file's folder), or None for a URL or hf:// name."""
        return None if self.is_url or self.is_hub else base / self.location

    def locked(self, base: Path, where: str, field: str) -> modellock.LockedModel:
        """An hf:// model's entry in the cluster.lock in `base` (the cluster file's folder); one line naming
        `builder lock` when there is none."""
        hub.parse(self.location, self.folder, where, f"{field}.model")
        return modellock.entry(base, self.location, where, f"{field}.model")

    def download_line(self, base: Path, where: str, field: str) -> str | None:
        """For an hf:// model, the `hf download` command that fetches the locked commit (for boxes builder does
        not boot); None otherwise."""
        if not self.is_hub:
            return None
        name = hub.parse(self.location, self.folder, where, f"{field}.model")
        commit = self.locked(base, where, field).commit
        return shlex.join(["hf", "download", name.repo_id, *([name.file] if name.file else []), "--revision", commit])

    def locked_sha256(self, base: Path, where: str, field: str) -> str:
        """The sha256 the service serves: its own, or for an hf:// name the lock's (which an own sha256, when
        given, must equal)."""
        if not self.is_hub:
            if not self.sha256 and self.location:  # no model at all: a split's workers, its head outside the file
                raise RecipeError(f"{where}: {field}.sha256: a model given by path or URL needs its sha256",
                                  "sha256: the GGUF's sha256sum, or `builder cluster hash-model DIR` for a folder")
            return self.sha256
        locked = self.locked(base, where, field).sha256
        if self.sha256 and self.sha256 != locked:
            raise RecipeError(f"{where}: {field}.sha256: {self.sha256} but {modellock.LOCK_NAME} locked "
                              f"{self.location} as {locked}",
                              "remove sha256: (the lock carries it), or run `builder lock FILE` again if the model "
                              "should change")
        return locked

    @property
    def box_name(self) -> str:
        """Its name on a box builder does not boot: its sha256, with `.gguf` for a GGUF."""
        return self.sha256 if self.folder else f"{self.sha256}.gguf"

    def on_box(self, models: str) -> str:
        """Its path on such a box, under the folder `models` where the box keeps its models."""
        return f"{models.rstrip('/')}/{self.box_name}"

    def check(self, base: Path, where: str, field: str) -> None:
        """What a cluster file may give: a GGUF by path or http(s) URL, a model folder by path (that exists and
        holds only regular files). One line naming `where` and `field` otherwise."""
        if self.is_hub:
            hub.parse(self.location, self.folder, where, field)
            return
        if self.folder:
            if "://" in self.location:
                raise RecipeError(f"{where}: {field}: a vLLM service serves a model folder on this machine or "
                                  "a Hugging Face name", f"give its path, or {hub.FORM}")
            scan(base / self.location, f"{where}: {field}", self.location)
            return
        if self.is_url:
            try:
                http_url(self.location)
            except ValueError as exc:
                raise RecipeError(f"{where}: {field}: {exc}", "give a plain http(s) URL to the GGUF") from None
        elif "://" in self.location:
            raise RecipeError(f"{where}: {field}: only http:// and https:// URLs are fetched",
                              "give a path to the GGUF or an http(s) URL")
        elif not (base / self.location).is_file():
            raise RecipeError(f"{where}: {field}: {self.location} is not a file",
                              f"give the GGUF's path relative to {where}, or an http(s) URL")

    def local(self, base: Path, where: str, field: str, say: Callable[[str], None]) -> Path:
        """The file or folder on this machine (a URL fetched into the cache), checked against the sha256; `field`
        is the service's (`services[0]`), whose `.model` or `.sha256` a refusal names."""
        if self.is_hub:
            return self._from_hub(base, where, field, say)
        path = self.path(base)
        if path is None:
            say(f"fetching {self.location} …")
            return fetch_file(self.location, self.sha256)
        if self.folder:
            say(f"hashing {self.location} …")
            actual = folder_hash(path, f"{where}: {field}.model", self.location)
            if actual != self.sha256:
                raise RecipeError(f"{where}: {field}.sha256: the folder {self.location} hashes to {actual}",
                                  "a file changed or the sha256 is wrong: check which, then fix it "
                                  "(`builder cluster hash-model DIR` prints a folder's hash)")
            return path.resolve()
        actual = sha256_file(path)
        if actual != self.sha256:
            raise RecipeError(f"{where}: {field}.sha256: {self.location} has sha256 {actual}",
                              "the file changed or the sha256 in the cluster file is wrong: check which")
        return path.resolve()

    def _from_hub(self, base: Path, where: str, field: str, say: Callable[[str], None]) -> Path:
        """An hf:// model from huggingface_hub's cache (downloaded at the locked commit when missing), every file
        checked against cluster.lock: the GGUF itself, or a folder of regular files made from the checked files."""
        name = hub.parse(self.location, self.folder, where, f"{field}.model")
        locked = self.locked(base, where, field)
        if self.sha256 != locked.sha256:  # load_cluster filled it from the lock; a stale copy is refused
            raise RecipeError(f"{where}: {field}.sha256: {self.location} is locked as {locked.sha256}",
                              "run the command again (cluster.lock changed while it ran)")
        files = locked.hub_files
        paths = hub.fetch(name, locked.commit, files, where, say)
        if not self.folder:
            return paths[0].resolve()
        return hub.folder_of(files, paths, locked.sha256, where)
