"""Shared fixtures: the CLI as a real process, the pinned llama.cpp source, a tiny model, engines."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from builder.engines import ENGINES
from builder.flavours.prepare import prepare
from builder.pipeline.build import Prepared
from builder.recipe.load import recipe_path_for

ROOT = Path(__file__).resolve().parent.parent
# The support modules (tests/support) and each test folder, whose modules import one another by name.
for _folder in ("support", "unit", "engine", "qemu"):
    sys.path.insert(0, str(Path(__file__).resolve().parent / _folder))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tinymodel import make_tiny_model  # noqa: E402

pytest_plugins = ["timing", "vllm_fixtures"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/data/golden from the renderer")


def run_cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None,
            cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """`builder ARGS` as a user runs it: a separate process, its exit code and both streams."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "builder", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd)


@contextmanager
def local_cluster(folder: Path, data: dict[str, object], engine: str,
                  timeout: float) -> Iterator[tuple[Path, str, str]]:
    """`builder cluster up --local` on a cluster file made of `data` in `folder`, and `down` afterwards.
    Yields the file, what `up` printed and the gateway's key (read from the file `up` names)."""
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = run_cli("cluster", "up", "--local", str(path), "--engine", engine, timeout=timeout)
    try:
        assert proc.returncode == 0, proc.stderr[-4000:]
        key_file = Path(re.search(r"^key\s+(\S+)", proc.stdout, re.M).group(1))  # type: ignore[union-attr]
        yield path, proc.stdout, key_file.read_text().strip()
    finally:
        down = run_cli("cluster", "down", "--local", str(path), timeout=300)
        assert down.returncode == 0, down.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require(missing: str | None) -> None:
    """A tool the real path needs: .ci/run installs it, so its absence fails in CI and skips elsewhere."""
    if missing is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"must work in CI: {missing}")
    pytest.skip(missing)


def require_tool(command: str, package: str) -> None:
    require(None if shutil.which(command) else f"{command} is not installed (apt-get install {package})")


def require_engine(name: str) -> None:
    reason = ENGINES[name]().available()
    require(None if reason is None else f"{name} is not usable on this machine: {reason}")


@pytest.fixture(scope="session")
def goldens_written(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
    """With --update-golden: every image rendered and tests/data/golden rewritten (tests/data/goldens.py), once."""
    if request.config.getoption("--update-golden"):
        import goldens

        out = tmp_path_factory.mktemp("render")
        goldens.update({image: image.render(out / f"{image.flavour}-{image.target}-{image.variant}")
                        for image in goldens.images()})


@pytest.fixture(scope="session")
def cpu_prepared() -> Prepared:
    """The cpu recipe resolved with its pinned source (fetched once into the builder cache)."""
    return prepare(recipe_path_for("cpu"))


@pytest.fixture(scope="session")
def llama_cpu_image() -> str:
    """The cpu image, built with podman once per run with a build's time limit, before tests that start it with
    short limits of their own: on a fresh machine this first build bootstraps both bases and compiles."""
    require_engine("podman")
    proc = run_cli("build", "--target", "cpu", "--engine", "podman", "--json", timeout=5400)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return str(json.loads(proc.stdout)["image"])


@pytest.fixture(scope="session")
def tiny_model(cpu_prepared: Prepared, tmp_path_factory: pytest.TempPathFactory) -> Path:
    vocab = cpu_prepared.tree.path / "models" / "ggml-vocab-llama-spm.gguf"
    return make_tiny_model(vocab, tmp_path_factory.mktemp("model") / "tiny.gguf")


@pytest.fixture
def engine_cli() -> str:
    return shutil.which("podman") or shutil.which("docker") or "podman"
