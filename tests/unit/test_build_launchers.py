"""images/scripts/build-llama.sh puts every compiler a backend uses behind the compiler cache: C and C++ always,
nvcc for CUDA, HIP's clang for ROCm. A GPU backend's objects are most of its build's time, so an upgrade that
misses the cache for them recompiles for 40+ minutes.

The GPU toolchains are multi-GB vendor packages that a test run cannot install, so `cmake` here is a stand-in
that records the configure line the script passes (and makes the files the install step copies); `ccache` is a
stand-in only for its statistics. What is asserted is the script's own decision.
"""

import os
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT

SCRIPT = ROOT / "images" / "scripts" / "build-llama.sh"
CMAKE = """#!/bin/bash
if [ "$1" = --build ]; then mkdir -p "$2/bin" && touch "$2/bin/llama-server" && exit 0; fi
printf '%s\\n' "$@" > "$CONFIGURE_LOG"
"""


def configure_flags(tmp_path: Path, *flags: str, cache: bool = True) -> list[str]:
    tools = tmp_path / "tools"
    tools.mkdir(exist_ok=True)
    for name, body in (("cmake", CMAKE), ("ccache", "#!/bin/sh\nexit 0\n"), ("strip", "#!/bin/sh\nexit 0\n")):
        (tools / name).write_text(body)
        (tools / name).chmod(0o755)
    log = tmp_path / "configure.log"
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}", "CONFIGURE_LOG": str(log)}
    env.pop("FTP_PROXY", None)
    if cache:
        env["FTP_PROXY"] = "http://127.0.0.1:9/cache"  # how builder hands the cache's URL to a build
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "src"), str(tmp_path / "build"),
                           str(tmp_path / "prefix"), "llama-server", *flags], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return log.read_text().splitlines()


@pytest.mark.parametrize(("backend", "launchers"), [
    ((), {"C", "CXX"}),
    (("-DGGML_VULKAN=ON",), {"C", "CXX"}),
    (("-DGGML_CUDA=ON",), {"C", "CXX", "CUDA"}),
    (("-DGGML_HIP=ON", "-DAMDGPU_TARGETS=gfx1151"), {"C", "CXX", "HIP"}),
])
def test_every_compiler_of_the_backend_goes_through_the_cache(tmp_path: Path, backend: tuple[str, ...],
                                                              launchers: set[str]) -> None:
    flags = configure_flags(tmp_path, *backend)
    found = {f.removeprefix("-DCMAKE_").removesuffix("_COMPILER_LAUNCHER=ccache") for f in flags
             if f.endswith("_COMPILER_LAUNCHER=ccache")}
    assert found == launchers
    assert set(backend) <= set(flags)


def test_without_a_cache_no_launcher_is_set(tmp_path: Path) -> None:
    assert not [f for f in configure_flags(tmp_path, "-DGGML_HIP=ON", cache=False) if "LAUNCHER" in f]
