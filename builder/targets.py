"""The target x variant table: data that drives planning, rendering and running (no branches elsewhere)."""

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


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    cmake: dict[str, str] = field(default_factory=dict)
    # The device name llama.cpp must list inside the image for the smoke test to pass.
    smoke_device: str = "CPU"


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    variants: dict[str, Variant]
    default_variant: str


def _target(name: str, description: str, *variants: Variant) -> Target:
    return Target(name, description, {v.name: v for v in variants}, variants[0].name)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        _target(
            "cpu",
            "Any x86-64 or arm64 machine; portable CPU backends chosen at run time",
            Variant("cpu", "llama.cpp CPU backends (all ISA variants) with RPC"),
        ),
    )
}


def known_targets() -> str:
    return ", ".join(sorted(TARGETS))
