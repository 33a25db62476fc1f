"""The nvidia/cuda image built for real from Debian trixie's CUDA 12.4, proven without a GPU.

Slow: the toolchain base is 5.5 GB and ggml-cuda compiles for two architectures on our 2 cores (time and size
in docs/benchmarks.md). There is no GPU here, so nothing runs a CUDA kernel: the tests prove what can be
proven without one, and a machine with a GPU runs bench/gpu_check.sh for the rest.
- The image builds, and its smoke role passes and says plainly that no CUDA device is present.
- Every shared library in /opt/llama/bin resolves inside the image except the driver's libcuda.so.1, which
  CDI or --gpus brings from the host; the image carries no libcuda and no driver package.
- libggml-cuda carries device code for exactly sm_86 (RTX 3060) and sm_89 (RTX 40xx), read with nvcc's
  cuobjdump in the toolchain base.
- The image serves the tiny model on its CPU backend (the CUDA module is skipped, not fatal).
"""

import json
import re
import subprocess
from pathlib import Path

import pytest

from builder.engines.podman import PodmanEngine
from conftest import require_engine, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.engine]
ENGINE = "podman"
# libcublasLt (~420 MiB, kernels for every GPU generation) and libcublas (~105 MiB) are most of the image.
SIZE_LIMIT = 1_500_000_000


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """A container without network (and without any GPU, which this machine lacks)."""
    argv = [*PodmanEngine().run_argv(), "--rm", "--network", "none", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def _in_image(image: str, script: str) -> subprocess.CompletedProcess[str]:
    return _run("--entrypoint", "bash", image, "-c", script)


@pytest.fixture(scope="module")
def built() -> dict[str, str]:
    """The image (built once; a second run finds it by its content tag) and its plan."""
    require_engine(ENGINE)
    proc = run_cli("build", "--target", "nvidia", "--engine", ENGINE, "--json", timeout=3 * 3600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    doc = json.loads(proc.stdout)
    plan = json.loads(run_cli("plan", "--target", "nvidia", "--json").stdout)
    print(json.dumps({k: doc.get(k) for k in ("image", "size", "seconds", "built")}))
    return {"image": doc["image"], "toolchain": plan["toolchain_ref"], "size": str(doc["size"])}


def test_smoke_passes_without_a_gpu_and_says_no_cuda_device_is_present(built: dict[str, str]) -> None:
    proc = _run(built["image"], "smoke")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for binary in ("llama-server", "ggml-rpc-server", "llama-cli", "llama-bench"):
        assert f"smoke: ok   {binary}" in proc.stdout
    assert "smoke: ok   libraries: all resolve in the image, except the host driver's libcuda.so.1" in proc.stdout
    assert "smoke: note no CUDA device present: the host driver's libcuda.so.1 is not in this container" \
        in proc.stdout
    assert "smoke: ok   device CUDA" not in proc.stdout


def test_a_missing_library_other_than_the_drivers_fails_the_smoke(built: dict[str, str]) -> None:
    """The library check can fail: hide cuBLAS and the smoke names it (the same check that passes above)."""
    proc = _in_image(built["image"], "rm /usr/lib/x86_64-linux-gnu/libcublas.so.12* && llama-entrypoint smoke")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "smoke: FAIL libraries missing from the image: libggml-cuda.so needs libcublas.so.12" in proc.stderr


def test_every_library_resolves_except_the_drivers_libcuda(built: dict[str, str]) -> None:
    proc = _in_image(built["image"], 'for f in /opt/llama/bin/*; do echo "== ${f##*/}"; ldd "$f"; done')
    assert proc.returncode == 0, proc.stderr
    missing: dict[str, set[str]] = {}
    current = ""
    for line in proc.stdout.splitlines():
        if line.startswith("== "):
            current = line[3:]
        elif "=> not found" in line:
            missing.setdefault(current, set()).add(line.split()[0])
    assert missing == {"libggml-cuda.so": {"libcuda.so.1"}}, missing
    cuda_needs = proc.stdout.split("== libggml-cuda.so")[1].split("== ")[0]
    for lib in ("libcudart.so.12", "libcublas.so.12", "libcublasLt.so.12"):
        # Debian's packages' copies (trixie is merged-/usr: ld.so names them under /lib, which is /usr/lib).
        assert re.search(rf"{re.escape(lib)} => (/usr)?/lib/x86_64-linux-gnu/", cuda_needs), cuda_needs


def test_the_image_carries_no_driver(built: dict[str, str]) -> None:
    # libcudart12 is the CUDA runtime (shipped); libcuda1 and nvidia-* / libnvidia-* are the driver's.
    proc = _in_image(built["image"], "ldconfig -p | grep -cF libcuda.so. || true; dpkg-query -W -f '${Package}\\n' "
                                     "| grep -E '^(libcuda1|nvidia-|libnvidia)' || true")
    assert proc.stdout.split() == ["0"], proc.stdout
    assert int(built["size"]) < SIZE_LIMIT


def test_cuda_device_code_is_sm86_and_sm89_with_ptx_for_newer_gpus(built: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "module"
    out.mkdir()
    copy = _run("--volume", f"{out}:/out", "--entrypoint", "cp",
                   built["image"], "/opt/llama/bin/libggml-cuda.so", "/out/")
    assert copy.returncode == 0, copy.stderr
    listing = _run("--volume", f"{out}:/out:ro", built["toolchain"],
                      "cuobjdump", "--list-elf", "--list-ptx", "/out/libggml-cuda.so")
    assert listing.returncode == 0, listing.stderr
    print(listing.stdout[-2000:])
    cubins = re.findall(r"^ELF file\s+\d+: .*\.(sm_\d+)\.cubin$", listing.stdout, re.M)
    assert set(cubins) == {"sm_86", "sm_89"}, listing.stdout[-3000:]
    # Each architecture gets the same kernels.
    assert cubins.count("sm_86") == cubins.count("sm_89") > 50
    # PTX only for the newest one ("86-real;89"): what the driver compiles for GPUs newer than sm_89.
    ptx = re.findall(r"^PTX file\s+\d+: .*\.(sm_\d+)\.ptx$", listing.stdout, re.M)
    assert set(ptx) == {"sm_89"}, listing.stdout[-3000:]


def test_the_image_runs_a_model_on_the_cpu_backend_without_a_gpu(built: dict[str, str], tiny_model: Path) -> None:
    proc = _run("--volume", f"{tiny_model}:/models/tiny.gguf:ro",
                   built["image"], "bench", "-m", "/models/tiny.gguf", "-p", "16", "-n", "4", "-r", "1", "-o", "json",
                   timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert {row["backends"] for row in rows} == {"CPU"} and all(row["avg_ts"] > 0 for row in rows)


def test_run_passes_the_gpu_through_cdi(built: dict[str, str]) -> None:
    proc = run_cli("run", "--target", "nvidia", "--engine", ENGINE, "--print", "smoke")
    assert proc.returncode == 0, proc.stderr
    assert "--device nvidia.com/gpu=all" in proc.stdout and built["image"] in proc.stdout
