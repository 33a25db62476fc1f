"""Source pins: archives are checked by sha256, git sources resolve to a commit, overrides are found."""

import hashlib
import subprocess
import tarfile
from pathlib import Path

import pytest

from builder.core.errors import SourceError
from builder.fetch.source import find_llama_root, resolve, resolve_override
from builder.recipe.models import ArchiveSource, GitSource


def make_tree(root: Path, marker: str = "1") -> Path:
    (root / "src").mkdir(parents=True)
    (root / "CMakeLists.txt").write_text('project("llama.cpp" C CXX)\n')
    (root / "src" / "llama.cpp").write_text(f"// {marker}\n")
    return root


def make_archive(tmp_path: Path, top: str = "pkg-1.0/vendor/llama.cpp") -> Path:
    make_tree(tmp_path / "stage" / top)
    archive = tmp_path / "src.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "stage" / top.split("/")[0], arcname=top.split("/")[0])
    return archive


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUILDER_CACHE", str(tmp_path / "cache"))


def test_archive_is_checked_and_subdir_found(tmp_path: Path) -> None:
    archive = make_archive(tmp_path)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    tree = resolve(ArchiveSource(kind="archive", url=str(archive), sha256=digest, subdir="vendor/llama.cpp"))
    assert (tree.path / "src" / "llama.cpp").is_file()
    assert tree.info.identity == f"sha256:{digest}"


def test_archive_with_wrong_sha256_is_refused(tmp_path: Path) -> None:
    archive = make_archive(tmp_path)
    with pytest.raises(SourceError, match="sha256 mismatch"):
        resolve(ArchiveSource(kind="archive", url=str(archive), sha256="0" * 64))


def test_git_source_resolves_to_the_commit(tmp_path: Path) -> None:
    repo = make_tree(tmp_path / "repo")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    tree = resolve(GitSource(kind="git", url=f"file://{repo}", ref=commit))
    assert tree.info.identity == f"git:{commit}"
    assert (tree.path / "src" / "llama.cpp").read_text() == "// 1\n"


def test_override_directory_identity_follows_its_content(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "llama")
    first = resolve_override(str(root)).info.identity
    (root / "src" / "llama.cpp").write_text("// changed\n")
    assert resolve_override(str(root)).info.identity != first
    (root / "models").mkdir()
    (root / "models" / "vocab.gguf").write_bytes(b"big")
    second = resolve_override(str(root)).info.identity
    assert resolve_override(str(root)).info.identity == second


def test_override_finds_vendored_tree_and_reports_missing(tmp_path: Path) -> None:
    make_tree(tmp_path / "pkg" / "vendor" / "llama.cpp")
    assert find_llama_root(tmp_path / "pkg") == tmp_path / "pkg" / "vendor" / "llama.cpp"
    with pytest.raises(SourceError, match="no llama.cpp source tree"):
        find_llama_root(make_tree(tmp_path / "other").parent / "pkg" / "vendor" / "llama.cpp" / "src")
    with pytest.raises(SourceError, match="no such file"):
        resolve_override(str(tmp_path / "missing"))
