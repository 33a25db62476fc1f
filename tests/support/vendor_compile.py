"""Compile one ggml GPU backend with Debian's own vendor toolchain, without the GPU.

The toolchain base is bootstrapped by builder itself (mmdebstrap, imported into the engine, cached by its
inputs), and the compile runs images/scripts/build-llama.sh, the script every image build runs, with the
variant's CMake flags from builder's target table. Only the backend module and what it links against are
built: no binaries, no CPU backend. Used by tests/engine/test_vendor_compile.py and bench/bench_vendor_compile.py.
"""

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from builder.core.paths import cache_subdir
from builder.engines import Engine
from builder.fetch.bootstrap import ensure_base
from builder.fetch.source import SourceTree
from builder.recipe.load import load_recipe, recipe_path_for, select
from builder.recipe.models import BootstrapBase
from builder.recipe.targets import COMMON_CMAKE

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "images" / "scripts" / "build-llama.sh"
_COMMON = ["build-essential", "cmake", "ninja-build"]


@dataclass(frozen=True)
class VendorToolchain:
    name: str
    target: str
    variant: str
    base: BootstrapBase
    cmake: dict[str, str]  # on top of the image flags and the variant's own
    module: str  # the file the compile must produce, in the install folder
    probe: str  # shell command (in the toolchain base) that lists the module's device code; $1 is the module


def _recipe_toolchain(target: str, variant: str) -> BootstrapBase:
    base = load_recipe(recipe_path_for(target)).variants[variant].base.toolchain
    assert isinstance(base, BootstrapBase), f"{target}/{variant}: the toolchain is not a bootstrapped base"
    return base


HIP = VendorToolchain(
    name="hip",
    target="strix-halo",
    variant="rocm",
    # The image's own toolchain base (the same bootstrapped base the image build uses): sid with ROCm 7.2
    # from experimental, hipcc and clang 22.
    base=_recipe_toolchain("strix-halo", "rocm"),
    # CMake's HIP language with Debian's clang (hipcc is a wrapper around the same compiler).
    cmake={"CMAKE_HIP_COMPILER": "/usr/lib/llvm-22/bin/clang++"},
    module="libggml-hip.so",
    probe='objcopy -O binary --only-section=.hip_fatbin "$1" /tmp/fatbin && '
          "clang-offload-bundler-22 --list --type=o --input=/tmp/fatbin",
)

# The default nvidia variant's own toolchain (recipes/nvidia.yaml): trixie non-free's CUDA 12.4 with g++-13 as
# nvcc's host compiler, so this compile and the image build share one bootstrapped base.
_NVIDIA = load_recipe(recipe_path_for("nvidia")).variants["cuda"]
assert isinstance(_NVIDIA.base.toolchain, BootstrapBase)
CUDA = VendorToolchain(
    name="cuda",
    target="nvidia",
    variant="cuda",
    base=_NVIDIA.base.toolchain,
    cmake=dict(_NVIDIA.cmake),
    module="libggml-cuda.so",
    probe='cuobjdump --list-elf "$1"',
)

TOOLCHAINS = {t.name: t for t in (HIP, CUDA)}


def cmake_flags(toolchain: VendorToolchain) -> dict[str, str]:
    """The image flags, the variant's from the target table, then only-the-backend overrides."""
    _, variant = select(toolchain.target, toolchain.variant)
    return {**COMMON_CMAKE, **variant.cmake,
            # Only the backend module: no CPU backend variants, no binaries.
            "GGML_CPU": "OFF", "GGML_CPU_ALL_VARIANTS": "OFF", **toolchain.cmake}


@dataclass(frozen=True)
class CompileResult:
    toolchain: str
    ok: bool
    seconds: float
    module: Path | None
    module_bytes: int
    device_code: str  # the probe's output
    log: Path
    base: str

    def as_dict(self) -> dict[str, object]:
        return {"toolchain": self.toolchain, "ok": self.ok, "seconds": round(self.seconds, 1),
                "module": str(self.module) if self.module else None, "module_bytes": self.module_bytes,
                "device_code": self.device_code, "log": str(self.log), "base": self.base}


def compile_backend(engine: Engine, toolchain: VendorToolchain, tree: SourceTree, out: Path) -> CompileResult:
    """Bootstrap the toolchain base if needed, compile the backend module into `out`, list its device code."""
    base = ensure_base(engine, toolchain.base)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log = cache_subdir("logs") / f"vendor-{toolchain.name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    flags = [f"-D{k}={v}" for k, v in cmake_flags(toolchain).items()]
    argv = [*engine.run_argv(), "--rm", "--network", "none",
            "--volume", f"{SCRIPT}:/usr/local/lib/builder/build-llama.sh:ro",
            "--volume", f"{tree.path}:/src/llama.cpp:ro",
            "--volume", f"{out}:/out",
            # Lowest CPU priority inside the container: the compile shares the machine with other work.
            base, "nice", "-n", "19", "/usr/local/lib/builder/build-llama.sh", "/src/llama.cpp", "/build", "/out", "",
            *flags]
    started = time.monotonic()
    with open(log, "w") as f:
        f.write("$ " + " ".join(argv) + "\n")
        f.flush()
        proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - started
    module = out / "bin" / toolchain.module
    if proc.returncode != 0 or not module.is_file():
        return CompileResult(toolchain.name, False, seconds, None, 0, "", log, base)
    probe = subprocess.run([*engine.run_argv(), "--rm", "--network", "none", "--volume", f"{out}:/out:ro",
                            base, "bash", "-c", toolchain.probe, "probe", f"/out/bin/{toolchain.module}"],
                           capture_output=True, text=True)
    return CompileResult(toolchain.name, True, seconds, module, module.stat().st_size,
                         probe.stdout + probe.stderr, log, base)
