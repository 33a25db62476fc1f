"""`plan` and `targets` name the llama.cpp commit and the ggml RPC protocol, from what the source records."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from builder.cli.main import app
from builder.fetch.provenance import llama_commit, pin_line, rpc_protocol
from builder.pipeline.flavour import Prepared
from builder.recipe.models import PypiSource, SourceInfo

COMMIT = "ce8784bdb153ff7794dde5a50b0ebfa51baa6171"
CHANGELOG = f"""# Changelog

## [Unreleased]

## [0.3.6]

- feat: update llama.cpp to ggml-org/llama.cpp@0c1e57098

## [0.3.5]

- fix: something

## [0.3.4]

- feat: Update llama.cpp to ggml-org/llama.cpp@{COMMIT}
- fix: other

## [0.3.3]

- feat: Update llama.cpp to ggerganov/llama.cpp@74d73dc85cc2057446bf63cc37ff649ae7cebd80
"""


def llama_tree(root: Path, protocol: tuple[int, int, int] | None = (7, 0, 1)) -> Path:
    (root / "ggml" / "include").mkdir(parents=True)
    (root / "CMakeLists.txt").write_text('project("llama.cpp" C CXX)\n')
    if protocol:
        (root / "ggml" / "include" / "ggml-rpc.h").write_text(
            "".join(f"#define RPC_PROTO_{part}_VERSION    {n}\n"
                    for part, n in zip(("MAJOR", "MINOR", "PATCH"), protocol, strict=True)))
    return root


def sdist(folder: Path) -> Path:
    (folder / "llama_cpp_python-0.3.5").mkdir(parents=True)
    (folder / "llama_cpp_python-0.3.5" / "CHANGELOG.md").write_text(CHANGELOG)
    return llama_tree(folder / "llama_cpp_python-0.3.5" / "vendor" / "llama.cpp")


def info(version: str, locator: str = "pypi:llama-cpp-python==") -> SourceInfo:
    return SourceInfo(locator=f"{locator}{version}#vendor/llama.cpp", identity="sha256:" + "1" * 64,
                      version=version, epoch=0)


def test_the_sdists_changelog_names_the_commit_of_its_release_or_the_last_update_before(tmp_path: Path) -> None:
    root = sdist(tmp_path)
    assert llama_commit(info("0.3.4"), root) == COMMIT
    assert llama_commit(info("0.3.5"), root) == COMMIT  # no update in 0.3.5: the tree 0.3.4 vendored
    assert llama_commit(info("0.3.6"), root) == "0c1e57098"  # newer releases write it so
    assert llama_commit(info("0.3.3"), root) == "74d73dc85cc2057446bf63cc37ff649ae7cebd80"
    assert llama_commit(info("9.9.9"), root) is None  # a release the CHANGELOG does not list: nothing made up
    assert llama_commit(info("0.3.4", "https://example.invalid/x-"), root) is None  # an archive records none
    git = SourceInfo(locator="https://x@main", identity=f"git:{COMMIT}", version="main", epoch=0)
    assert llama_commit(git, root) == COMMIT


def test_rpc_protocol_is_read_from_the_header_or_said_missing(tmp_path: Path) -> None:
    assert rpc_protocol(llama_tree(tmp_path / "a", (7, 0, 1))) == "7.0.1"
    assert rpc_protocol(llama_tree(tmp_path / "b", None)) is None


def test_plan_shows_the_commit_and_the_protocol_and_never_a_build_number(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUILDER_CACHE", str(tmp_path / "cache"))
    tree = llama_tree(tmp_path / "tree")
    text = CliRunner().invoke(app, ["plan", "--target", "cpu", "--llama-cpp-source", str(tree)])
    assert text.exit_code == 0, text.stderr
    lines = {line.split()[0]: line.split(None, 1)[1] for line in text.stdout.splitlines()}
    assert lines["commit"] == "not recorded by this source" and lines["rpc"].startswith("ggml RPC protocol 7.0.1")
    assert "build number" not in text.stdout.lower()
    doc = json.loads(CliRunner().invoke(app, ["plan", "--target", "cpu", "--llama-cpp-source", str(tree),
                                              "--json"]).stdout)
    assert doc["ggml_rpc_protocol"] == "7.0.1" and doc["llama_cpp_commit"] is None
    # the image carries what the source records, and no label for what it does not
    assert doc["labels"]["dev.builder.ggml-rpc.protocol"] == "7.0.1"
    assert "dev.builder.llama-cpp.commit" not in doc["labels"]


def test_the_shipped_pins_image_labels_name_its_commit_and_protocol(cpu_prepared: Prepared) -> None:
    labels = cpu_prepared.plan.labels
    assert labels["dev.builder.llama-cpp.commit"] == llama_commit(cpu_prepared.tree.info, cpu_prepared.tree.path)
    assert labels["dev.builder.ggml-rpc.protocol"] == rpc_protocol(cpu_prepared.tree.path)
    assert len(labels["dev.builder.llama-cpp.commit"]) >= 7


def test_targets_names_the_shared_pin_from_the_cache_without_fetching(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUILDER_CACHE", str(tmp_path / "cache"))
    spec = PypiSource(kind="pypi", package="llama-cpp-python", version="0.3.4", sha256="2" * 64,
                      subdir="vendor/llama.cpp")
    assert "`builder plan --target cpu` (fetches the source)" in pin_line(spec, "recipes/llama-cpp.yaml")
    sdist(tmp_path / "cache" / "sources" / "trees" / spec.sha256)
    line = pin_line(spec, "recipes/llama-cpp.yaml")
    assert line == f"llama.cpp (recipes/llama-cpp.yaml): llama-cpp-python 0.3.4, commit {COMMIT}, ggml RPC " \
                   "protocol 7.0.1"
    shown = CliRunner().invoke(app, ["targets"]).stdout.split("\n\n")
    assert shown[-1].startswith("llama.cpp (recipes/llama-cpp.yaml): llama-cpp-python ")
