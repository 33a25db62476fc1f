"""Netboot sets pushed to and pulled from a real registry (docker-registry on 127.0.0.1), no engine needed."""

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry import Registry, start_registry

from builder.publish.artifacts import NETBOOT_FILES, NETBOOT_TYPE, push_artifact
from builder.registry.client import RegistryClient, Repository
from conftest import run_cli_inproc

IMAGE_DIGEST = "sha256:" + "ab" * 32


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with start_registry(tmp_path / "registry") as reg:
        yield reg


def netboot_set(folder: Path, seed: int, *, squashfs_size: int = 3 << 20) -> Path:
    """A folder of the shape `builder pxe build` writes, with random payloads."""
    folder.mkdir(parents=True)
    rng = __import__("random").Random(seed)
    payload = {"vmlinuz": 200_000, "initrd.img": 500_000, "root.squashfs": squashfs_size}
    files = {}
    for name, size in payload.items():
        data = rng.randbytes(size)
        (folder / name).write_bytes(data)
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": size}
    manifest = {"schema": 1, "target": "cpu", "variant": "cpu", "image": "localhost/builder/cpu:cpu-0123456789abcdef",
                "image_digest": IMAGE_DIGEST, "kernel_version": "6.1.0-test", "files": files}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (folder / "SHA256SUMS").write_text("".join(f"{f['sha256']}  {n}\n" for n, f in files.items()))
    return folder


def test_push_then_pull_places_identical_files_and_switches_the_link(registry: Registry, tmp_path: Path) -> None:
    first = netboot_set(tmp_path / "nb1", seed=1)
    proc = run_cli_inproc("pxe", "push", "--dir", str(first), "--registry", f"{registry.host}/netboot")
    assert proc.returncode == 0, proc.stderr
    assert f"{registry.host}/netboot:netboot-cpu-cpu-{'ab' * 8}" in proc.stdout
    digest = proc.stdout.split("@", 1)[1].split()[0]
    assert registry.digest("netboot", "netboot-cpu-cpu") == digest

    dest = tmp_path / "pxe-root"
    pulled = run_cli_inproc("pxe", "pull", f"{registry.host}/netboot:netboot-cpu-cpu", "--dest", str(dest))
    assert pulled.returncode == 0, pulled.stderr
    current = dest / "cpu-cpu"
    assert current.is_symlink()
    for name in NETBOOT_FILES:
        assert (current / name).read_bytes() == (first / name).read_bytes()

    # A new set under the same floating tag: the link moves, the old generation is still whole.
    old_generation = current.resolve()
    second = netboot_set(tmp_path / "nb2", seed=2)
    assert run_cli_inproc("pxe", "push", "--dir", str(second), "--registry", f"{registry.host}/netboot").returncode == 0
    assert run_cli_inproc("pxe", "pull", f"{registry.host}/netboot:netboot-cpu-cpu",
                          "--dest", str(dest)).returncode == 0
    assert current.resolve() != old_generation
    assert (current / "root.squashfs").read_bytes() == (second / "root.squashfs").read_bytes()
    assert (old_generation / "root.squashfs").read_bytes() == (first / "root.squashfs").read_bytes()

    # The control node boots nodes from the pulled set without building anything itself.
    inventory = tmp_path / "cluster.yaml"
    inventory.write_text("control: {address: 10.0.2.2}\n"
                         "nodes: [{name: n1, mac: '52:54:00:12:34:56', target: cpu, role: rpc-worker}]\n")
    root = tmp_path / "boot-root"
    proc = run_cli_inproc("pxe", "publish", str(inventory), "--root", str(root), "--artifacts", str(dest))
    assert proc.returncode == 0, proc.stderr
    squash = hashlib.sha256((second / "root.squashfs").read_bytes()).hexdigest()
    assert f"builder.sha256={squash}" in (root / "current" / "nodes" / "52-54-00-12-34-56.ipxe").read_text()
    assert (root / "blobs" / "sha256" / squash).read_bytes() == (second / "root.squashfs").read_bytes()


def test_artifact_carries_media_types_and_the_image_digest(registry: Registry, tmp_path: Path) -> None:
    folder = netboot_set(tmp_path / "nb", seed=3)
    assert run_cli_inproc("pxe", "push", "--dir", str(folder), "--registry", f"{registry.host}/netboot").returncode == 0
    client = RegistryClient(Repository.parse(f"{registry.host}/netboot"))
    manifest = json.loads(client.get_manifest("netboot-cpu-cpu")[0])
    assert manifest["artifactType"] == NETBOOT_TYPE
    assert manifest["annotations"]["dev.builder.image.digest"] == IMAGE_DIGEST
    kinds = {layer["annotations"]["org.opencontainers.image.title"]: layer["mediaType"] for layer in manifest["layers"]}
    assert kinds == NETBOOT_FILES


def test_a_damaged_set_is_not_pushed(registry: Registry, tmp_path: Path) -> None:
    folder = netboot_set(tmp_path / "nb", seed=4)
    with open(folder / "root.squashfs", "r+b") as f:
        f.write(b"\0")
    proc = run_cli_inproc("pxe", "push", "--dir", str(folder), "--registry", f"{registry.host}/netboot")
    assert proc.returncode == 1
    assert "root.squashfs: does not match manifest.json" in proc.stderr and "Traceback" not in proc.stderr
    assert registry.tags("netboot") == []


def test_pull_refuses_files_that_disagree_with_the_manifest_and_places_nothing(registry: Registry,
                                                                               tmp_path: Path) -> None:
    # Pushed around builder's own checks, as a tampering registry or a broken producer would.
    folder = netboot_set(tmp_path / "nb", seed=5)
    (folder / "root.squashfs").write_bytes(b"not the squashfs the manifest names")
    client = RegistryClient(Repository.parse(f"{registry.host}/netboot"), push=True)
    files: list[tuple[bytes | Path, str, str]] = [(folder / n, t, n) for n, t in NETBOOT_FILES.items()]
    digest, data = push_artifact(client, NETBOOT_TYPE, files,
                                 annotations={"dev.builder.image.digest": IMAGE_DIGEST})
    client.put_manifest("bad", data, "application/vnd.oci.image.manifest.v1+json")

    dest = tmp_path / "pxe-root"
    proc = run_cli_inproc("pxe", "pull", f"{registry.host}/netboot:bad", "--dest", str(dest))
    assert proc.returncode == 1
    assert "root.squashfs: does not match manifest.json" in proc.stderr and "Traceback" not in proc.stderr
    assert not (dest / "cpu-cpu").exists()
    assert os.listdir(dest / "sets") == []


def test_pull_of_something_else_is_a_clear_error(registry: Registry, tmp_path: Path) -> None:
    proc = run_cli_inproc("pxe", "pull", f"{registry.host}/netboot:missing", "--dest", str(tmp_path / "d"))
    assert proc.returncode == 1 and "has no manifest 'missing'" in proc.stderr
    bad = run_cli_inproc("pxe", "pull", "not-a-reference", "--dest", str(tmp_path / "d"))
    assert bad.returncode == 2 and "needs a tag or a digest" in bad.stderr
