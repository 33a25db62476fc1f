"""Netboot without booting: cluster files of the netboot-only form (read through the converter), generations,
rollback, the HTTP server, dnsmasq's config."""

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import yaml

from builder.cluster.model import load_cluster
from builder.cluster.plans import control_of, load_for_netboot, models, publish_services
from builder.core.errors import RecipeError
from builder.netboot import cpio
from builder.netboot.artifacts import require_driver
from builder.netboot.modules import load_order
from builder.netboot.plan import AGENT_PORT, AgentLine, ServerLine, parse
from builder.netboot.publish import Artifacts, current_id, generations, rollback
from builder.netboot.serve import check_dnsmasq, dnsmasq_config
from conftest import free_port, run_cli_inproc

MAC = "52:54:00:12:34:56"


def inventory(tmp_path: Path, **changes: object) -> Path:
    data: dict[str, object] = {
        "control": {"address": "10.0.2.2", "http_port": 8000, "subnet": "10.0.2.0"},
        "nodes": [{"name": "node1", "mac": MAC, "target": "cpu", "role": "rpc-worker"}],
    }
    data.update(changes)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def publish(root: Path, path: Path, artifacts: Artifacts, keep: int = 3) -> tuple[str, bool]:
    """What `builder pxe publish FILE` does with netboot sets already made."""
    loaded = load_for_netboot(path)
    return publish_services(root, loaded, models(loaded, lambda _: None), artifacts, keep)


def fake_artifacts(tmp_path: Path, seed: str) -> tuple[Path, dict[str, object]]:
    """Artifact folders as `pxe build` writes them, with small stand-in files."""
    folder = tmp_path / f"artifacts-{seed}"
    folder.mkdir()
    files = {}
    for name in ("vmlinuz", "initrd.img", "root.squashfs"):
        data = f"{name} {seed}".encode()
        (folder / name).write_bytes(data)
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest = {"schema": 1, "target": "cpu", "variant": "cpu", "image": "localhost/builder/cpu:cpu",
                "image_digest": "sha256:" + "0" * 64, "kernel_version": "6.1.0-0-amd64", "files": files}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder, manifest


@pytest.mark.parametrize(("change", "message"), [
    ({"nodes": [{"name": "n1", "mac": "52:54:00:zz:34:56", "target": "cpu", "role": "rpc-worker"}]},
     "nodes[0].mac: Value error, must be six hex pairs"),
    ({"nodes": [{"name": "n1", "mac": MAC, "target": "cpu", "role": "rpc-worker"},
                {"name": "n2", "mac": MAC.upper(), "target": "cpu", "role": "rpc-worker"}]},
     f"nodes[1].mac: {MAC} is already nodes[0]"),
    ({"nodes": [{"name": "n1", "mac": MAC, "target": "tpu", "role": "rpc-worker"}]},
     "nodes[0]: target: unknown target 'tpu'"),
    ({"nodes": [{"name": "n1", "mac": MAC, "target": "nvidia", "role": "rpc-worker"}]},
     "nodes[0].target: nvidia cannot be netbooted yet"),
    ({"nodes": [{"name": "n1", "mac": MAC, "target": "cpu", "role": "boss"}]},
     "nodes[0].role: Input should be 'head', 'rpc-worker' or 'vllm-server'"),
    ({"nodes": [{"name": "h", "mac": MAC, "target": "cpu", "role": "head"}]},
     "model: the head (nodes[0]) needs a model"),
    ({"model": "http://10.0.2.2:8000/m.gguf",
      "nodes": [{"name": "h", "mac": MAC, "target": "cpu", "role": "head"},
                {"name": "w", "mac": "52:54:00:12:34:57", "target": "cpu", "role": "rpc-worker"}]},
     "model: http://10.0.2.2:8000/m.gguf is a URL, and a service's model needs its sha256"),
    ({"control": {"address": "10.0.2.2", "http_port": 99999}}, "control.http_port:"),
    ({"extra": 1}, "extra: unknown key"),
])
def test_bad_inventory_is_one_line_and_exit_2(tmp_path: Path, change: dict[str, object], message: str) -> None:
    proc = run_cli_inproc("pxe", "publish", str(inventory(tmp_path, **change)), "--root",
                   str(tmp_path / "pxe-root"))
    assert proc.returncode == 2, proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("error: ") and "cluster.yaml" in first and message in first, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "pxe-root").exists()


def test_unquoted_digit_only_mac_survives_yaml(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("control: {address: 10.0.2.2}\n"
                    "nodes: [{name: n1, mac: 52:54:00:12:34:56, target: cpu, role: rpc-worker}]\n")
    assert load_cluster(path).cluster.nodes[0].mac == MAC


def test_module_load_order_puts_dependencies_first(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text(
        "kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko\n"
        "kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n"
        "kernel/net/core/failover.ko:\n"
        "kernel/fs/squashfs/squashfs.ko.xz:\n")
    (tmp_path / "modules.builtin").write_text("kernel/fs/overlayfs/overlay.ko\n")
    order, missing = load_order(tmp_path, ("virtio_net", "squashfs", "overlay", "r8169"))
    assert order == ["kernel/net/core/failover.ko", "kernel/drivers/net/net_failover.ko",
                     "kernel/drivers/net/virtio_net.ko", "kernel/fs/squashfs/squashfs.ko.xz"]
    assert missing == ["r8169"]


def test_cpio_archive_is_read_back_by_cpio(tmp_path: Path) -> None:
    data = cpio.archive([cpio.directory("etc"), cpio.file("etc/x", b"hello\n", 0o600), cpio.symlink("y", "etc/x"),
                         cpio.chardev("console", 5, 1)])
    listing = subprocess.run(["cpio", "-itv"], input=data, capture_output=True, check=True).stdout.decode()
    assert [line.split()[-1] for line in listing.splitlines()] == ["etc", "etc/x", "etc/x", "console"]
    assert "crw-------" in listing and "lrwxrwxrwx" in listing


def test_generations_switch_atomically_roll_back_and_prune(tmp_path: Path) -> None:
    root, path = tmp_path / "pxe-root", inventory(tmp_path)
    ids = []
    for seed in ("a", "b", "c"):
        folder, manifest = fake_artifacts(tmp_path, seed)
        gen, new = publish(root, path, {("cpu", "cpu"): (folder, manifest)}, keep=1)
        assert new
        ids.append(gen)
        script = (root / "current" / "nodes" / "52-54-00-12-34-56.ipxe").read_text()
        squash = manifest["files"]["root.squashfs"]["sha256"]  # type: ignore[index]
        assert f"builder.sha256={squash}" in script and "builder.plan_sha256=" in script
        assert "builder.role=" not in script
        assert (root / "blobs" / "sha256" / squash).read_bytes() == f"root.squashfs {seed}".encode()
    assert len(set(ids)) == 3 and current_id(root) == ids[2]
    # keep=1: the current generation and one before it; the oldest and its blobs are gone
    assert [g.id for g in generations(root)] == ids[1:]
    assert not (root / "generations" / ids[0]).exists()
    # two generations' kernel, initrd and root, and the node's firewall rules and plan (the same in both)
    assert len(list((root / "blobs" / "sha256").iterdir())) == 8

    again = tmp_path / "again"
    again.mkdir()
    folder, manifest = fake_artifacts(again, "c")
    gen, new = publish(root, path, {("cpu", "cpu"): (folder, manifest)}, keep=1)
    assert (gen, new) == (ids[2], False)

    assert rollback(root) == ids[1] and current_id(root) == ids[1]
    assert (root / "current").is_symlink()
    proc = run_cli_inproc("pxe", "rollback", "--root", str(root))
    assert proc.returncode == 2 and "no generation before" in proc.stderr
    proc = run_cli_inproc("pxe", "rollback", "--root", str(root), "--to", ids[2])
    assert proc.returncode == 0 and current_id(root) == ids[2]
    listing = run_cli_inproc("pxe", "list", "--root", str(root)).stdout
    assert f"* {ids[2]}" in listing and f"  {ids[1]}" in listing


def test_head_plan_names_the_workers_and_the_model_with_its_hash(tmp_path: Path) -> None:
    """The old form's head becomes the server of a split: its plan (not its kernel command line) names the
    workers, the context and the model's blob, which is the GGUF itself."""
    (tmp_path / "m.gguf").write_bytes(b"GGUF tiny")
    nodes = [{"name": "head", "mac": MAC, "target": "cpu", "role": "head"},
             {"name": "w1", "mac": "52:54:00:12:34:57", "target": "cpu", "role": "rpc-worker",
              "address": "10.0.2.20", "port": 50100},
             {"name": "w2", "mac": "52:54:00:12:34:58", "target": "cpu", "role": "rpc-worker",
              "address": "10.0.2.21", "port": 50100}]
    root, path = tmp_path / "pxe-root", inventory(tmp_path, nodes=nodes, model="m.gguf", context=512)
    folder, manifest = fake_artifacts(tmp_path, "a")
    publish(root, path, {("cpu", "cpu"): (folder, manifest)}, keep=1)
    words = (root / "current" / "nodes" / "52-54-00-12-34-56.ipxe").read_text().split()
    assert not any(w.startswith(("builder.role=", "builder.rpc=", "builder.model=", "builder.ctx=")) for w in words)
    digest = hashlib.sha256(b"GGUF tiny").hexdigest()
    assert f"builder.models={digest}:9" in words
    plan = parse((root / "current" / "nodes" / "52-54-00-12-34-56.plan").read_text())
    assert plan.lines == (AgentLine(AGENT_PORT),
                          ServerLine("m", 8080, f"http://10.0.2.2:8000/blobs/sha256/{digest}", digest,
                                     ("10.0.2.20:50100", "10.0.2.21:50100"), 512))
    assert (root / "blobs" / "sha256" / digest).read_bytes() == b"GGUF tiny"
    worker = (root / "current" / "nodes" / "52-54-00-12-34-57.plan").read_text()
    assert worker.endswith("rpc-worker\tm\t50100\n")


def test_node_scripts_carry_the_verity_root_hash_and_each_nodes_cache(tmp_path: Path) -> None:
    nodes = [{"name": "n1", "mac": MAC, "target": "cpu", "role": "rpc-worker"},
             {"name": "n2", "mac": "52:54:00:12:34:57", "target": "cpu", "role": "rpc-worker",
              "cache": {"device": "/dev/disk/by-id/nvme-Samsung_SSD_990_PRO_2TB_S7x-part3", "wipe": True}},
             {"name": "n3", "mac": "52:54:00:12:34:58", "target": "cpu", "role": "rpc-worker", "cache": False}]
    root = tmp_path / "pxe-root"
    path = inventory(tmp_path, nodes=nodes, cache={"device": "PARTLABEL=builder-cache"}, ram_share=30)
    folder, manifest = fake_artifacts(tmp_path, "a")
    manifest["verity"] = {"root_hash": "a" * 64, "salt": "b" * 64, "data_blocks": 9678, "algorithm": "sha256"}
    publish(root, path, {("cpu", "cpu"): (folder, manifest)}, keep=1)

    def words(mac: str) -> list[str]:
        return (root / "current" / "nodes" / f"{mac.replace(':', '-')}.ipxe").read_text().split()

    first = words(MAC)
    assert {f"builder.verity={'a' * 64}", f"builder.verity_salt={'b' * 64}", "builder.verity_blocks=9678",
            "builder.cache=partlabel:builder-cache", "builder.ram_share=30",
            f"builder.size={len(b'root.squashfs a')}"} <= set(first)
    assert "builder.cache_wipe=1" not in first
    second = words("52:54:00:12:34:57")
    assert "builder.cache=id:nvme-Samsung_SSD_990_PRO_2TB_S7x-part3" in second and "builder.cache_wipe=1" in second
    assert not any(w.startswith("builder.cache") for w in words("52:54:00:12:34:58"))  # cache: false, RAM mode


def test_each_node_gets_its_firewall_as_a_blob_named_by_sha256(tmp_path: Path) -> None:
    """The rules reach the node the way the root does: a blob whose sha256 is on the kernel command line (the
    initramfs checks it before loading), kept when old generations are pruned; a copy in the generation for
    the reader. Nodes with an address are admitted by every node; one without is admitted by itself only."""
    nodes = [{"name": "head", "mac": MAC, "target": "cpu", "role": "head", "address": "10.0.2.10"},
             {"name": "w1", "mac": "52:54:00:12:34:57", "target": "cpu", "role": "rpc-worker",
              "address": "10.0.2.20"},
             {"name": "w2", "mac": "52:54:00:12:34:58", "target": "cpu", "role": "rpc-worker",
              "address": "10.0.2.21"}]
    (tmp_path / "m.gguf").write_bytes(b"GGUF tiny")
    root, path = tmp_path / "pxe-root", inventory(tmp_path, nodes=nodes, model="m.gguf")
    folder, manifest = fake_artifacts(tmp_path, "a")
    publish(root, path, {("cpu", "cpu"): (folder, manifest)}, keep=0)
    words = (root / "current" / "nodes" / "52-54-00-12-34-58.ipxe").read_text().split()
    digest = next(w for w in words if w.startswith("builder.firewall_sha256=")).split("=", 1)[1]
    assert f"builder.firewall=http://10.0.2.2:8000/blobs/sha256/{digest}" in words
    rules = (root / "blobs" / "sha256" / digest).read_bytes()
    assert hashlib.sha256(rules).hexdigest() == digest
    assert rules == (root / "current" / "nodes" / "52-54-00-12-34-58.nft").read_bytes()
    text = rules.decode()
    assert "for node w2 (10.0.2.21)" in text and "backend ports (50052)" in text
    assert "elements = { 10.0.2.2, 10.0.2.10, 10.0.2.20, 10.0.2.21 }" in text
    # a node that leases its address: left out of the set (the initramfs adds its own lease at boot)
    alone = inventory(tmp_path, nodes=[{"name": "n1", "mac": MAC, "target": "cpu", "role": "rpc-worker"}])
    publish(root, alone, {("cpu", "cpu"): (folder, manifest)}, keep=0)
    words = (root / "current" / "nodes" / "52-54-00-12-34-56.ipxe").read_text().split()
    digest = next(w for w in words if w.startswith("builder.firewall_sha256=")).split("=", 1)[1]
    text = (root / "blobs" / "sha256" / digest).read_text()
    assert "elements = { 10.0.2.2 }" in text and "(address leased)" in text
    # keep=0 pruned the first generation and its rules: only the current node's firewall blob is left
    assert sum(1 for b in (root / "blobs" / "sha256").iterdir() if b.read_bytes().startswith(b"# Written")) == 1
    # rules that nft would refuse never reach a node: a control address must be an IP address
    named = inventory(tmp_path, control={"address": "boot.lan"})
    proc = run_cli_inproc("pxe", "publish", str(named), "--root", str(root), "--artifacts", str(tmp_path))
    assert proc.returncode == 2 and "control.address: 'boot.lan' is a name; builder binds and admits IP addresses" \
        in proc.stderr and "Traceback" not in proc.stderr


@contextmanager
def served_root(root: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`builder pxe serve` of `root` on a loopback port, once its boot script answers: its base URL and process
    (stopped on leaving; its output stays readable)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "builder", "pxe", "serve", "--root", str(root),
                               "--bind", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                requests.get(f"{base}/current/boot.ipxe", timeout=2)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        yield base, server
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_http_server_serves_boot_files_only(tmp_path: Path) -> None:
    root, path = tmp_path / "pxe-root", inventory(tmp_path)
    folder, manifest = fake_artifacts(tmp_path, "a")
    publish(root, path, {("cpu", "cpu"): (folder, manifest)})
    with served_root(root) as (base, server):
        boot = requests.get(f"{base}/current/boot.ipxe", timeout=5)
        assert boot.status_code == 200 and "${mac:hexhyp}.ipxe" in boot.text
        assert "http://10.0.2.2:8000/current/nodes/" in boot.text
        node = requests.get(f"{base}/current/nodes/52-54-00-12-34-56.ipxe", timeout=5)
        assert node.status_code == 200 and node.text.startswith("#!ipxe")
        squash = manifest["files"]["root.squashfs"]["sha256"]  # type: ignore[index]
        assert requests.get(f"{base}/blobs/sha256/{squash}", timeout=5).content == b"root.squashfs a"
        for hidden in ("/history.json", "/generations/", "/blobs/sha256/", "/current/cluster.yaml/../../history.json",
                       # the generation keeps the cluster file and what builder reads; the boot network gets none
                       "/current/cluster.yaml", "/current/nodes.json", "/current/manifests/cpu-cpu.json",
                       "/current/nodes/52-54-00-12-34-56.nft"):
            assert requests.get(base + hidden, timeout=5).status_code == 404, hidden
        assert (root / "current" / "cluster.yaml").is_file()  # kept for builder on the control node
    assert "dnsmasq config" in server.stderr.read().decode()  # type: ignore[union-attr]
    check_dnsmasq(root / "dnsmasq.conf")


def test_dnsmasq_config_chains_plain_pxe_to_ipxe_then_http(tmp_path: Path) -> None:
    path = inventory(tmp_path)
    text = dnsmasq_config(tmp_path, control_of(path))
    assert "dhcp-range=10.0.2.0,proxy" in text and "port=0" in text
    assert 'pxe-service=tag:!ipxe,x86PC,"iPXE (BIOS)",undionly.kpxe' in text
    assert 'pxe-service=tag:!ipxe,X86-64_EFI,"iPXE (UEFI)",ipxe.efi' in text
    assert 'pxe-service=tag:ipxe,x86PC,"builder",http://10.0.2.2:8000/current/boot.ipxe' in text
    (tmp_path / "tftp").mkdir()
    (tmp_path / "dnsmasq.conf").write_text(text)
    check_dnsmasq(tmp_path / "dnsmasq.conf")


def test_npu_netboot_root_must_carry_the_npu_driver(tmp_path: Path) -> None:
    """A netbooted NPU node has no host to lend it Intel's driver: a root without it is refused, in one line."""
    root = tmp_path / "root"
    (root / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    with pytest.raises(RecipeError) as refused:
        require_driver(root, "intel-npu", "openvino")
    assert refused.value.message == (
        "intel-npu/openvino: the image carries no Intel NPU user-space driver (libze_intel_npu.so.1, "
        "libnpu_driver_compiler.so), and a netbooted node has no host to take it from")
    assert "debs:" in refused.value.hint and "builder run" in refused.value.hint
    require_driver(root, "cpu", "cpu")  # no driver in the contract: nothing to refuse
    lib = root / "usr/lib/x86_64-linux-gnu"
    (lib / "libze_intel_npu.so.1.38.0").write_bytes(b"\x7fELF")
    (lib / "libze_intel_npu.so.1").symlink_to("/usr/lib/x86_64-linux-gnu/libze_intel_npu.so.1.38.0")
    (lib / "libnpu_driver_compiler.so").write_bytes(b"\x7fELF")
    require_driver(root, "intel-npu", "openvino")  # absolute links resolve inside the root
