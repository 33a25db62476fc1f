"""Debian's own vendor toolchains compile llama.cpp's GPU backends (no GPU needed to compile).

Slow: each bootstraps a multi-GB toolchain base and compiles one backend module on our 2 cores (measured
times are in docs/benchmarks.md). The module must exist and carry device code for exactly the architecture
the target table asks for: gfx1151 (Strix Halo) for ggml-hip, sm_86 and sm_89 (RTX 3060, RTX 40xx) for ggml-cuda.
"""

import json
import re
from pathlib import Path

import pytest

from builder.engines.podman import PodmanEngine
from builder.pipeline.build import Prepared
from conftest import require_engine
from vendor_compile import TOOLCHAINS, compile_backend

pytestmark = [pytest.mark.slow, pytest.mark.engine]

# The architectures each module must carry, and the pattern that finds every one in the probe's listing.
EXPECTED = {"hip": ({"gfx1151"}, r"amdhsa--(gfx[0-9a-f]+)"),
            "cuda": ({"sm_86", "sm_89"}, r"\b(sm_[0-9]+)\b")}


@pytest.mark.parametrize("name", sorted(TOOLCHAINS))
def test_debian_toolchain_compiles_the_backend_for_the_target_gpu(name: str, cpu_prepared: Prepared,
                                                                   tmp_path: Path) -> None:
    require_engine("podman")
    result = compile_backend(PodmanEngine(), TOOLCHAINS[name], cpu_prepared.tree, tmp_path / "out")
    print(json.dumps(result.as_dict(), indent=2))
    log_tail = "\n".join(result.log.read_text(errors="replace").splitlines()[-40:])
    assert result.ok, f"{name}: no {TOOLCHAINS[name].module}; log {result.log}:\n{log_tail}"
    wanted, pattern = EXPECTED[name]
    assert set(re.findall(pattern, result.device_code)) == wanted, result.device_code
