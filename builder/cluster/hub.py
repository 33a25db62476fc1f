"""Models by name from a Hugging Face hub: `hf://ORG/REPO@REVISION/FILE.gguf` (a GGUF) and `hf://ORG/REPO@REVISION`
(a model folder, for vLLM).

Everything goes through huggingface_hub's public API, unmodified: its endpoint (`HF_ENDPOINT`), its token
(`HF_TOKEN` or `hf auth login`; builder never reads, passes or writes one), its cache (`HF_HOME`,
`HF_HUB_CACHE`) and its offline mode (`HF_HUB_OFFLINE`). What a name resolves to is recorded in cluster.lock
(modellock.py): the commit, and every file's path, size and sha256 as the hub's metadata gives them (a Git LFS
file's sha256; a small file that is not in LFS is fetched once and checked against its git blob id). A later
download is checked against that record before and after it is made.
"""

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.cluster.hfmodel import folder_hash
from builder.core.digests import sha256_file
from builder.core.errors import RecipeError
from builder.core.paths import cache_subdir

SCHEME = "hf://"
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_NAME = re.compile(rf"^hf://(?P<org>{_PART})/(?P<repo>{_PART})@(?P<revision>[^/]+)(?:/(?P<file>.+))?$")
_REVISION = re.compile(r"^(?:[0-9a-f]{40}|[A-Za-z0-9](?:[A-Za-z0-9._-]{0,126}[A-Za-z0-9])?)$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_FILE_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,199}$")
FORM = "hf://ORG/REPO@REVISION/FILE.gguf (llama.cpp) or hf://ORG/REPO@REVISION (vllm)"


@dataclass(frozen=True)
class HubName:
    """A checked `hf://` name: repository, revision (branch, tag or commit) and, for a GGUF, the file."""

    repo_id: str
    revision: str
    file: str | None

    @property
    def text(self) -> str:
        return f"{SCHEME}{self.repo_id}@{self.revision}" + (f"/{self.file}" if self.file else "")


@dataclass(frozen=True)
class HubFile:
    path: str  # relative to the repository, `/`-separated
    size: int
    sha256: str


def is_hub(location: str) -> bool:
    return location.startswith(SCHEME)


def valid_file(path: str) -> bool:
    """A relative path in a repository that is safe as a path on this machine and in sha256sum's output."""
    parts = path.split("/")
    return all(_FILE_PART.fullmatch(part) and part not in (".", "..") for part in parts) and len(parts) <= 16


def parse(location: str, folder: bool, where: str, field: str) -> HubName:
    """The name in `location`, or one line naming `where` and `field`: ORG and REPO in the hub's characters,
    REVISION a branch, tag or 40-hex commit, FILE a relative path (a `.gguf` for llama.cpp; none for vllm)."""
    found = _NAME.fullmatch(location)
    if not found or "--" in found["org"] + found["repo"] or ".." in found["org"] + found["repo"]:
        raise RecipeError(f"{where}: {field}: {location!r} is not a Hugging Face model name",
                          f"write {FORM}, e.g. hf://ggml-org/models@main/tinyllamas/stories260K.gguf")
    if not _REVISION.fullmatch(found["revision"]) or ".." in found["revision"]:
        raise RecipeError(f"{where}: {field}: {found['revision']!r} is not a branch, tag or commit",
                          "give a branch or tag (letters, digits, . _ -) or a 40-hex commit after @")
    file = found["file"]
    if folder and file is not None:
        raise RecipeError(f"{where}: {field}: a vLLM service serves the whole repository, not one file",
                          f"write hf://{found['org']}/{found['repo']}@{found['revision']}")
    if not folder:
        if file is None:
            raise RecipeError(f"{where}: {field}: name the GGUF file in the repository",
                              f"write hf://{found['org']}/{found['repo']}@{found['revision']}/FILE.gguf")
        if not valid_file(file) or not file.endswith(".gguf"):
            raise RecipeError(f"{where}: {field}: {file!r} is not a .gguf file's path in the repository",
                              "give a relative path ending in .gguf (letters, digits, . _ + - and /, no ..)")
    return HubName(f"{found['org']}/{found['repo']}", found["revision"], file)


def _hub() -> Any:
    """huggingface_hub, imported when a hub name is used (it reads its environment when imported)."""
    import huggingface_hub

    return huggingface_hub


def _problem(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _errors() -> tuple[type[Exception], ...]:
    hub = _hub()
    import httpx2

    return (hub.errors.HfHubHTTPError, hub.errors.LocalEntryNotFoundError, hub.errors.OfflineModeIsEnabled,
            httpx2.HTTPError, OSError, ValueError)


def _git_blob_id(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve(name: HubName, where: str, say: Callable[[str], None]) -> tuple[str, tuple[HubFile, ...]]:
    """The commit `name` resolves to now and its files (one for a GGUF, every file for a folder), each with its
    size and sha256 from the hub's metadata; one line naming `where` for anything the hub does not answer."""
    hub = _hub()
    say(f"resolving {name.text} …")
    try:
        info = hub.HfApi().model_info(name.repo_id, revision=name.revision, files_metadata=True)
    except _errors() as exc:
        raise RecipeError(f"{where}: {name.text}: the hub did not answer: {_problem(exc)}",
                          "check the name and revision, HF_ENDPOINT and your token (`hf auth login`)") from None
    commit = info.sha
    if not isinstance(commit, str) or not _COMMIT.fullmatch(commit):
        raise RecipeError(f"{where}: {name.text}: the hub gave no commit for revision {name.revision}",
                          "check HF_ENDPOINT: it must answer as the Hugging Face hub does")
    siblings = {s.rfilename: s for s in info.siblings or []}
    wanted = [name.file] if name.file else sorted(siblings)
    if name.file and name.file not in siblings:
        raise RecipeError(f"{where}: {name.text}: no file {name.file} in {name.repo_id} at {name.revision}",
                          "check the file's path in the repository's file list")
    if not name.file and "config.json" not in siblings:
        raise RecipeError(f"{where}: {name.text}: {name.repo_id} has no config.json: not a model folder",
                          "a vLLM service serves a Hugging Face model repository (config.json, weights, tokenizer)")
    files = []
    for path in wanted:
        sibling = siblings[path]
        if not valid_file(path):
            raise RecipeError(f"{where}: {name.text}: the repository holds {path[:80]!r}, a name builder does not "
                              "write to disk", "use a repository whose file names are plain relative paths")
        if sibling.lfs is not None:
            files.append(HubFile(path, int(sibling.lfs.size), str(sibling.lfs.sha256)))
            continue
        # Not in Git LFS: the hub gives its git blob id, not a sha256. Fetch it (a small file) and check that.
        local = _download(name, commit, path, where)
        if sibling.blob_id is None or _git_blob_id(local) != sibling.blob_id:
            raise RecipeError(f"{where}: {name.text}: {path} does not match the git blob id the hub gives",
                              "try again; if it persists, the hub or HF_ENDPOINT serves inconsistent data")
        files.append(HubFile(path, local.stat().st_size, sha256_file(local)))
    for file in files:
        if not re.fullmatch(r"[0-9a-f]{64}", file.sha256) or file.size < 0:
            raise RecipeError(f"{where}: {name.text}: the hub's metadata for {file.path} has no sha256",
                              "check HF_ENDPOINT: it must answer as the Hugging Face hub does")
    return commit, tuple(files)


def _download(name: HubName, commit: str, path: str, where: str) -> Path:
    hub = _hub()
    try:
        return Path(hub.hf_hub_download(name.repo_id, path, revision=commit))
    except _errors() as exc:
        raise RecipeError(f"{where}: {name.text}: downloading {path} failed: {_problem(exc)}",
                          "check HF_ENDPOINT, your token (`hf auth login`) and the disk space of HF_HOME") from None


def _check_before(name: HubName, commit: str, file: HubFile, where: str) -> None:
    """What the hub says about the file now (size, and an LFS file's sha256 as its ETag) against the lock: a
    disagreement is refused before a byte is downloaded."""
    hub = _hub()
    try:
        meta = hub.get_hf_file_metadata(hub.hf_hub_url(name.repo_id, file.path, revision=commit))
    except _errors() as exc:
        raise RecipeError(f"{where}: {name.text}: the hub did not answer for {file.path}: {_problem(exc)}",
                          "check HF_ENDPOINT and your token (`hf auth login`)") from None
    etag = meta.etag or ""
    if meta.size != file.size or (len(etag) == 64 and etag != file.sha256):
        raise RecipeError(f"{where}: {name.text}: the hub now serves {file.path} with size {meta.size} and etag "
                          f"{etag[:64]}; cluster.lock says size {file.size}, sha256 {file.sha256}",
                          "the repository changed under its commit or HF_ENDPOINT serves another one: nothing was "
                          "downloaded; check the source, then run `builder lock FILE` again if you trust it")


def fetch(name: HubName, commit: str, files: tuple[HubFile, ...], where: str,
          say: Callable[[str], None]) -> list[Path]:
    """Each locked file in huggingface_hub's cache (downloaded at the locked commit if missing), checked against
    its size and sha256; a download that disagrees is refused and removed from the cache again."""
    out = []
    for file in files:
        found = _hub().try_to_load_from_cache(name.repo_id, file.path, revision=commit)
        path = Path(found) if isinstance(found, str) else None
        fresh = path is None
        if path is None:
            _check_before(name, commit, file, where)
            say(f"downloading {name.repo_id}/{file.path} at {commit[:12]} …")
            path = _download(name, commit, file.path, where)
        size = path.stat().st_size
        actual = sha256_file(path) if size == file.size else "(not hashed)"
        if size != file.size or actual != file.sha256:
            shown = path.resolve()
            if fresh:  # what huggingface_hub just wrote and builder refuses: never left for a later run
                shown.unlink(missing_ok=True)
                path.unlink(missing_ok=True)
            raise RecipeError(f"{where}: {name.text}: {file.path} has size {size}, sha256 {actual}; cluster.lock "
                              f"says size {file.size}, sha256 {file.sha256}",
                              "the download was removed; check the source, then run `builder lock FILE` again "
                              "if you trust it" if fresh else
                              f"the copy in huggingface_hub's cache ({shown}) changed: delete it and run again")
        out.append(path)
    return out


def folder_of(files: tuple[HubFile, ...], paths: list[Path], content_hash: str, where: str) -> Path:
    """A model folder of regular files (what a container mounts read-only; the cache's snapshot is links into
    blobs/), under builder's cache by its content hash: hard links to the checked blobs (copies across file
    systems), made in a scratch folder and renamed into place whole."""
    root = cache_subdir("models/hf")
    final = root / content_hash
    if final.is_dir():
        if folder_hash(final, where) == content_hash:
            return final
        shutil.rmtree(final)  # a file in builder's copy changed: made again from the checked blobs
    scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
    try:
        for file, path in zip(files, paths, strict=True):
            target = scratch / file.path
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path.resolve(), target)
            except OSError:
                shutil.copyfile(path.resolve(), target)
        os.replace(scratch, final)
    except OSError as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        if final.is_dir():  # another run made it first
            return final
        raise RecipeError(f"{where}: cannot make the model folder under {root}: {exc.strerror}",
                          "check the free space and permissions of builder's cache") from None
    return final
