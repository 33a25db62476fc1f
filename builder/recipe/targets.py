"""The target x variant table: data that drives planning, rendering, running and `doctor`.

No other module branches on a target or variant name; they read these entries.
"""

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

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
class HostDriver:
    """A device's user-space driver that the image does not carry: `builder run` mounts the host's copy.

    Like NVIDIA's toolkit with libcuda: the host's libraries are found (ld.so.conf folders, then the standard
    ones) and bind-mounted read-only into the container's multiarch library folder, where the image's loader
    finds them by name. `doctor` checks them and the firmware; a netboot root must carry them itself.
    """

    name: str  # for people: "Intel NPU user-space driver"
    libraries: tuple[str, ...]  # file names as the loader asks for them (sonames)
    firmware: tuple[str, ...] = ()  # globs under /lib/firmware; any match will do
    install: str = ""  # how to install it on a host: the fix doctor prints
    firmware_install: str = ""  # how to install the firmware


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
    driver: HostDriver | None = None  # user-space driver libraries taken from the host at run time
    device_rule: str = ""  # a udev rule that gives root-owned device nodes to a group users can join
    min_driver: tuple[int, int] | None = None  # kernel driver version the toolkit needs (NVIDIA: /sys/module)
    # GPU generations: (name, the kernel driver that runs it, a glob of the firmware it loads under /lib/firmware)
    gpu_generations: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    cmake: dict[str, str] = field(default_factory=dict)
    # The device name llama.cpp must list inside the image for the smoke test to pass.
    smoke_device: str = "CPU"
    host: Host = field(default_factory=Host)
    # Libraries the host's driver brings into the container at run time (CDI/--gpus): never shipped, so on a
    # machine without the device they are the only ones allowed to stay unresolved.
    driver_libs: tuple[str, ...] = ()


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
# Machine code for RTX 3060 (8.6) and RTX 40xx (8.9), and PTX of 8.9 only: the driver compiles it for newer GPUs
# (PTX of 8.6 would add size and never be chosen). Every architecture adds compile time and module size, so more
# (e.g. 90 for H100) come from a recipe's cmake: {CMAKE_CUDA_ARCHITECTURES: "86-real;89-real;90"}.
_CUDA_CMAKE = {"GGML_CUDA": "ON", "CMAKE_CUDA_ARCHITECTURES": "86-real;89",
               # libcuda comes from the host driver at run time, never from the build image.
               "CMAKE_EXE_LINKER_FLAGS": "-Wl,--allow-shlib-undefined"}
_CUDA_DRIVER_LIBS = ("libcuda.so.1",)
# ggml-hip's own kernels for the Radeon 8060S only (each GPU family added costs compile time and size);
# flash attention on RDNA3.5 uses ggml's built-in WMMA kernels (this llama.cpp has no rocWMMA option).
_HIP_GFX1151 = {"GGML_HIP": "ON", "AMDGPU_TARGETS": "gfx1151"}
# The Intel GPU generations the field runs, the driver that runs each by default and its GuC firmware
# (linux-firmware's names; Debian: firmware-intel-graphics). Arrow Lake is a Meteor Lake to i915, and loads its
# files. builder/netboot/kernels.py puts the same generations' firmware into the intel netboot roots.
INTEL_GPU_GENERATIONS = (
    ("Arc A-series (DG2)", "i915", "i915/dg2_guc_*"),
    ("Core Ultra Meteor/Arrow Lake", "i915", "i915/mtl_guc_*"),
    ("Core Ultra Lunar Lake", "xe", "xe/lnl_guc_*"),
    ("Arc B-series (Battlemage)", "xe", "xe/bmg_guc_*"),
)
_INTEL_GPU = Host(devices=("/dev/dri",), modules=(("xe", "i915"),), gpu_generations=INTEL_GPU_GENERATIONS)
# Intel's NPU driver (linux-npu-driver releases: intel-level-zero-npu, intel-driver-compiler-npu, intel-fw-npu)
# is in no Debian archive and not on PyPI; the image carries Debian's Level Zero loader (libze1) and OpenVINO's
# NPU plugin, and takes the driver and its compiler library from the host (docs/design.md).
_INTEL_NPU_DRIVER = HostDriver(
    "Intel NPU user-space driver", ("libze_intel_npu.so.1", "libnpu_driver_compiler.so"),
    firmware=("intel/vpu/vpu_*.bin*", "updates/intel/vpu/vpu_*.bin*"),
    install="install Intel's linux-npu-driver release (intel-level-zero-npu, intel-driver-compiler-npu, "
            "intel-fw-npu .debs) or your distribution's package of it",
    firmware_install="apt-get install firmware-intel-misc (Debian non-free-firmware) or Intel's intel-fw-npu "
                     "package, then reboot")

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
                         env={"GGML_OPENVINO_DEVICE": "NPU"}, driver=_INTEL_NPU_DRIVER,
                         device_rule='SUBSYSTEM=="accel", KERNEL=="accel*", GROUP="render", MODE="0660"')),
        ),
        _target(
            "nvidia",
            "NVIDIA GeForce RTX 3060 (sm_86) and RTX 40xx (sm_89) GPUs; the driver comes from the host",
            Variant("cuda", "CUDA 12.4 from Debian trixie (non-free), sm_86 and sm_89", _CUDA_CMAKE, "CUDA",
                    Host(modules=(("nvidia",),), cdi="nvidia.com/gpu=all", min_driver=(550, 54)),
                    driver_libs=_CUDA_DRIVER_LIBS),
            Variant("cuda-nvidia", "CUDA 12.8 from NVIDIA's own images (Ubuntu 24.04), sm_86 and sm_89",
                    _CUDA_CMAKE, "CUDA",
                    Host(modules=(("nvidia",),), cdi="nvidia.com/gpu=all", min_driver=(570, 26)),
                    driver_libs=_CUDA_DRIVER_LIBS),
        ),
    )
}


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'X'?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def known_targets() -> str:
    return ", ".join(sorted(TARGETS))


def why_not(target: Target, variant: str) -> str:
    """Why `variant` does not fit `target`: which targets it belongs to, and what this target offers."""
    owners = [f"{t.name} ({t.description})" for t in TARGETS.values() if variant in t.variants]
    offers = f"{target.name} offers: {', '.join(target.variants)}"
    return f"{variant} belongs to {'; '.join(owners)}; {offers}" if owners else offers


@dataclass(frozen=True)
class State:
    """How builder's own test suite checks a variant (on machines without GPUs, NPUs or vendor sites): docs/targets.md
    and `builder targets`. What a user can do with it comes from the recipes (builder/use/listing.py)."""

    kind: Literal["run", "built", "render-only"]
    because: str = ""  # render-only: why the suite cannot build it
    ran_on: str = ""  # run: the device it ran on in the suite (a software stand-in where the real one is missing)

    def text(self) -> str:
        if self.kind == "run":
            return f"CI builds it and runs it on {self.ran_on}"
        if self.kind == "built":
            return "slow tests build it; it needs its device to run"
        return f"rendered and checked only: {self.because}"


_VENDOR_SITE = "the vendor's images and package repository are not reachable from builder's test machines"

# One entry per target/variant, checked against the targets table of docs/targets.md and the target table by the tests.
# strix-halo/rocm and nvidia/cuda are Debian's own ROCm 7.2 (experimental) and CUDA 12.4 (trixie non-free);
# the vendors' packages are their second variants (rocm-amd, cuda-nvidia).
STATES: dict[tuple[str, str], State] = {
    ("cpu", "cpu"): State("run", ran_on="the CPU"),
    ("strix-halo", "rocm"): State("built"),
    ("strix-halo", "rocm-amd"): State("render-only", _VENDOR_SITE),
    ("strix-halo", "vulkan"): State("run", ran_on="Mesa's lavapipe (software Vulkan)"),
    ("intel-arc", "sycl"): State("render-only", "no SYCL compiler (icpx) is in Debian or on PyPI, and Intel's "
                                 "oneAPI images are not reachable from builder's test machines"),
    ("intel-arc", "vulkan"): State("run", ran_on="Mesa's lavapipe (software Vulkan)"),
    ("intel-npu", "openvino"): State("run", ran_on="OpenVINO's CPU device (no NPU in the test machines)"),
    ("nvidia", "cuda"): State("built"),
    ("nvidia", "cuda-nvidia"): State("render-only", _VENDOR_SITE),
}

# Hardware people ask about that no target serves yet: `builder targets` names it and says why.
UNSUPPORTED = {
    "amd-xdna": "AMD's Ryzen AI NPU (XDNA): llama.cpp and vLLM have no XDNA backend upstream, and Debian ships "
                "only the XRT runtime (libxrt-npu2); its iGPU is served by the strix-halo target",
}


def state_of(target: str, variant: str) -> State:
    return STATES.get((target, variant), State("render-only", "no state is recorded for it yet"))


@dataclass(frozen=True)
class DevicePlugin:
    """How a Kubernetes pod asks for a variant's device: the extended resource its vendor's device plugin
    registers (one unit per pod), and where that name comes from."""

    resource: str
    source: str


# The one table of device-plugin resource names (`builder cluster export --format kube`); a variant that is not
# here needs no device (cpu). Each plugin passes the device nodes (and, for NVIDIA, the driver's libraries
# through its container toolkit) into the pod, which `builder run` passes with --device/CDI.
DEVICE_PLUGINS: dict[tuple[str, str], DevicePlugin] = {
    **dict.fromkeys((("strix-halo", "rocm"), ("strix-halo", "rocm-amd"), ("strix-halo", "vulkan")), DevicePlugin(
        "amd.com/gpu", "AMD's ROCm device plugin (github.com/ROCm/k8s-device-plugin): /dev/kfd and /dev/dri")),
    **dict.fromkeys((("intel-arc", "sycl"), ("intel-arc", "vulkan")), DevicePlugin(
        "gpu.intel.com/i915", "Intel's GPU plugin (github.com/intel/intel-device-plugins-for-kubernetes): "
        "/dev/dri of an i915 GPU (Arc A-series); a GPU the xe driver runs is gpu.intel.com/xe")),
    ("intel-npu", "openvino"): DevicePlugin(
        "npu.intel.com/accel", "Intel's NPU plugin (github.com/intel/intel-device-plugins-for-kubernetes): "
        "/dev/accel"),
    **dict.fromkeys((("nvidia", "cuda"), ("nvidia", "cuda-nvidia")), DevicePlugin(
        "nvidia.com/gpu", "NVIDIA's device plugin (github.com/NVIDIA/k8s-device-plugin, or its GPU Operator), "
        "with the NVIDIA Container Toolkit on the node for the driver's libraries")),
}
