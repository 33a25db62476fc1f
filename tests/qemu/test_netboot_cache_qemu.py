"""A node's cache disk under QEMU (TCG, a raw image as a virtio disk, 127.0.0.1 only): the first boot fetches
the root into the cache, the second fetches none of it, a corrupted block of the cached root fails dm-verity
and the root is fetched again while the model stays, and a disk holding someone else's filesystem is left
alone (RAM mode).
Bytes fetched are read from `pxe serve`'s log, which has one line per response with the bytes sent.
Each boot costs a minute of emulation on a busy machine, so one test boots three times.
"""

import hashlib
import re
import subprocess
import time
from pathlib import Path

import pytest
from test_netboot_qemu import BOOT_SECONDS, MAC, artifacts, published

from conftest import free_port
from containers import container
from qemu import gpt_disk, node, wait_for

pytestmark = pytest.mark.engine
__all__ = ["artifacts"]  # the module's fixture, shared with test_netboot_qemu
READY = r"builder-node: node1 rpc-worker ready on 10\.0\.2\.15:50052"
WORKER = [{"name": "node1", "mac": MAC, "target": "cpu", "role": "rpc-worker"}]


def root_bytes_sent(log: Path, squash: str) -> int:
    """Bytes of the blob `pxe serve` has sent so far (the root's, or the model's)."""
    text = log.read_text(errors="replace")
    return sum(int(n) for n in re.findall(rf"sent (\d+) bytes of /blobs/sha256/{squash}\b", text))


def boot(root: Path, console: Path, disk: Path, ready: tuple[str, ...] = (READY,)) -> tuple[str, float]:
    """Boot the node until every `ready` line is on its console; its console text and seconds from power-on."""
    started = time.monotonic()
    with node(root / "tftp", MAC, console, disk=disk) as vm:
        wait_for(console, ready[0], vm, BOOT_SECONDS)
        for pattern in ready[1:]:
            wait_for(console, pattern, vm, 120)
        return console.read_text(errors="replace"), time.monotonic() - started


def block_offset(disk: Path, partition: int, path: str) -> int:
    """Where the first block of `path` (in the ext2 filesystem at byte `partition` of `disk`) lies in `disk`."""
    image = disk.with_suffix(".part")
    with disk.open("rb") as src, image.open("wb") as dst:
        src.seek(partition)
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    try:
        stats = subprocess.run(["debugfs", "-R", "stats", str(image)], capture_output=True, text=True, check=True)
        block_size = int(re.search(r"Block size:\s+(\d+)", stats.stdout).group(1))  # type: ignore[union-attr]
        bmap = subprocess.run(["debugfs", "-R", f"bmap {path} 0", str(image)], capture_output=True, text=True,
                              check=True)
        return partition + int(bmap.stdout.split()[-1]) * block_size
    finally:
        image.unlink()


def test_cache_disk_first_boot_fetches_second_does_not_and_a_corrupt_block_is_refetched(
    tiny_model: Path, tmp_path: Path, artifacts: dict[str, object]
) -> None:
    """One VM sequence for the cache disk, with a node of a services-form cluster file running two processes
    from its plan: a replica of one service and an RPC worker of another's split (whose head, another node,
    is not booted here). The first boot formats the empty disk and keeps the root and the model there, with the
    worker's tensor cache; the second fetches none of either; after a corrupted block of the cached root,
    the third fails dm-verity, fetches the root again (once) and still takes the model from the disk."""
    squash: str = artifacts["files"]["root.squashfs"]["sha256"]  # type: ignore[index]
    size: int = artifacts["files"]["root.squashfs"]["size"]  # type: ignore[index]
    model = tmp_path / "tiny.gguf"
    model.write_bytes(tiny_model.read_bytes())
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    nodes: list[dict[str, object]] = [
        {"name": "node1", "mac": MAC, "target": "cpu", "memory": "512MiB", "address": "10.0.2.15"},
        {"name": "head1", "mac": "52:54:00:12:34:57", "target": "cpu", "memory": "512MiB", "address": "10.0.2.16"}]
    services = [{"name": "tiny", "model": "tiny.gguf", "sha256": digest, "nodes": ["node1"], "context": 256,
                 "port": 8080},
                {"name": "big", "model": "tiny.gguf", "sha256": digest, "topology": "split", "head": "head1",
                 "workers": ["node1"], "port": 9000}]
    ready = (r"builder-node: node1 rpc-worker ready on 10\.0\.2\.15:50052 \(for big\)",
             r"builder-node: node1 server tiny ready on 10\.0\.2\.15:8080")
    disk = tmp_path / "disk.img"
    partition = gpt_disk(disk, 256, "builder-cache")
    log = tmp_path / "serve.log"
    with published(tmp_path, free_port(), nodes, services=services,
                   cache={"device": "PARTLABEL=builder-cache"}) as root:
        words = (root / "current" / "nodes" / "52-54-00-12-34-56.ipxe").read_text().split()
        assert f"builder.models={digest}:{model.stat().st_size}" in words
        first, first_s = boot(root, tmp_path / "console-1.log", disk, ready)
        assert "cache device /dev/vda1 is empty: formatting it" in first
        assert f"root image verified: sha256 {squash}" in first and "cache: stored the root image" in first
        assert "root opened through dm-verity" in first
        assert f"builder-node: model verified: sha256 {digest}" in first
        assert "builder-node: RPC tensor cache on the cache disk (0 files kept)" in first
        assert root_bytes_sent(log, squash) == size and root_bytes_sent(log, digest) == model.stat().st_size

        second, second_s = boot(root, tmp_path / "console-2.log", disk, ready)
        assert f"root image from the cache: sha256 {squash} (no download)" in second
        assert "formatting" not in second and "root opened through dm-verity" in second
        assert f"builder-node: model from the cache: sha256 {digest} (no download)" in second
        # the second boot fetched no byte of the root nor of the model
        assert root_bytes_sent(log, squash) == size and root_bytes_sent(log, digest) == model.stat().st_size

        # Flip bytes of the squashfs superblock that squashfs itself never checks (its mkfs time): only
        # dm-verity can tell, and it must.
        at = block_offset(disk, partition, f"/blobs/sha256/{squash}") + 8
        with disk.open("r+b") as f:
            f.seek(at)
            old = f.read(4)
            f.seek(at)
            f.write(bytes(b ^ 0xFF for b in old))
        third, _ = boot(root, tmp_path / "console-3.log", disk, ready)
        assert f"cached root image sha256 {squash} failed dm-verity (a corrupt block): dropping it" in third
        assert third.index("failed dm-verity") < third.index(f"root image verified: sha256 {squash}")
        assert f"builder-node: model from the cache: sha256 {digest} (no download)" in third
        assert root_bytes_sent(log, squash) == 2 * size  # fetched again, once
        assert root_bytes_sent(log, digest) == model.stat().st_size
    print(f"first boot {first_s:.1f} s, second boot {second_s:.1f} s (root {size} bytes, then 0)")


def test_netbooted_head_takes_its_model_from_the_cache_on_its_second_boot(
    tiny_model: Path, tmp_path: Path, artifacts: dict[str, object]
) -> None:
    """The head's model is published by sha256; with a cache disk the first boot keeps it there, and the
    second boot hashes the cached copy and serves from it without fetching a byte of it. The file is in the
    netboot-only form (a head node and a top-level model): it boots through the converter, as a split service
    named after the model whose head's plan names the worker."""
    rpc, http, head = free_port(), free_port(), free_port()
    nodes: list[dict[str, object]] = [
        {"name": "head1", "mac": MAC, "target": "cpu", "role": "head"},
        # Stands for a worker node: a container on the host, which the guest reaches at 10.0.2.2.
        {"name": "worker1", "mac": "52:54:00:12:34:57", "target": "cpu", "role": "rpc-worker",
         "address": "10.0.2.2", "port": rpc},
    ]
    model = tmp_path / "tiny.gguf"
    model.write_bytes(tiny_model.read_bytes())
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    disk = tmp_path / "disk.img"
    gpt_disk(disk, 256, "builder-cache")
    log = tmp_path / "serve.log"
    ready = r"builder-node: head1 server tiny ready on 10\.0\.2\.15:8080"
    with published(tmp_path, http, nodes, model=model, cache={"device": "PARTLABEL=builder-cache"}) as root, \
            container("podman", tmp_path, f"builder-netcache-worker-{rpc}", "rpc-worker", "--host", "127.0.0.1",
                      "--port", str(rpc)):
        plan = (root / "current" / "nodes" / "52-54-00-12-34-56.plan").read_text().splitlines()[-1].split("\t")
        assert plan[:3] == ["server", "tiny", "8080"] and plan[4:6] == [digest, f"10.0.2.2:{rpc}"]
        texts = []
        for nth in (1, 2):
            console = tmp_path / f"console-{nth}.log"
            with node(root / "tftp", MAC, console, forward=(head, 8080), disk=disk) as vm:
                wait_for(console, ready, vm, BOOT_SECONDS)
                texts.append(console.read_text(errors="replace"))
            if nth == 1:
                assert f"builder-node: model verified: sha256 {digest}" in texts[0]
                assert root_bytes_sent(log, digest) == model.stat().st_size
        assert f"builder-node: model from the cache: sha256 {digest} (no download)" in texts[1]
        assert root_bytes_sent(log, digest) == model.stat().st_size  # nothing more on the second boot


def test_foreign_disk_is_left_alone_and_the_node_boots_in_ram(tmp_path: Path,
                                                              artifacts: dict[str, object]) -> None:
    """A disk with someone else's filesystem and no `wipe: true`: not a byte changes, the node says why and
    boots in RAM mode, warning that the root is a large share of its memory (ram_share: 1 %)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "keep.txt").write_text("someone else's data\n")
    disk = tmp_path / "foreign.img"
    subprocess.run(["mkfs.ext4", "-q", "-L", "data", "-d", str(data), str(disk), "256M"], check=True)
    before = hashlib.sha256(disk.read_bytes()).hexdigest()
    squash: str = artifacts["files"]["root.squashfs"]["sha256"]  # type: ignore[index]
    with published(tmp_path, free_port(), WORKER, cache={"device": "/dev/disk/by-id/virtio-cache0"},
                   ram_share=1) as root:
        text, _ = boot(root, tmp_path / "console.log", disk)
    assert "cache device /dev/vda holds other data (not builder's cache); leaving it untouched: RAM mode" in text
    size: int = artifacts["files"]["root.squashfs"]["size"]  # type: ignore[index]
    assert f"WARNING: the root image ({size // 1048576} MiB) is more than 1% of this node's memory" in text
    assert f"root image verified: sha256 {squash}" in text and "cache: stored" not in text
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == before
