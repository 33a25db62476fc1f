"""The intel-npu image (llama.cpp's OpenVINO backend, OpenVINO from its pinned PyPI wheel), built and run.

No NPU here, so the runs choose OpenVINO's CPU device with GGML_OPENVINO_DEVICE=CPU: the same OpenVINO
runtime, graph translation and compiled-model path as on an NPU, executed by OpenVINO's CPU plugin instead
of llama.cpp's CPU backend. The tests assert that the log names the OpenVINO device and puts the model's
buffers on it, so a run that silently fell back to llama.cpp's own CPU backend cannot pass.

Why comparing text with the cpu image is sound: both images build the same llama.cpp source; the model is
f16 with weights drawn at a large spread, so greedy decoding is far from ties. An OpenVINO path that computed
wrong results, or one that did not run, would diverge within a few tokens or fail the log checks.
"""

import json
import subprocess
from pathlib import Path

import pytest

from builder.engines import ENGINES
from conftest import free_port, require_engine, run_cli
from containers import complete, container, wait_healthy

pytestmark = pytest.mark.engine
# One engine proves the variant; both engines are proven on the same Containerfile by the cpu tests.
ENGINE = "podman"
OPENVINO_CPU = ("GGML_OPENVINO_DEVICE=CPU",)
NPU = ["--target", "intel-npu", "--engine", ENGINE]


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    require_engine(ENGINE)
    out = {}
    for target in ("cpu", "intel-npu"):
        proc = run_cli("build", "--target", target, "--engine", ENGINE, "--json", timeout=3600)
        assert proc.returncode == 0, proc.stderr[-5000:]
        out[target] = json.loads(proc.stdout)["image"]
    return out


def test_openvino_image_lists_the_openvino_device(images: dict[str, str]) -> None:
    proc = run_cli("run", *NPU, "smoke")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "smoke: ok   device OPENVINO0: OpenVINO Runtime" in proc.stdout


def test_npu_is_the_default_device_and_missing_npu_falls_back_to_cpu(images: dict[str, str]) -> None:
    """Image and run contract both ask for the NPU; on this NPU-less host OpenVINO says it uses its CPU."""
    inspect = subprocess.run([*ENGINES[ENGINE]().command(), "image", "inspect", images["intel-npu"]],
                             check=True, capture_output=True, text=True)
    assert "GGML_OPENVINO_DEVICE=NPU" in json.loads(inspect.stdout)[0]["Config"]["Env"]
    printed = run_cli("run", *NPU, "--print", "--env", OPENVINO_CPU[0], "shell").stdout
    assert printed.index("--env GGML_OPENVINO_DEVICE=NPU") < printed.index("--env GGML_OPENVINO_DEVICE=CPU")
    proc = run_cli("run", *NPU, "shell", "-c", "ggml-rpc-server -d list-devices 2>&1; true")
    assert "device NPU is not available, fallback to CPU" in proc.stdout
    assert "OpenVINO: using device CPU" in proc.stdout


def test_image_ships_the_cpu_and_npu_plugins_only(images: dict[str, str]) -> None:
    proc = run_cli("run", *NPU, "shell", "-c", "ls /opt/llama/bin")
    files = set(proc.stdout.split())
    assert {"libopenvino_intel_cpu_plugin.so", "libopenvino_intel_npu_plugin.so", "libtbb.so.12"} <= files
    assert "libopenvino_intel_gpu_plugin.so" not in files
    assert not any(name.startswith("libggml-cpu-") for name in files), "one CPU backend, linked in"


def test_llama_bench_runs_on_openvino(images: dict[str, str], tiny_model: Path) -> None:
    proc = run_cli("run", *NPU, "--env", OPENVINO_CPU[0], "bench", "-m", str(tiny_model), "-p", "32", "-n", "8",
                   "-r", "1", "-ngl", "99", "-o", "json", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert all("OPENVINO" in row["backends"] for row in rows), [row["backends"] for row in rows]
    assert all(row["avg_ts"] > 0 for row in rows)


def test_greedy_text_on_openvino_matches_the_cpu_image(images: dict[str, str], tiny_model: Path,
                                                      tmp_path: Path) -> None:
    common = ["-m", str(tiny_model), "-c", "256", "-t", "2"]
    cpu_port, ov_port = free_port(), free_port()
    with container(ENGINE, tmp_path, f"builder-test-cpu-{cpu_port}", "server", *common, "--port", str(cpu_port)) as c:
        wait_healthy(cpu_port, c, tmp_path / f"builder-test-cpu-{cpu_port}.log")
        expected = complete(cpu_port)
    name = f"builder-test-openvino-{ov_port}"
    with container(ENGINE, tmp_path, name, "server", *common, "--port", str(ov_port), "-ngl", "99", "-lv", "4",
                   target="intel-npu", env=OPENVINO_CPU) as v:
        wait_healthy(ov_port, v, tmp_path / f"{name}.log", seconds=180)
        text = complete(ov_port, timeout=180)
    log = (tmp_path / f"{name}.log").read_text(errors="replace")
    assert "OpenVINO: using device CPU" in log
    assert "using device OPENVINO0" in log
    assert "OPENVINO0 model buffer size" in log
    assert text == expected
    assert len(set(expected.split())) > 5
