"""The target x variant table: data that drives planning, rendering, running and `doctor`.

No other module branches on a target or variant name; they read these entries.
"""

from dataclasses import dataclass, field

# Every image builds llama.cpp the same way so that RPC works across nodes: the RPC backend on, portable CPU
# code (the best CPU variant is picked at run time), backends as loadable modules, no network at build time.
COMMON_CMAKE: dict[str, str] = {
    "CMAKE_BUILD_TYPE": "Release",
    "GGML_RPC": "ON",
    "GGML_NATIVE": "OFF",
    "GGML_BACKEND_DL": "ON",
    "GGML_CPU_ALL_VARIANTS": "ON",
    "LLAMA_CURL": "OFF",
    "LLAMA_OPENSSL": "OFF",
    "LLAMA_BUILD_UI": "OFF",
    "LLAMA_USE_PREBUILT_UI": "OFF",
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
}

DEFAULT_BINARIES: tuple[str, ...] = ("llama-server", "ggml-rpc-server", "llama-cli", "llama-bench")

# Every bootstrapped runtime base gets these, so the images work as Toolbx containers: `toolbox enter` and
# `toolbox run` start every command through capsh, and Toolbx gives its user sudo (group sudo, no password).
TOOLBOX_PACKAGES: tuple[str, ...] = ("libcap2-bin", "sudo")


@dataclass(frozen=True)
class Host:
    """What a node needs from its host kernel for a variant: checked by `doctor`, used by `run`."""

    devices: tuple[str, ...] = ()  # device nodes (or folders of them) passed into containers
    modules: tuple[tuple[str, ...], ...] = ()  # kernel modules; each inner tuple: any one of them
    min_kernel: tuple[int, int] | None = None
    kernel_params: tuple[str, ...] = ()  # kernel command-line keys that should be set
    security: tuple[str, ...] = ()  # --security-opt values
    env: dict[str, str] = field(default_factory=dict)
    cdi: str | None = None  # CDI device name (NVIDIA): podman --device NAME, docker --gpus all


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    cmake: dict[str, str] = field(default_factory=dict)
    # The device name llama.cpp must list inside the image for the smoke test to pass.
    smoke_device: str = "CPU"
    host: Host = field(default_factory=Host)


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    variants: dict[str, Variant]
    default_variant: str


def _target(name: str, description: str, *variants: Variant) -> Target:
    return Target(name, description, {v.name: v for v in variants}, variants[0].name)


_AMD_GPU = Host(
    devices=("/dev/dri", "/dev/kfd"),
    modules=(("amdgpu",),),
    # Unified memory: let the iGPU map ~124 GiB of the 128 GiB (GTT pages of 4 KiB).
    kernel_params=("amdgpu.gttsize", "ttm.pages_limit"),
    min_kernel=(6, 16),
    security=("seccomp=unconfined",),
)
# ggml-hip's own kernels for the Radeon 8060S only (each GPU family added costs compile time and size);
# flash attention on RDNA3.5 uses ggml's built-in WMMA kernels (this llama.cpp has no rocWMMA option).
_HIP_GFX1151 = {"GGML_HIP": "ON", "AMDGPU_TARGETS": "gfx1151"}
_INTEL_GPU = Host(devices=("/dev/dri",), modules=(("xe", "i915"),))

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        _target(
            "cpu",
            "Any x86-64 or arm64 machine; portable CPU backends chosen at run time",
            Variant("cpu", "llama.cpp CPU backends (all ISA variants) with RPC"),
        ),
        _target(
            "strix-halo",
            "AMD Ryzen AI Max+ 395 (Radeon 8060S iGPU, gfx1151), up to 128 GB unified memory",
            Variant("rocm", "ROCm 7.2/HIP for gfx1151 from Debian (experimental on sid)", _HIP_GFX1151, "ROCm",
                    _AMD_GPU),
            Variant("rocm-amd", "ROCm/HIP for gfx1151 from AMD's multi-arch packages", _HIP_GFX1151, "ROCm",
                    _AMD_GPU),
            Variant("vulkan", "Vulkan on Mesa RADV", {"GGML_VULKAN": "ON"}, "Vulkan",
                    Host(devices=("/dev/dri",), modules=(("amdgpu",),), kernel_params=_AMD_GPU.kernel_params,
                         min_kernel=(6, 16), security=("seccomp=unconfined",))),
        ),
        _target(
            "intel-arc",
            "Intel Arc A770 (16 GB) and other Xe discrete GPUs",
            Variant("sycl", "oneAPI SYCL (icx/icpx) with Level Zero",
                    {"GGML_SYCL": "ON", "GGML_SYCL_F16": "ON", "CMAKE_C_COMPILER": "icx",
                     "CMAKE_CXX_COMPILER": "icpx"}, "SYCL", _INTEL_GPU),
            Variant("vulkan", "Vulkan on Mesa ANV", {"GGML_VULKAN": "ON"}, "Vulkan", _INTEL_GPU),
        ),
        _target(
            "intel-npu",
            "Intel Core Ultra NPU (/dev/accel, intel_vpu) through OpenVINO",
            Variant("openvino", "OpenVINO backend, NPU as the default device",
                    # The OpenVINO backend cannot be built as a loadable module, so this image links every
                    # backend into libggml and carries one CPU backend: AVX2 (Haswell and newer, every Core
                    # Ultra), spelled out because ggml's default depends on the build environment.
                    {"GGML_OPENVINO": "ON", "GGML_BACKEND_DL": "OFF", "GGML_CPU_ALL_VARIANTS": "OFF",
                     "GGML_SSE42": "ON", "GGML_AVX": "ON", "GGML_AVX2": "ON", "GGML_BMI2": "ON", "GGML_FMA": "ON",
                     "GGML_F16C": "ON"},
                    "OPENVINO",
                    Host(devices=("/dev/accel",), modules=(("intel_vpu",),),
                         env={"GGML_OPENVINO_DEVICE": "NPU"})),
        ),
        _target(
            "nvidia",
            "NVIDIA GeForce RTX 3060 (12 GB, sm_86) class GPUs",
            Variant("cuda", "CUDA for compute capability 8.6",
                    {"GGML_CUDA": "ON", "CMAKE_CUDA_ARCHITECTURES": "86",
                     # libcuda comes from the host driver at run time, not from the build image.
                     "CMAKE_EXE_LINKER_FLAGS": "-Wl,--allow-shlib-undefined"},
                    "CUDA",
                    Host(modules=(("nvidia",),), cdi="nvidia.com/gpu=all")),
        ),
    )
}


def known_targets() -> str:
    return ", ".join(sorted(TARGETS))


def why_not(target: Target, variant: str) -> str:
    """Why `variant` does not fit `target`: which targets it belongs to, and what this target offers."""
    owners = [f"{t.name} ({t.description})" for t in TARGETS.values() if variant in t.variants]
    offers = f"{target.name} offers: {', '.join(target.variants)}"
    return f"{variant} belongs to {'; '.join(owners)}; {offers}" if owners else offers
