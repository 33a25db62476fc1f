"""Netboot for real: the cpu image's netboot artifacts, served by `builder pxe serve`, booted by QEMU
(iPXE ROM -> TFTP boot.ipxe -> HTTP node script -> kernel + initrd -> sha256-checked squashfs). Software
emulation (TCG): no KVM here.

This module holds the artifacts' checks and the boots that must fail or change something: a corrupted root
(UEFI), rules that do not load. The boots that only observe share one booted cluster
(test_netboot_shared_qemu.py); the cache disk has its own sequence (test_netboot_cache_qemu.py).
"""

import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from conftest import free_port, require_engine, run_cli
from qemu import OVMF, node, wait_for

pytestmark = pytest.mark.engine
MAC = "52:54:00:12:34:56"
BOOT_SECONDS = 240  # TCG on 2 busy cores; a quiet machine needs about 40 s (docs/benchmarks.md)


@pytest.fixture(scope="module")
def artifacts() -> dict[str, object]:
    require_engine("podman")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86 is not installed (.ci/run installs it)")
    proc = run_cli("pxe", "build", "--target", "cpu", "--engine", "podman", "--json", timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest: dict[str, object] = json.loads(proc.stdout)
    return manifest


@contextmanager
def published(tmp_path: Path, port: int, nodes: list[dict[str, object]],
              model: Path | None = None, prefix: tuple[str, ...] = (), **settings: object) -> Iterator[Path]:
    """A generation for these nodes (and cluster-wide `settings`), published and served by `builder pxe serve`
    on 127.0.0.1:PORT (10.0.2.2:PORT to the guest), under `prefix` if given; its log is tmp_path/serve.log."""
    doc: dict[str, object] = {"control": {"address": "10.0.2.2", "http_port": port},
                              "kernel_args": ["console=ttyS0"], "nodes": nodes, **settings}
    if model:
        doc["model"] = str(model)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(doc))
    root = tmp_path / "pxe-root"
    proc = run_cli("pxe", "publish", str(path), "--root", str(root), "--engine", "podman",
                   timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if any("role" in n for n in nodes):  # the older form boots through the converter, which says so
        assert "uses the netboot-only form (nodes with role:); read as services" in proc.stderr, proc.stderr
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen([*prefix, sys.executable, "-m", "builder", "pxe", "serve", "--root", str(root),
                               "--bind", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    time.sleep(1)
    try:
        yield root
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


@pytest.fixture
def served(tmp_path: Path, artifacts: dict[str, object]) -> Iterator[tuple[Path, int]]:
    """A published generation for one rpc-worker node."""
    port = free_port()
    with published(tmp_path, port, [{"name": "node1", "mac": MAC, "target": "cpu", "role": "rpc-worker"}]) as root:
        yield root, port


def test_artifacts_manifest_matches_files(artifacts: dict[str, object]) -> None:
    folder = Path(str(run_cli("pxe", "build", "--target", "cpu", "--engine", "podman").stdout.split()[1]))
    assert json.loads((folder / "manifest.json").read_text())["files"] == artifacts["files"]
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=folder, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == 3, check.stdout + check.stderr
    assert str(artifacts["image_digest"]).startswith("sha256:") and str(artifacts["kernel_version"]).startswith("6.")
    listing = subprocess.run(f"zcat {folder / 'initrd.img'} | cpio -it", shell=True, capture_output=True,
                             text=True, check=True).stdout.split()
    for wanted in ("init", "bin/busybox", "lib/modules/virtio_net.ko", "lib/modules/squashfs.ko",
                   "lib/modules/overlay.ko", "etc/builder/udhcpc.sh", "sbin/nft", "etc/protocols",
                   "lib/modules/nf_tables.ko", "lib/modules/nft_reject_inet.ko",
                   # the fast data NICs' drivers (about 1 MB of the initrd)
                   "lib/modules/i40e.ko", "lib/modules/ice.ko", "lib/modules/bnxt_en.ko"):
        assert wanted in listing, wanted
    files: dict[str, dict[str, int]] = artifacts["files"]  # type: ignore[assignment]
    assert files["initrd.img"]["size"] < 11_000_000 and files["root.squashfs"]["size"] < 100_000_000


def test_corrupted_root_is_refused_and_retried_under_uefi(served: tuple[Path, int], tmp_path: Path,
                                                          artifacts: dict[str, object]) -> None:
    """UEFI firmware (OVMF) this time: the node boots, refuses the bad root, and comes up when it is fixed. Its
    script has no firewall words, as a generation published before builder made firewalls: the node says so and
    boots all the same (the shared cluster's node has its firewall: test_netboot_shared_qemu.py)."""
    if not OVMF.is_file():
        pytest.fail("OVMF is not installed (.ci/run installs ovmf)")
    root, _ = served
    script = root / "current" / "nodes" / "52-54-00-12-34-56.ipxe"
    script.write_text(re.sub(r" builder\.firewall(_sha256)?=\S+", "", script.read_text()))
    squash: str = artifacts["files"]["root.squashfs"]["sha256"]  # type: ignore[index]
    blob = root / "blobs" / "sha256" / squash
    good = blob.read_bytes()
    blob.write_bytes(good[:4096] + bytes(b ^ 0xFF for b in good[4096:8192]) + good[8192:])
    console = tmp_path / "console.log"
    with node(root / "tftp", MAC, console, uefi=True) as vm:
        mismatch = wait_for(console, r"root image sha256 mismatch: got (\w+), expected (\w+) \(attempt 1 of 5\)",
                            vm, BOOT_SECONDS)
        assert mismatch.group(2) == squash and mismatch.group(1) != squash
        text = console.read_text(errors="replace")
        assert "root image verified" not in text and "builder-node:" not in text
        blob.write_bytes(good)  # the control node is fixed: the node's next attempt must boot
        wait_for(console, r"root image verified: sha256 " + squash, vm, 120)
        wait_for(console, r"builder-node: node1 rpc-worker ready", vm, 120)
        assert "builder-initrd: no firewall on the kernel command line" in console.read_text(errors="replace")


def test_rules_that_do_not_load_stop_the_node_before_its_role(tmp_path: Path, artifacts: dict[str, object]) -> None:
    """Fail closed: a ruleset nft refuses (its sha256 matches: the control node published it) is one console line,
    and the node goes no further: no root, no role, nothing listening."""
    console = tmp_path / "console.log"
    worker = [{"name": "node1", "mac": MAC, "target": "cpu", "role": "rpc-worker"}]
    with published(tmp_path, free_port(), worker) as root:
        bad = b"table inet builder_cluster {\n    chain input { type filter hook input priority filter; bogus }\n}\n"
        digest = hashlib.sha256(bad).hexdigest()
        (root / "blobs" / "sha256" / digest).write_bytes(bad)
        script = root / "current" / "nodes" / "52-54-00-12-34-56.ipxe"
        script.write_text(re.sub(r"(builder\.firewall(_sha256)?=\S*?)[0-9a-f]{64}\b", rf"\g<1>{digest}",
                                 script.read_text()))
        with node(root / "tftp", MAC, console) as vm:
            wait_for(console, r"builder-initrd: FATAL: the firewall rules did not load \(.*Error.*\): "
                     r"the node's role will not start", vm, BOOT_SECONDS)
            time.sleep(10)  # the node stays where it is
            text = console.read_text(errors="replace")
            assert text.count("builder-initrd: FATAL") == 1 and "root image verified" not in text
            assert "builder-node:" not in text and vm.poll() is None
