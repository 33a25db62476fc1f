"""Netboot for real: the cpu image's netboot artifacts, served by `builder pxe serve`, booted by QEMU
(BIOS, iPXE ROM -> TFTP boot.ipxe -> HTTP node script -> kernel + initrd -> sha256-checked squashfs),
coming up as an RPC worker that a head on the host uses. Software emulation (TCG): no KVM here.
"""

import hashlib
import json
import os
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
from containers import complete, container, cpu_reference_text, wait_healthy
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
                   "lib/modules/nf_tables.ko", "lib/modules/nft_reject_inet.ko"):
        assert wanted in listing, wanted
    files: dict[str, dict[str, int]] = artifacts["files"]  # type: ignore[assignment]
    assert files["initrd.img"]["size"] < 9_000_000 and files["root.squashfs"]["size"] < 100_000_000


def test_netbooted_worker_serves_a_head_on_the_host(
    served: tuple[Path, int], tiny_model: Path, tmp_path: Path
) -> None:
    """BIOS firmware; the UEFI path boots in the corrupted-root test (one boot less, both firmwares covered)."""
    root, _ = served
    rpc, head = free_port(), free_port()
    console = tmp_path / "console.log"
    common = ["-m", str(tiny_model), "-c", "256", "-t", "2"]
    expected = cpu_reference_text("podman", tmp_path, tiny_model)

    with node(root / "tftp", MAC, console, forward=(rpc, 50052)) as vm:
        ready = wait_for(console, r"builder-node: node1 rpc-worker ready on (\S+)", vm, BOOT_SECONDS)
        assert ready.group(1) == "10.0.2.15:50052"  # the node's own address, not a wildcard
        text = console.read_text(errors="replace")
        assert "root image verified: sha256" in text
        # no cache disk: RAM mode, the root still opened through dm-verity
        assert "root opened through dm-verity: root hash" in text and "builder-initrd: cache" not in text
        name = f"builder-netboot-head-{head}"
        with container("podman", tmp_path, name, "server", *common, "--port", str(head),
                       "--rpc", f"127.0.0.1:{rpc}", "-ngl", "99", "-lv", "4") as h:
            wait_healthy(head, h, tmp_path / f"{name}.log", seconds=180)
            assert complete(head, timeout=300) == expected
            log = (tmp_path / f"{name}.log").read_text(errors="replace")
            assert "offloaded 5/5 layers" in log and f"RPC0[127.0.0.1:{rpc}] model buffer size" in log


def test_corrupted_root_is_refused_and_retried_under_uefi(served: tuple[Path, int], tmp_path: Path,
                                                          artifacts: dict[str, object]) -> None:
    """UEFI firmware (OVMF) this time: the node boots, refuses the bad root, and comes up when it is fixed."""
    if not OVMF.is_file():
        pytest.fail("OVMF is not installed (.ci/run installs ovmf)")
    root, _ = served
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


def test_netbooted_head_fetches_the_model_and_serves_with_a_worker_on_the_host(
    tiny_model: Path, tmp_path: Path, artifacts: dict[str, object]
) -> None:
    """The head role on a netbooted node: it downloads the model from the control node, starts llama-server
    with --rpc to the cluster's worker (a container on the host, which the guest reaches as 10.0.2.2) and is
    ready once /health answers. Its completion equals the single-node one."""
    rpc, http, head = free_port(), free_port(), free_port()
    expected = cpu_reference_text("podman", tmp_path, tiny_model)
    nodes: list[dict[str, object]] = [
        {"name": "head1", "mac": MAC, "target": "cpu", "role": "head"},
        # Stands for a worker node: the host's container, which the guest reaches at 10.0.2.2.
        {"name": "worker1", "mac": "52:54:00:12:34:57", "target": "cpu", "role": "rpc-worker",
         "address": "10.0.2.2", "port": rpc},
    ]
    model = tmp_path / "tiny.gguf"
    shutil.copyfile(tiny_model, model)
    worker = f"builder-netboot-worker-{rpc}"
    with published(tmp_path, http, nodes, model=model) as root, \
            container("podman", tmp_path, worker, "rpc-worker", "--host", "127.0.0.1", "--port", str(rpc)), \
            node(root / "tftp", MAC, tmp_path / "console.log", forward=(head, 8080)) as vm:
        ready = wait_for(tmp_path / "console.log", r"builder-node: head1 head ready on (\S+)", vm, BOOT_SECONDS)
        assert ready.group(1) == "10.0.2.15:8080"
        text = (tmp_path / "console.log").read_text(errors="replace")
        assert f"builder.rpc=10.0.2.2:{rpc}" in (root / "current" / "nodes" / "52-54-00-12-34-56.ipxe").read_text()
        model_hash = hashlib.sha256(model.read_bytes()).hexdigest()
        assert f"builder-node: model verified: sha256 {model_hash}" in text
        assert "download of" not in text and "mismatch" not in text  # the model came on the first attempt
        assert complete(head, timeout=300) == expected
        worker_log = (tmp_path / f"{worker}.log").read_text(errors="replace")
        assert "Accepted client connection" in worker_log, worker_log[-2000:]


OUTSIDER = "192.0.2.1"  # TEST-NET-1: an address on the test's own network namespace's loopback, nowhere else

# ggml RPC: | command (1 byte) | size (8 bytes) | data |, answered by | size (8 bytes) | data |. HELLO is command
# 14 in every version; this protocol (v7) sends 24 bytes of transport capabilities and gets the version back.
RPC_HELLO = """
import socket, struct, sys
for host, port in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        with socket.create_connection((host, int(port)), timeout=60) as s:
            s.sendall(bytes([14]) + struct.pack("<Q", 24) + bytes(24))
            data = b""
            while len(data) < 11:
                more = s.recv(64)
                if not more:
                    break
                data += more
            print(host, "version", ".".join(str(b) for b in data[8:11]) if len(data) >= 11 else "closed")
    except OSError as exc:
        print(host, type(exc).__name__)
"""


@contextmanager
def network_namespace() -> Iterator[tuple[str, ...]]:
    """A network namespace of the test's own (nothing outside it is touched): loopback up, plus OUTSIDER on it.
    Yields the command prefix that runs a program inside it."""
    holder = subprocess.Popen(["unshare", "--net", "--", "sleep", "1800"])
    try:
        own = os.readlink("/proc/self/ns/net")
        for _ in range(100):
            if os.readlink(f"/proc/{holder.pid}/ns/net") != own:
                break
            time.sleep(0.05)
        enter = ("nsenter", f"--net=/proc/{holder.pid}/ns/net", "--")
        subprocess.run([*enter, "ip", "link", "set", "lo", "up"], check=True, timeout=30)
        subprocess.run([*enter, "ip", "addr", "add", f"{OUTSIDER}/32", "dev", "lo"], check=True, timeout=30)
        yield enter
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_netbooted_workers_firewall_admits_the_cluster_and_refuses_others(
    tmp_path: Path, artifacts: dict[str, object]
) -> None:
    """One boot, in a network namespace of the test's own. The node's firewall (from the inventory: the control
    node 10.0.2.2, and the node's own lease) is fetched, checked and loaded before the root, and the worker
    reaches ready. QEMU forwards two ports to the worker's one RPC port: the guest sees connections to the
    first (from 127.0.0.1) coming from 10.0.2.2, which the rules admit, and those to the second (from OUTSIDER,
    not loopback, which QEMU passes through) coming from OUTSIDER, which they do not. The first completes
    ggml RPC's HELLO; the second is closed at once. A second boot of the same generation with the firewall
    words taken off its kernel command line (as a generation published before the firewall existed) answers
    HELLO on both: the refusal is the firewall's, not QEMU's."""
    console = tmp_path / "console.log"
    worker = [{"name": "node1", "mac": MAC, "target": "cpu", "role": "rpc-worker"}]
    outsider = (f"tcp:{OUTSIDER}:50053-:50052",)  # a second host port to the same guest port
    with network_namespace() as enter, published(tmp_path, 8000, worker, prefix=enter) as root:
        with node(root / "tftp", MAC, console, forward=(50052, 50052), hostfwd=outsider, prefix=enter) as vm:
            started = time.monotonic()
            ready = wait_for(console, r"builder-node: node1 rpc-worker ready on (\S+)", vm, BOOT_SECONDS)
            booted = time.monotonic() - started
            assert ready.group(1) == "10.0.2.15:50052"
            words = (root / "current" / "nodes" / "52-54-00-12-34-56.ipxe").read_text().split()
            digest = next(w for w in words if w.startswith("builder.firewall_sha256=")).split("=", 1)[1]
            assert "elements = { 10.0.2.2 }" in (root / "blobs" / "sha256" / digest).read_text()
            text = console.read_text(errors="replace")
            loaded = text.index(f"builder-initrd: firewall loaded: sha256 {digest}")
            assert loaded < text.index("root image verified")  # before the root, so before any role listens
            probe = subprocess.run([*enter, sys.executable, "-c", RPC_HELLO, "127.0.0.1", "50052", OUTSIDER,
                                    "50053"], capture_output=True, text=True, timeout=180)
            assert probe.returncode == 0, probe.stderr
            admitted, refused = probe.stdout.splitlines()
            assert admitted.startswith("127.0.0.1 version 7."), probe.stdout
            assert refused in (f"{OUTSIDER} closed", f"{OUTSIDER} ConnectionResetError"), probe.stdout
            print(f"booted to ready in {booted:.0f} s")

        script = root / "current" / "nodes" / "52-54-00-12-34-56.ipxe"
        script.write_text(re.sub(r" builder\.firewall(_sha256)?=\S+", "", script.read_text()))
        console.unlink()
        with node(root / "tftp", MAC, console, forward=(50052, 50052), hostfwd=outsider, prefix=enter) as vm:
            wait_for(console, r"builder-node: node1 rpc-worker ready", vm, BOOT_SECONDS)
            assert "builder-initrd: no firewall on the kernel command line" in console.read_text(errors="replace")
            probe = subprocess.run([*enter, sys.executable, "-c", RPC_HELLO, "127.0.0.1", "50052", OUTSIDER,
                                    "50053"], capture_output=True, text=True, timeout=180)
            assert [line.split(" version ")[0] for line in probe.stdout.splitlines()] == ["127.0.0.1", OUTSIDER], \
                probe.stdout + probe.stderr


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
