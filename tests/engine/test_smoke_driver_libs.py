"""The smoke role of an image whose backend needs the host driver's library (CUDA's libcuda.so.1).

A build host has no GPU, so such a backend cannot load there and its device is not listed. The smoke role must
then pass and say plainly that no device is present, but only when the driver's library is the one missing:
any other missing library, or a missing device while the driver is there, fails it. The real CUDA image is
checked in tests/engine/test_engines_cuda.py (slow); here the same entrypoint runs in the cpu recipe's toolchain base
(trixie with gcc, built in CI anyway) against a module compiled on the spot that links a stand-in driver
library, and stand-in binaries that list only a CPU device, as ggml does when its CUDA module cannot load (and a
stand-in qualification program that gives its record back: the smoke compares the two).
"""

import subprocess

import pytest

from builder.engines.podman import PodmanEngine
from builder.fetch.bootstrap import ensure_base
from builder.recipe.load import load_recipe, recipe_path_for
from conftest import ROOT, require_engine

pytestmark = pytest.mark.engine

SETUP = r"""
set -e
mkdir -p /tmp/driver /tmp/other /opt/llama/bin
echo 'int driver_call(void) { return 1; }' > /tmp/driver.c
gcc -shared -fPIC -Wl,-soname,libfakedriver.so.1 -o /tmp/driver/libfakedriver.so.1 /tmp/driver.c
gcc -shared -fPIC -Wl,-soname,libother.so.1 -o /tmp/other/libother.so.1 /tmp/driver.c
echo 'int driver_call(void); int module_call(void) { return driver_call(); }' > /tmp/module.c
gcc -shared -fPIC -o /opt/llama/bin/libggml-fake.so /tmp/module.c -L/tmp/driver -l:libfakedriver.so.1
printf '#!/bin/sh\necho "version: 1 (test)"\n' > /opt/llama/bin/llama-server
printf '#!/bin/sh\necho "usage: ggml-rpc-server"\necho "Available devices:"\necho "  CPU: stand-in"\n' \
    > /opt/llama/bin/ggml-rpc-server
mkdir -p /usr/lib/builder
echo '{"ids": [5, 9, 2]}' > /usr/lib/builder/qualify.json
printf '#!/bin/sh\ncat /usr/lib/builder/qualify.json\n' > /opt/llama/bin/llama-qualify
chmod +x /opt/llama/bin/llama-server /opt/llama/bin/ggml-rpc-server /opt/llama/bin/llama-qualify
export PATH=/opt/llama/bin:$PATH LLAMA_SMOKE_DEVICE=FAKE LLAMA_DRIVER_LIBS=libfakedriver.so.1
"""


@pytest.fixture(scope="module")
def base() -> str:
    require_engine("podman")
    toolchain = load_recipe(recipe_path_for("cpu")).variants["cpu"].base.toolchain
    return ensure_base(PodmanEngine(), toolchain)


def smoke(base: str, then: str) -> subprocess.CompletedProcess[str]:
    entrypoint = ROOT / "images" / "scripts" / "entrypoint.sh"
    argv = [*PodmanEngine().run_argv(), "--rm", "--network", "none",
            "--volume", f"{entrypoint}:/usr/local/bin/llama-entrypoint:ro", "--entrypoint", "bash", base,
            "-c", SETUP + then]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def test_without_the_driver_the_smoke_passes_and_says_no_device_is_present(base: str) -> None:
    proc = smoke(base, "llama-entrypoint smoke")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "smoke: ok   libraries: all resolve in the image, except the host driver's libfakedriver.so.1" \
        in proc.stdout
    assert "smoke: note no FAKE device present: the host driver's libfakedriver.so.1 is not in this container" \
        in proc.stdout


def test_with_the_driver_present_a_missing_device_fails(base: str) -> None:
    proc = smoke(base, "LD_LIBRARY_PATH=/tmp/driver llama-entrypoint smoke")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "smoke: FAIL no FAKE device listed by the ggml backends" in proc.stderr


def test_any_other_missing_library_fails(base: str) -> None:
    proc = smoke(base, "gcc -shared -fPIC -o /opt/llama/bin/libggml-other.so /tmp/module.c "
                       "-L/tmp/other -l:libother.so.1 && llama-entrypoint smoke")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "smoke: FAIL libraries missing from the image: libggml-other.so needs libother.so.1" in proc.stderr


def test_without_driver_libraries_a_missing_device_still_fails(base: str) -> None:
    proc = smoke(base, "LLAMA_DRIVER_LIBS= llama-entrypoint smoke")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "smoke: FAIL no FAKE device listed" in proc.stderr
