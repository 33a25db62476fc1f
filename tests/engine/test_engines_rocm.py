"""The strix-halo/rocm image (Debian's ROCm 7.2 from experimental, on sid), built and proven without its GPU.

There is no AMD GPU here, so nothing runs on gfx1151. What a user would otherwise find out on the node is
checked here instead: the image builds; its smoke role loads the ROCm backend and says plainly that no
ROCm device is present; every shared library of /opt/llama/bin resolves (ROCm needs no library from the
kernel driver: the HIP runtime talks to /dev/kfd itself); ggml-hip's device code is for gfx1151 only; rocBLAS
carries its gfx1151 kernels and no other family's (the bases leave those out); nothing in the image needs
hipBLASLt, which Debian's rocBLAS is built without, so the image does not ship it; and the CPU fallback
serves a model. Slow: the toolchain base is ~2 GB and ggml-hip is a long compile on our 2 cores
(docs/benchmarks.md).
"""

import json
import re
import struct
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from builder.engines import ENGINES
from conftest import require_engine, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.engine]
ENGINE = "podman"
ROCM = ["--target", "strix-halo", "--engine", ENGINE]
LIB = "/usr/lib/x86_64-linux-gnu"
ROCBLAS_KERNELS = f"{LIB}/rocblas/5/library"
BUNDLE_MAGIC = b"__CLANG_OFFLOAD_BUNDLE__"


@pytest.fixture(scope="module")
def image() -> str:
    require_engine(ENGINE)
    proc = run_cli("build", *ROCM, "--json", timeout=4 * 3600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    ref: str = json.loads(proc.stdout)["image"]
    return ref


def shell(image: str, script: str) -> subprocess.CompletedProcess[str]:
    """A script run in the image without network or devices, as on a build host."""
    argv = [*ENGINES[ENGINE]().run_argv(), "--rm", "--network", "none", image, "shell", "-c", script]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600)


def test_smoke_loads_the_rocm_backend_and_says_no_device_is_present(image: str) -> None:
    proc = run_cli("run", *ROCM, "smoke")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    note = [line for line in lines if "ROCm backend loaded" in line]
    assert note and "NO ROCm DEVICE is present on this machine" in note[0], proc.stdout
    # the HIP runtime's own reason, passed through
    assert "no ROCm-capable device is detected" in note[0], note[0]
    assert {"smoke: ok   llama-server", "smoke: ok   ggml-rpc-server"} <= set(lines)
    # On a node the missing device can be made a failure.
    strict = run_cli("run", *ROCM, "--env", "LLAMA_SMOKE_REQUIRE_DEVICE=1", "smoke")
    assert strict.returncode != 0 and "smoke: FAIL no ROCm device listed" in strict.stderr


def test_rocm_comes_from_experimental_and_the_rest_from_sid(image: str) -> None:
    """The extra_suites pinning, end to end: ROCm 7.2.4 libraries from experimental, the C library from sid."""
    names = ["libamdhip64-7", "libhsa-runtime64-1", "libamd-comgr3", "librocblas5", "libhipblas3", "librocsolver0",
             "rocminfo", "libc6"]
    proc = shell(image, "dpkg-query -W " + " ".join(names))
    assert proc.returncode == 0, proc.stderr
    # multi-arch libraries are listed as NAME:ARCH
    versions = {n.split(":")[0]: v for n, v in (line.split("\t") for line in proc.stdout.splitlines())}
    assert all(versions[name].startswith("7.2.4") for name in names[:-1]), versions
    assert all("~exp" in versions[name] for name in names[:6]), versions  # rocminfo 7.2.4 is sid's own
    assert "~exp" not in versions["libc6"], versions


def test_every_shared_library_resolves(image: str) -> None:
    proc = shell(image, "for f in /opt/llama/bin/*; do echo \"== $f\"; ldd \"$f\"; done")
    assert proc.returncode == 0, proc.stderr
    assert "not found" not in proc.stdout, [line for line in proc.stdout.splitlines() if "not found" in line]
    hip = proc.stdout.split("== /opt/llama/bin/libggml-hip.so", 1)[1].split("== ", 1)[0]
    for library in ("libamdhip64.so.7", "librocblas.so.5", "libhipblas.so.3"):
        assert re.search(rf"{re.escape(library)} => {LIB}/", hip), hip
    # Nothing the binaries load needs hipBLASLt (Debian's rocBLAS is built without it): it is not shipped.
    assert "hipblaslt" not in proc.stdout
    absent = shell(image, f"ls {LIB}/libhipblaslt* 2>&1; dpkg-query -W libhipblaslt1 2>&1; true")
    assert "No such file" in absent.stdout and "no packages found" in absent.stdout, absent.stdout


def offload_targets(library: bytes) -> Counter[str]:
    """Every clang offload bundle in a library (one per HIP source file) -> how often each target occurs.

    `clang-offload-bundler --list` shows only the first bundle of the section, so the headers are read here:
    magic, entry count, then per entry its offset, size, target length and target (little endian).
    """
    targets: Counter[str] = Counter()
    start = library.find(BUNDLE_MAGIC)
    while start >= 0:
        (entries,) = struct.unpack_from("<Q", library, start + len(BUNDLE_MAGIC))
        at = start + len(BUNDLE_MAGIC) + 8
        for _ in range(entries):
            _, _, length = struct.unpack_from("<QQQ", library, at)
            targets[library[at + 24:at + 24 + length].decode()] += 1
            at += 24 + length
        start = library.find(BUNDLE_MAGIC, start + 1)
    return targets


def test_ggml_hip_device_code_is_for_gfx1151(image: str, tmp_path: Path) -> None:
    engine = ENGINES[ENGINE]()
    name = f"rocm-copy-{tmp_path.name}"
    subprocess.run([*engine.command(), "create", "--name", name, image], check=True, capture_output=True)
    try:
        subprocess.run([*engine.command(), "cp", f"{name}:/opt/llama/bin/libggml-hip.so", str(tmp_path)],
                       check=True, capture_output=True)
    finally:
        subprocess.run([*engine.command(), "rm", name], capture_output=True)
    library = (tmp_path / "libggml-hip.so").read_bytes()
    assert b"CCOB" not in library, "compressed bundles: list them with clang-offload-bundler instead"
    targets = offload_targets(library)
    devices = {t: n for t, n in targets.items() if not t.startswith("host-")}
    # one bundle per HIP source file, each with gfx1151 code and nothing else (139 for this llama.cpp)
    assert list(devices) == ["hipv4-amdgcn-amd-amdhsa--gfx1151"], targets
    assert devices["hipv4-amdgcn-amd-amdhsa--gfx1151"] > 100, targets
    print(f"libggml-hip.so: {len(library)} bytes, {targets}")


def test_rocblas_carries_gfx1151_kernels_and_no_other_family(image: str) -> None:
    proc = shell(image, f"ls {ROCBLAS_KERNELS}")
    assert proc.returncode == 0, proc.stderr
    files = proc.stdout.split()
    families = {m for f in files for m in re.findall(r"gfx[0-9a-f]+", f)}
    assert families == {"gfx1151"}, sorted(families)
    assert "TensileLibrary_lazy_gfx1151.dat" in files
    assert any(f.endswith("gfx1151.hsaco") or f.endswith(".co") for f in files), files
    # catalogues without a family in their name are shared by all families: they stay
    assert any(f.endswith("_fallback.dat") for f in files)


def test_cpu_fallback_serves_a_model_in_the_rocm_image(image: str, tiny_model: Path) -> None:
    """Without the device the image still runs a model on its CPU backend (e.g. a netbooted node without its GPU)."""
    proc = run_cli("run", *ROCM, "bench", "-m", str(tiny_model), "-p", "16", "-n", "4", "-r", "1", "-o", "json",
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert rows and all(row["avg_ts"] > 0 for row in rows), rows


def test_image_size_is_what_docs_say(image: str) -> None:
    """The weight is known piece by piece (docs/benchmarks.md); a base that stopped pruning would add ~850 MB."""
    info = ENGINES[ENGINE]().inspect(image)
    assert info is not None
    pieces = shell(image, f"du -b {LIB}/librocsolver.so.0.* {LIB}/librocblas.so.5.* {ROCBLAS_KERNELS} "
                          f"{LIB}/libLLVM.so.22* /opt/llama | sort -rn")
    print(f"image {image}: {info.size / 1e6:.0f} MB\n{pieces.stdout}")
    assert info.size < 1_600_000_000, f"{info.size / 1e6:.0f} MB"
    kernels = int(next(line.split()[0] for line in pieces.stdout.splitlines() if line.endswith("library")))
    assert kernels < 50_000_000, f"rocBLAS kernel files: {kernels / 1e6:.0f} MB (all families: ~860 MB)"
