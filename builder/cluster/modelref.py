"""A service's model, one type wherever a cluster file's model is handled: where it comes from (a path relative
to the cluster file, or an http(s) URL; `hf://` names are refused until builder fetches them) and the sha256
that says what it is (a GGUF's sha256, or a Hugging Face model folder's content hash, hfmodel.py).

On a box builder does not boot the model is named by that sha256 alone (`<sha256>.gguf`, a folder `<sha256>`),
so a file's identity on the box is its content, never its name.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from builder.cluster.hfmodel import folder_hash, scan
from builder.core.digests import sha256_file
from builder.core.errors import RecipeError
from builder.core.types import http_url
from builder.fetch.source import fetch_file

URL_SCHEMES = ("http://", "https://")


@dataclass(frozen=True)
class ModelRef:
    """A GGUF file (folder False) or a Hugging Face model folder (folder True), with its sha256."""

    location: str  # as the cluster file writes it: a path relative to the file, or an http(s) URL
    sha256: str
    folder: bool

    @property
    def is_url(self) -> bool:
        return self.location.startswith(URL_SCHEMES)

    def path(self, base: Path) -> Path | None:
        """The file or folder on this machine (`base`: the cluster file's folder), or None for a URL."""
        return None if self.is_url else base / self.location

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
        if self.location.startswith("hf://"):
            raise RecipeError(f"{where}: {field}: hf:// models are not fetched yet",
                              "download it first (e.g. `hf download NAME --local-dir DIR`) and give DIR" if self.folder
                              else "download the GGUF and give its path, or an http(s) URL")
        if self.folder:
            if "://" in self.location:
                raise RecipeError(f"{where}: {field}: a vLLM service serves a model folder on this machine",
                                  "download it first (e.g. `hf download NAME --local-dir DIR`) and give DIR")
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
