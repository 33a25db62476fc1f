"""The Vulkan variant, built from Debian trixie's packages and run on Mesa's software Vulkan device.

No GPU here: lavapipe (llvmpipe) is a real Vulkan implementation that runs on the CPU. ggml-vulkan skips
CPU-type devices unless told otherwise, so the runs set GGML_VK_VISIBLE_DEVICES=0, and the tests assert
that the log names llvmpipe as the Vulkan0 device and puts the model's buffers on it (the offload line
alone would also appear when ggml silently fell back to the CPU backend).

Why comparing text with the cpu image is sound: both images build the same llama.cpp source; the model
is f16 with weights drawn at a large spread, so greedy decoding is far from ties, and lavapipe computes
in f32 like the CPU backend. A Vulkan backend that computed wrong results, or one that did not run,
would diverge within a few tokens or fail the log checks.
"""

import json
import subprocess
from pathlib import Path

import pytest

from builder.engines import ENGINES
from conftest import free_port, require_engine, run_cli
from containers import complete, container, cpu_reference_text, wait_healthy

pytestmark = pytest.mark.engine
# One engine proves the variant; both engines are proven on the same Containerfile by the cpu tests.
ENGINE = "podman"
SOFTWARE_VULKAN = ("GGML_VK_VISIBLE_DEVICES=0",)


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    require_engine(ENGINE)
    out = {}
    for target, variant in (("cpu", "cpu"), ("strix-halo", "vulkan"), ("intel-arc", "vulkan")):
        proc = run_cli("build", "--target", target, "--variant", variant, "--engine", ENGINE, "--json", timeout=3600)
        assert proc.returncode == 0, proc.stderr[-5000:]
        out[variant if target != "intel-arc" else "arc-vulkan"] = json.loads(proc.stdout)["image"]
    return out


def test_intel_arc_vulkan_image_is_built_and_runs_on_lavapipe(images: dict[str, str], tiny_model: Path) -> None:
    """intel-arc/vulkan renders the same stages as strix-halo's with its own labels: it is built, its smoke
    role finds the software Vulkan device, and the model runs on it (ANV itself needs an Arc GPU)."""
    proc = run_cli("run", "--target", "intel-arc", "--variant", "vulkan", "--engine", ENGINE, "smoke")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "smoke: ok   device Vulkan0: llvmpipe" in proc.stdout
    inspect = subprocess.run([*ENGINES[ENGINE]().command(), "image", "inspect", images["arc-vulkan"]],
                             check=True, capture_output=True, text=True)
    assert json.loads(inspect.stdout)[0]["Labels"]["dev.builder.target"] == "intel-arc"
    proc = run_cli("run", "--target", "intel-arc", "--variant", "vulkan", "--engine", ENGINE,
                   "--env", SOFTWARE_VULKAN[0], "bench", "-m", str(tiny_model), "-p", "16", "-n", "4", "-r", "1",
                   "-ngl", "99", "-o", "json", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {row["backends"] for row in json.loads(proc.stdout)} == {"Vulkan"}


def test_vulkan_image_lists_a_vulkan_device(images: dict[str, str]) -> None:
    proc = run_cli("run", "--target", "strix-halo", "--variant", "vulkan", "--engine", ENGINE, "smoke")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "smoke: ok   device Vulkan0: llvmpipe" in proc.stdout


def test_llama_bench_runs_on_vulkan(images: dict[str, str], tiny_model: Path) -> None:
    proc = run_cli("run", "--target", "strix-halo", "--variant", "vulkan", "--engine", ENGINE,
                   "--env", SOFTWARE_VULKAN[0], "bench", "-m", str(tiny_model), "-p", "32", "-n", "8", "-r", "1",
                   "-ngl", "99", "-o", "json", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert {row["backends"] for row in rows} == {"Vulkan"}
    assert all(row["avg_ts"] > 0 for row in rows)


def test_greedy_text_on_lavapipe_matches_the_cpu_image(images: dict[str, str], tiny_model: Path,
                                                      tmp_path: Path) -> None:
    common = ["-m", str(tiny_model), "-c", "256", "-t", "2"]
    vk_port = free_port()
    expected = cpu_reference_text(ENGINE, tmp_path, tiny_model)
    name = f"builder-test-vulkan-{vk_port}"
    with container(ENGINE, tmp_path, name, "server", *common, "--port", str(vk_port), "-ngl", "99", "-lv", "4",
                   target="strix-halo", variant="vulkan", env=SOFTWARE_VULKAN) as v:
        wait_healthy(vk_port, v, tmp_path / f"{name}.log", seconds=180)
        text = complete(vk_port, timeout=180)
    log = (tmp_path / f"{name}.log").read_text(errors="replace")
    assert "Vulkan0 : llvmpipe" in log
    assert "using device Vulkan0 (llvmpipe" in log
    assert "Vulkan0 model buffer size" in log
    assert text == expected
    assert len(set(expected.split())) > 5


def test_vulkan_run_contract_reaches_the_engine(images: dict[str, str]) -> None:
    proc = run_cli("run", "--target", "strix-halo", "--variant", "vulkan", "--engine", ENGINE, "--print", "shell")
    assert proc.returncode == 0
    assert "--security-opt seccomp=unconfined" in proc.stdout
    podman = ENGINES[ENGINE]()
    assert proc.stdout.startswith(" ".join(podman.run_argv()))
    subprocess.run([*podman.command(), "image", "exists", images["vulkan"]], check=True)


def device_check(target: str, role: str, *env: str) -> tuple[int, dict[str, object], str]:
    """`builder run ROLE` on a Vulkan image: its exit code, its one JSON line, its stderr."""
    proc = run_cli("run", "--target", target, "--variant", "vulkan", "--engine", ENGINE,
                   *[flag for item in env for flag in ("--env", item)], role, timeout=600)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout + proc.stderr
    return proc.returncode, json.loads(lines[0]), proc.stderr


def test_lavapipe_alone_is_no_vulkan_device_so_the_check_says_degraded(images: dict[str, str]) -> None:
    """ggml-vulkan skips CPU-type devices by default: the image honestly has no Vulkan device, says which
    devices it saw and what the kernel log holds (or that it cannot be read in a container)."""
    code, doc, _ = device_check("intel-arc", "check-device")
    assert code == 1
    assert doc["state"] == "degraded" and doc["expected"] == "Vulkan" and doc["devices"] == ["CPU"]
    why = str(doc["why"])
    assert why.startswith("no Vulkan device: llama.cpp lists CPU (") and "No devices found" in why
    assert "kernel log" in why and "i915" in why


def test_lavapipe_made_visible_is_a_ready_vulkan_device(images: dict[str, str]) -> None:
    code, doc, _ = device_check("intel-arc", "check-device", *SOFTWARE_VULKAN)
    assert code == 0
    assert doc["state"] == "ready" and doc["devices"] == ["Vulkan0", "CPU"]
    assert str(doc["why"]).startswith("llama.cpp lists Vulkan0 (llvmpipe")


def test_a_degraded_rpc_worker_does_not_listen(images: dict[str, str]) -> None:
    code, doc, stderr = device_check("strix-halo", "rpc-worker")
    assert code == 1
    assert doc["state"] == "degraded" and doc["expected"] == "Vulkan"
    assert "rpc-worker: not listening: no Vulkan device" in stderr and "ggml-rpc-server on" not in stderr


@pytest.mark.slow  # lavapipe compiles every shader pipeline the model needs: 2.5 min on 2 busy cores
def test_strix_halo_vulkan_qualifies_on_lavapipe(images: dict[str, str]) -> None:
    """The ids were recorded on the CPU at build time; lavapipe's Vulkan0 must give the same ones."""
    code, doc, _ = device_check("strix-halo", "qualify", *SOFTWARE_VULKAN)
    assert code == 0, doc
    assert doc["state"] == "qualified" and doc["device"] == "Vulkan0" and doc["recorded_on"] == "CPU"
    assert doc["ids"] == doc["recorded"]
