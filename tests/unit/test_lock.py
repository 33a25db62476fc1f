"""builder.lock, credentials lookup and the SBOM parser: quick, no engine, no network."""

import base64
import json
import shutil
from pathlib import Path

import pytest

from builder.registry.client import Repository, find_credentials
from conftest import ROOT, run_cli_inproc


def test_the_shipped_lock_matches_the_recipes() -> None:
    proc = run_cli_inproc("lock", "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def recipes(tmp_path: Path) -> Path:
    copy = tmp_path / "recipes"
    shutil.copytree(ROOT / "recipes", copy)
    # The shipped lock's base package sets are kept (same inputs), so nothing is resolved from the network.
    shutil.copy(ROOT / "builder.lock", tmp_path / "builder.lock")
    assert run_cli_inproc("lock", "--lock", str(tmp_path / "builder.lock"), "--recipes", str(copy)).returncode == 0
    return copy


def test_check_lists_every_disagreement(recipes: Path, tmp_path: Path) -> None:
    pin = recipes / "llama-cpp.yaml"
    pin.write_text(pin.read_text().replace("832db0699007f1be", "0000000000000000"))
    cpu = recipes / "cpu.yaml"
    cpu.write_text(cpu.read_text().replace("packages: [libgomp1]", "packages: [libgomp1, curl]"))
    proc = run_cli_inproc("lock", "--check", "--lock", str(tmp_path / "builder.lock"), "--recipes", str(recipes))
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    # The shared llama.cpp pin moved for every image that uses it, and one base gained a package.
    images = len(json.loads((tmp_path / "builder.lock").read_text())["images"])
    assert sum("llama_cpp.source.sha256: lock has \"832db069" in line for line in lines) == images
    expected = 'builder.lock: cpu/cpu: base.runtime.packages: lock has ["libgomp1"], recipes have ["curl", "libgomp1"]'
    assert [line for line in lines if line.endswith(expected)]
    # The runtime base with curl is another base, which has no locked package set yet; the old one is unused.
    assert [line for line in lines if ": bases.trixie-" in line and line.endswith(
        "not in the lock (the trixie base of cpu/cpu runtime)")]
    assert [line for line in lines if ": bases.trixie-" in line and line.endswith("but no recipe uses it")]
    assert len(lines) == images + 3


def test_new_and_removed_images_are_reported(recipes: Path, tmp_path: Path) -> None:
    (recipes / "intel-arc.yaml").unlink()
    proc = run_cli_inproc("lock", "--check", "--lock", str(tmp_path / "builder.lock"), "--recipes", str(recipes))
    assert proc.returncode == 1
    assert proc.stdout.strip().endswith("intel-arc/vulkan: in the lock, but no recipe builds it")


def test_build_and_publish_refuse_inputs_that_disagree_with_the_lock(tmp_path: Path) -> None:
    lock = json.loads((ROOT / "builder.lock").read_text())
    lock["images"]["cpu/cpu"]["base"]["runtime"]["packages"] = ["curl", "libgomp1"]
    stale = tmp_path / "builder.lock"
    stale.write_text(json.dumps(lock))
    for verb in (["build", "--engine", "podman"], ["publish", "--registry", "127.0.0.1:9/x"]):
        proc = run_cli_inproc(*verb, "--target", "cpu", "--lock", str(stale))
        assert proc.returncode == 2, proc.stderr
        assert 'cpu/cpu: base.runtime.packages: lock has ["curl", "libgomp1"], recipes have ["libgomp1"]' \
            in proc.stderr and "builder lock" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_publish_needs_a_lock_entry_even_for_a_recipe_file_of_ones_own(tmp_path: Path) -> None:
    recipe = tmp_path / "cpu.yaml"
    recipe.write_text((ROOT / "recipes" / "cpu.yaml").read_text().replace("libgomp1", "libgomp1, curl"))
    proc = run_cli_inproc("publish", "--recipe", str(recipe), "--registry", "127.0.0.1:9/x")
    assert proc.returncode == 2 and "cpu/cpu: base.runtime.packages" in proc.stderr
    empty = tmp_path / "empty.lock"
    empty.write_text(json.dumps({"version": 1, "images": {}}))
    proc = run_cli_inproc("publish", "--target", "cpu", "--registry", "127.0.0.1:9/x", "--lock", str(empty))
    assert proc.returncode == 2 and "cpu/cpu: not in the lock; publishing needs locked inputs" in proc.stderr


def test_credentials_come_from_the_standard_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    repo = Repository.parse("ghcr.io/owner/builder")
    assert find_credentials(repo) is None
    (tmp_path / "docker").mkdir()
    token = base64.b64encode(b"dock:er-secret").decode()
    (tmp_path / "docker" / "config.json").write_text(json.dumps({"auths": {"https://ghcr.io": {"auth": token}}}))
    assert find_credentials(repo)[:2] == ("dock", "er-secret")  # type: ignore[index]
    # podman's file comes first, and a namespace entry beats the host entry.
    (tmp_path / "config" / "containers").mkdir(parents=True)
    entries = {"ghcr.io": {"auth": base64.b64encode(b"host:h").decode()},
               "ghcr.io/owner": {"auth": base64.b64encode(b"owner:o").decode()}}
    (tmp_path / "config" / "containers" / "auth.json").write_text(json.dumps({"auths": entries}))
    assert find_credentials(repo)[:2] == ("owner", "o")  # type: ignore[index]
    assert find_credentials(Repository.parse("ghcr.io/other/x"))[:2] == ("host", "h")  # type: ignore[index]


def test_registry_option_must_name_a_host_and_a_valid_repository() -> None:
    proc = run_cli_inproc("publish", "--target", "cpu", "--registry", "builder")
    assert proc.returncode == 2 and "expected HOST/REPOSITORY" in proc.stderr
    proc = run_cli_inproc("publish", "--target", "cpu", "--registry", "ghcr.io/Owner/Builder")
    assert proc.returncode == 2 and "not a valid repository name" in proc.stderr
    assert Repository.parse("127.0.0.1:5000/x").plain_http and not Repository.parse("ghcr.io/x").plain_http
