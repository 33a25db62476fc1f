"""The strix-halo/rocm image as a netboot set, booted under QEMU (TCG: there is no GPU and no KVM here).

The node gets sid's kernel with amdgpu and its firmware, loads amdgpu (it finds no device: QEMU has none),
and starts the rocm image's ggml-rpc-server, which falls back to its CPU backend. A cpu head on the host
then runs the tiny model with every layer on that worker, and its greedy text equals the cpu image's own.
Slow: it needs the built rocm image (a 1.5-2 hour hipcc compile here) and a root of about 0.5 GB.
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from test_netboot_qemu import BOOT_SECONDS, MAC, published

from conftest import free_port, require_engine, run_cli
from containers import complete, container, cpu_reference_text, wait_healthy
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


def test_netbooted_rocm_worker_serves_a_cpu_head_on_the_host(artifacts: dict[str, object], tiny_model: Path,
                                                              tmp_path: Path) -> None:
    port, rpc, head = free_port(), free_port(), free_port()
    expected = cpu_reference_text("podman", tmp_path, tiny_model)
    console = tmp_path / "console.log"
    # the board's RAM (its iGPU's share goes on the kernel command line; QEMU's guest has no iGPU to use it)
    worker = [{"name": "halo1", "mac": MAC, "target": "strix-halo", "role": "rpc-worker", "ram": "32GiB"}]
    with published(tmp_path, port, worker) as root, \
            node(root / "tftp", MAC, console, forward=(rpc, 50052), memory_mb=MEMORY_MB) as vm:
        ready = wait_for(console, r"builder-node: halo1 rpc-worker ready on (\S+)", vm, BOOT_SECONDS * 3)
        assert ready.group(1) == "10.0.2.15:50052"
        text = console.read_text(errors="replace")
        assert "root image verified: sha256" in text
        assert "could not load amdgpu" not in text, text[-3000:]
        name = f"builder-netboot-rocm-head-{head}"
        with container("podman", tmp_path, name, "server", "-m", str(tiny_model), "-c", "256", "-t", "2",
                       "--port", str(head), "--rpc", f"127.0.0.1:{rpc}", "-ngl", "99", "-lv", "4") as h:
            wait_healthy(head, h, tmp_path / f"{name}.log", seconds=300)
            assert complete(head, timeout=600) == expected
            log = (tmp_path / f"{name}.log").read_text(errors="replace")
            assert "offloaded 5/5 layers" in log and f"RPC0[127.0.0.1:{rpc}] model buffer size" in log, log[-3000:]
        print(console.read_text(errors="replace")[-1500:])
