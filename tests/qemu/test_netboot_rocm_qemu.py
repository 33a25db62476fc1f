"""The strix-halo/rocm image as a netboot set, booted under QEMU (TCG: there is no GPU and no KVM here).

The node gets sid's kernel with amdgpu and its firmware and loads amdgpu, which finds no device (QEMU has none).
Ready means right (issue 21): the rocm image's worker checks for its ROCm device before it listens, so the node
says `degraded: no ROCm device …` and its RPC port stays closed (a head would otherwise run on a CPU fallback
10-50x slower without a word). Slow: it needs the built rocm image (a 1.5-2 hour hipcc compile here) and a root of
about 0.5 GB.
"""

import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from test_netboot_qemu import BOOT_SECONDS, MAC, published

from conftest import free_port, require_engine, run_cli
from qemu import node, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.engine]
MEMORY_MB = 3072  # RAM mode: the root is downloaded into the node's memory


@pytest.fixture(scope="module")
def artifacts() -> dict[str, object]:
    require_engine("podman")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86 is not installed (.ci/run installs it)")
    proc = run_cli("pxe", "build", "--target", "strix-halo", "--engine", "podman", "--json", timeout=3 * 3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest: dict[str, object] = json.loads(proc.stdout)
    return manifest


def test_rocm_set_has_sid_kernel_with_amdgpu_and_its_firmware(artifacts: dict[str, object]) -> None:
    major, minor = (int(part) for part in str(artifacts["kernel_version"]).split(".")[:2])
    assert (major, minor) >= (6, 16), artifacts["kernel_version"]
    folder = Path(str(run_cli("pxe", "build", "--target", "strix-halo", "--engine", "podman").stdout.split()[1]))
    listing = subprocess.run(["unsquashfs", "-l", "-d", "", str(folder / "root.squashfs")], capture_output=True,
                             text=True, check=True).stdout.split()
    assert "/usr/lib/builder/modules.load" in listing
    # /lib is /usr/lib in sid's merged-/usr root
    assert any(p.endswith("lib/modules/amdgpu.ko") for p in listing), [p for p in listing if "amdgpu" in p][:5]
    assert any("lib/firmware/amdgpu/gc_11_5_1" in p for p in listing)  # gfx1151's microcode


def test_netbooted_rocm_worker_without_its_device_is_degraded_and_does_not_listen(
        artifacts: dict[str, object], tmp_path: Path) -> None:
    port, rpc = free_port(), free_port()
    console = tmp_path / "console.log"
    # the board's RAM (its iGPU's share goes on the kernel command line; QEMU's guest has no iGPU to use it)
    worker = [{"name": "halo1", "mac": MAC, "target": "strix-halo", "role": "rpc-worker", "ram": "32GiB"}]
    with published(tmp_path, port, worker) as root, \
            node(root / "tftp", MAC, console, forward=(rpc, 50052), memory_mb=MEMORY_MB) as vm:
        degraded = wait_for(console, r"builder-node: halo1 rpc-worker \S+ degraded: (no ROCm device[^\n]*)", vm,
                            BOOT_SECONDS * 3)
        text = console.read_text(errors="replace")
        assert "root image verified: sha256" in text
        assert "could not load amdgpu" not in text, text[-3000:]
        assert "llama.cpp lists CPU" in degraded.group(1), degraded.group(1)
        assert "rpc-worker ready on" not in text, text[-3000:]
        # QEMU's forward accepts on the host, and the guest has nothing listening: the connection ends unanswered
        with socket.create_connection(("127.0.0.1", rpc), timeout=30) as s:
            s.settimeout(30)
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
        print(text[-1500:])
