"""The image entrypoint's `check-device` role, run by bash outside a container against stand-ins for
ggml-rpc-server and dmesg: the GPUs and kernel logs it must read cannot exist on a test machine (the engine
tests run it for real on the CPU, lavapipe and OpenVINO's CPU plugin)."""

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT

ENTRYPOINT = ROOT / "images" / "scripts" / "entrypoint.sh"
CPU = "  CPU: AMD Ryzen AI MAX+ 395 (128000 MiB, 120000 MiB free)"


def check(tmp_path: Path, listing: str, dmesg: str | None, **env: str) -> tuple[int, dict[str, Any]]:
    """check-device with a ggml-rpc-server that prints `listing` and a dmesg that prints `dmesg` (None: denied)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (tmp_path / "listing").write_text(listing + "\n")
    (bin_dir / "ggml-rpc-server").write_text(f"#!/bin/sh\ncat '{tmp_path}/listing'\nexit 1\n")
    if dmesg is None:
        denied = "dmesg: read kernel buffer failed: Operation not permitted"
        (bin_dir / "dmesg").write_text(f"#!/bin/sh\necho '{denied}' >&2\nexit 1\n")
    else:
        (tmp_path / "kernel").write_text(dmesg + "\n")
        (bin_dir / "dmesg").write_text(f"#!/bin/sh\ncat '{tmp_path}/kernel'\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    proc = subprocess.run(["bash", str(ENTRYPOINT), "check-device"], capture_output=True, text=True, timeout=30,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env})
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout + proc.stderr
    return proc.returncode, json.loads(lines[0])


def test_the_expected_device_listed_is_ready_whatever_its_description_holds(tmp_path: Path) -> None:
    listing = 'available devices:\n  Vulkan0: AMD Radeon "8060S" \\ (RADV GFX1151)\t(65536 MiB, 60000 MiB free)\n' + CPU
    code, doc = check(tmp_path, listing, "", LLAMA_SMOKE_DEVICE="Vulkan", LLAMA_DRIVER_MODULES="amdgpu")
    assert code == 0
    assert doc["state"] == "ready" and doc["expected"] == "Vulkan" and doc["devices"] == ["Vulkan0", "CPU"]
    assert doc["why"] == 'llama.cpp lists Vulkan0 (AMD Radeon "8060S" \\ (RADV GFX1151)\t(65536 MiB, 60000 MiB free))'


def test_a_missing_gpu_is_degraded_with_the_devices_the_backend_and_the_driver_line(tmp_path: Path) -> None:
    listing = ("ggml_cuda_init: failed to initialize ROCm: no ROCm-capable device is detected\n"
               "load_backend: loaded ROCm backend from /opt/llama/bin/libggml-hip.so\navailable devices:\n" + CPU)
    kernel = ("[    1.0] pci 0000:c5:00.0: [1002:1586] type 00 class 0x030000\n"
              "[    5.1] amdgpu 0000:c5:00.0: amdgpu: Fetched VBIOS from VFCT\n"
              "[    5.9] amdgpu 0000:c5:00.0: amdgpu: failed to load firmware amdgpu/gc_11_5_1_pfp.bin\n"
              "[    6.0] usb 3-1: new high-speed USB device")
    code, doc = check(tmp_path, listing, kernel, LLAMA_SMOKE_DEVICE="ROCm", LLAMA_DRIVER_MODULES="amdgpu")
    assert code == 1
    assert doc["state"] == "degraded" and doc["expected"] == "ROCm" and doc["devices"] == ["CPU"]
    why = doc["why"]
    assert why.startswith("no ROCm device: llama.cpp lists CPU (AMD Ryzen AI MAX+ 395")
    assert "failed to initialize ROCm: no ROCm-capable device is detected" in why
    assert why.endswith("last amdgpu kernel log line: [    5.9] amdgpu 0000:c5:00.0: amdgpu: failed to load firmware "
                        "amdgpu/gc_11_5_1_pfp.bin")


@pytest.mark.parametrize("kernel", [None, "[    0.0] Linux version 6.16.1"], ids=["denied", "no-driver-line"])
def test_the_kernel_log_is_named_when_it_cannot_help(tmp_path: Path, kernel: str | None) -> None:
    code, doc = check(tmp_path, CPU, kernel, LLAMA_SMOKE_DEVICE="Vulkan", LLAMA_DRIVER_MODULES="xe i915")
    assert code == 1 and doc["state"] == "degraded"
    if kernel is None:
        assert "kernel log not readable here (dmesg: read kernel buffer failed: Operation not permitted)" in doc["why"]
    else:
        assert doc["why"].endswith("no xe/i915 line in the kernel log (is the module loaded?)")


def test_openvino_falling_back_to_its_cpu_plugin_is_degraded(tmp_path: Path) -> None:
    listing = ("GGML OpenVINO Backend: device NPU is not available, fallback to CPU\n"
               "  OPENVINO0: OpenVINO Runtime (32000 MiB, 32000 MiB free)\n" + CPU)
    code, doc = check(tmp_path, listing, None, LLAMA_SMOKE_DEVICE="OPENVINO", GGML_OPENVINO_DEVICE="NPU",
                      LLAMA_DRIVER_MODULES="intel_vpu")
    assert code == 1 and doc["devices"] == ["OPENVINO0", "CPU"]
    assert doc["why"].startswith("no NPU (OpenVINO) device:")
    assert "device NPU is not available, fallback to CPU" in doc["why"]
