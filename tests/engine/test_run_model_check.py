"""`builder run --model-sha256` with real podman: a model file that is not the one named is refused before any
container is created; the right one goes on to podman, which creates and starts the container.

The image is an empty one the test imports (`podman import` of an empty tar: no registry, no build), so the
container's command (`server …`) is not found in it: podman saying so is the proof that a container was
started, and its absence that none was."""

import hashlib
import secrets
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import require_engine, run_cli

pytestmark = pytest.mark.engine


@pytest.fixture
def empty_image(tmp_path: Path) -> Iterator[str]:
    require_engine("podman")
    archive = tmp_path / "empty.tar"
    with tarfile.open(archive, "w"):
        pass
    ref = f"localhost/builder-test-empty:model-check-{secrets.token_hex(4)}"
    subprocess.run(["podman", "import", "--", str(archive), ref], check=True, capture_output=True, timeout=120)
    try:
        yield ref
    finally:
        subprocess.run(["podman", "rmi", "--force", "--", ref], capture_output=True, timeout=120)


def _events(name: str) -> str:
    """What podman recorded for containers of this name (create, start, …) so far."""
    return subprocess.run(["podman", "events", "--stream=false", "--filter", f"container={name}",
                           "--format", "{{.Status}}"], capture_output=True, text=True, timeout=60).stdout


def test_only_the_named_model_reaches_a_container(empty_image: str, tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + bytes(100))
    right = hashlib.sha256(model.read_bytes()).hexdigest()
    name = f"builder-test-model-check-{secrets.token_hex(4)}"
    base = ("run", "--engine", "podman", "--image", empty_image, "--target", "cpu", "--name", name)
    wrong = run_cli(*base, "--model-sha256", "1" * 64, "server", "-m", str(model))
    assert wrong.returncode == 2, wrong.stderr
    assert wrong.stderr.splitlines()[0] == f"error: --model-sha256: {model} has sha256 {right}, not {'1' * 64}"
    assert "not found" not in wrong.stderr and _events(name).split() == []  # podman never saw the container
    passed = run_cli(*base, "--model-sha256", right, "server", "-m", str(model))
    assert passed.returncode != 0 and "--model-sha256" not in passed.stderr
    assert "server" in passed.stderr and "not found" in passed.stderr, passed.stderr  # the image has no server
    assert "create" in _events(name).split(), _events(name)
