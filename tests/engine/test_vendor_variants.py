"""The vendor variants (strix-halo/rocm and nvidia/cuda from Debian; render-only: strix-halo/rocm-amd, intel-arc/sycl,
nvidia/cuda-nvidia) and their pins.

Most of their registries and vendor repositories are unreachable from our machines (nvidia/cuda comes
from Debian and is built in tests/engine/test_engines_cuda.py), so these tests check what a user sees before any
build: rendered contexts carry the vendor pins, unchecked placeholder pins are refused by `builder build`
with the field named, and a base that cannot be pulled fails at once with one line.
The full contexts are compared in tests/unit/test_render.py and statically checked in tests/unit/test_static.py.
"""

import json
from pathlib import Path

import pytest
import yaml
from test_recipes import assert_one_clear_error, write_recipe

from builder.recipe.targets import TARGETS
from conftest import free_port, require_engine, run_cli, run_cli_inproc

ZEROS = "0" * 64


def plan(target: str, variant: str) -> dict[str, object]:
    proc = run_cli_inproc("plan", "--target", target, "--variant", variant, "--json")
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, object] = json.loads(proc.stdout)
    return doc


def test_rocm_is_built_for_gfx1151_from_debian_experimental_on_sid() -> None:
    doc = plan("strix-halo", "rocm")
    assert doc["cmake"]["GGML_HIP"] == "ON" and doc["cmake"]["AMDGPU_TARGETS"] == "gfx1151"  # type: ignore[index]
    assert doc["cmake"]["CMAKE_HIP_COMPILER"] == "/usr/lib/llvm-22/bin/clang++"  # type: ignore[index]
    for stage in ("toolchain", "runtime"):
        base = doc[stage]
        assert (base["kind"], base["suite"]) == ("bootstrap", "sid")  # type: ignore[index]
        (extra,) = base["extra_suites"]  # type: ignore[index]
        # ROCm 7.2 (rocBLAS with gfx1151 kernels) is only in experimental; sid's 6.4 has none for gfx1151.
        assert extra["suite"] == "experimental" and "librocblas5" in extra["packages"]
        # every family's rocBLAS kernel files but gfx1151's are left out when the base is made
        (prune,) = base["prune"]  # type: ignore[index]
        assert prune["drop"].endswith("/rocblas/5/library/*gfx*") and prune["keep"][0].endswith("*gfx1151*")
    assert {"libamdhip64-7", "librocblas5", "libhipblas3", "rocminfo"} <= set(doc["runtime"]["packages"])  # type: ignore[index]
    assert not [p for p in doc["runtime"]["packages"] if "dev" in p or "hipblaslt" in p]  # type: ignore[index]


def test_rocm_amd_is_built_for_gfx1151_from_amds_repository() -> None:
    doc = plan("strix-halo", "rocm-amd")
    assert doc["cmake"]["GGML_HIP"] == "ON" and doc["cmake"]["AMDGPU_TARGETS"] == "gfx1151"  # type: ignore[index]
    toolchain = doc["toolchain"]
    assert "amdrocm-core-dev7.14-gfx1151" in toolchain["packages"]  # type: ignore[index]
    assert toolchain["repositories"][0]["url"].startswith("https://repo.amd.com/rocm/")  # type: ignore[index]
    assert doc["runtime"]["packages"] == ["libgomp1", "amdrocm-runtime7.14", "amdrocm-blas7.14-gfx1151"]  # type: ignore[index]


def test_cuda_default_is_debians_toolkit_for_sm86_and_sm89_without_the_driver() -> None:
    """trixie's CUDA 12.4 (non-free) with gcc 13 as nvcc's host compiler; the runtime carries no driver package."""
    doc = plan("nvidia", "cuda")
    cmake = doc["cmake"]
    assert cmake["CMAKE_CUDA_ARCHITECTURES"] == "86-real;89"  # type: ignore[index]
    assert cmake["CMAKE_CUDA_HOST_COMPILER"] == "/usr/bin/g++-13"  # type: ignore[index]
    assert cmake["CMAKE_EXE_LINKER_FLAGS"] == "-Wl,--allow-shlib-undefined"  # type: ignore[index]
    toolchain, runtime = doc["toolchain"], doc["runtime"]
    assert (toolchain["kind"], toolchain["suite"]) == ("bootstrap", "trixie")  # type: ignore[index]
    assert {"nvidia-cuda-toolkit", "g++-13"} <= set(toolchain["packages"])  # type: ignore[index]
    assert "non-free" in toolchain["components"] and "non-free" in runtime["components"]  # type: ignore[index]
    assert {"libcudart12", "libcublas12", "libcublaslt12"} <= set(runtime["packages"])  # type: ignore[index]
    assert not [p for p in runtime["packages"] if p.startswith(("libcuda1", "nvidia-", "libnvidia"))]  # type: ignore[index]
    assert doc["env"] == {"LLAMA_DRIVER_LIBS": "libcuda.so.1"}


def test_cuda_nvidia_uses_nvidias_images_for_the_same_architectures() -> None:
    doc = plan("nvidia", "cuda-nvidia")
    assert doc["cmake"]["CMAKE_CUDA_ARCHITECTURES"] == "86-real;89"  # type: ignore[index]
    assert "CMAKE_CUDA_HOST_COMPILER" not in doc["cmake"]  # type: ignore[operator]
    assert str(doc["toolchain_ref"]).startswith("docker.io/nvidia/cuda:12.8.1-devel-ubuntu24.04@sha256:")
    assert str(doc["runtime_ref"]).startswith("docker.io/nvidia/cuda:12.8.1-runtime-ubuntu24.04@sha256:")


def test_sycl_uses_intels_compilers_and_ships_level_zero() -> None:
    doc = plan("intel-arc", "sycl")
    cmake = doc["cmake"]
    assert (cmake["CMAKE_CXX_COMPILER"], cmake["GGML_SYCL_F16"]) == ("icpx", "ON")  # type: ignore[index]
    debs = [d["url"].rsplit("/", 1)[-1] for d in doc["runtime"]["debs"]]  # type: ignore[index]
    assert "level-zero_1.28.2%2Bu24.04_amd64.deb" in debs
    assert "libze-intel-gpu1_25.40.35563.10-0_amd64.deb" in debs


@pytest.mark.parametrize(("target", "field"), [
    ("intel-arc", "variants.sycl.base.toolchain.ref (and 6 more)"),
    ("strix-halo", "variants.rocm-amd.base.toolchain.repositories[0].key_sha256 (and 1 more)"),
])
def test_build_refuses_placeholder_pins_before_anything_runs(target: str, field: str) -> None:
    variant = "rocm-amd" if target == "strix-halo" else TARGETS[target].default_variant
    proc = run_cli_inproc("build", "--target", target, "--variant", variant)
    assert_one_clear_error(proc, f"recipes/{target}.yaml: {field}: placeholder pin (all zeros)")
    assert f"`builder pin --target {target}`" in proc.stderr
    assert "building" not in proc.stderr


def test_placeholder_pins_still_render_and_plan() -> None:
    doc = plan("intel-arc", "sycl")
    assert str(doc["toolchain_ref"]).endswith(f"@sha256:{ZEROS}")


@pytest.mark.engine
def test_a_base_that_cannot_be_pulled_fails_at_once_with_one_line(tmp_path: Path) -> None:
    """A registry that does not answer (a closed port on 127.0.0.1): one line naming the image, exit 1."""
    require_engine("podman")
    ref = f"127.0.0.1:{free_port()}/vendor/base@sha256:{'a' * 64}"
    recipe = {"target": "nvidia", "variants": {"cuda": {"base": {"toolchain": {"kind": "image", "ref": ref},
                                                                  "runtime": {"kind": "image", "ref": ref}}}}}
    path = write_recipe(tmp_path, yaml.safe_dump(recipe))
    proc = run_cli("build", "--recipe", str(path), "--engine", "podman", timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot pull base image {ref}: ")
    assert "connection refused" in errors[0]
