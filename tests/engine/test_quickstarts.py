"""Every quickstart's part on one machine, run as written (docs/quickstarts/*.md, tests/support/quickstarts.py).

Each page's ```console commands run in order with bash, from the top of a folder that holds a copy of
docs/quickstarts and docs/examples, as a user runs them from the top of their checkout; `builder` on the PATH is
this checkout's, `python3` and `curl` the machine's. After each command the test checks its exit status and
that it printed what the page shows. The clusters are the cpu image's (built once for the session by the
llama_cpu_image fixture) with tiny models made by docs/quickstarts/tiny_gguf.py; their gateways listen on
127.0.0.1:18081–18084 and their servers on 127.0.0.11–14. A cluster a page started is taken down afterwards
whatever happened.
"""

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT, require_engine, require_tool, run_cli
from quickstarts import FOLDER, PAGES, mismatch, steps

pytestmark = pytest.mark.engine

COMMAND_TIMEOUT = 600  # `cluster up` waits up to 180 s for health; the image is built by llama_cpu_image


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like the top of a checkout, with the quickstarts and the examples they point at."""
    top = tmp_path_factory.mktemp("checkout")
    shutil.copytree(FOLDER, top / "docs" / "quickstarts",
                    ignore=shutil.ignore_patterns("models", "api-key", "__pycache__"))
    shutil.copytree(ROOT / "docs" / "examples", top / "docs" / "examples")
    return top


@pytest.fixture(scope="module")
def path_with_builder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """PATH with this checkout's `builder` first (the installed one may be another checkout's)."""
    folder = tmp_path_factory.mktemp("bin")
    shim = folder / "builder"
    shim.write_text(f'#!/bin/sh\nPYTHONPATH="{ROOT}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{sys.executable}" '
                    f'-m builder "$@"\n')
    shim.chmod(0o755)
    return f"{folder}:{os.environ['PATH']}"


@pytest.fixture
def taken_down(checkout: Path) -> Iterator[list[str]]:
    """Cluster files a page brought up: `builder cluster down --local` on each afterwards."""
    started: list[str] = []
    yield started
    for name in started:
        down = run_cli("cluster", "down", "--local", str(checkout / "docs" / "quickstarts" / name), timeout=300)
        assert down.returncode == 0, down.stderr


@pytest.mark.parametrize("page", PAGES)
def test_quickstart_runs_on_one_machine_as_written(page: str, checkout: Path, path_with_builder: str,
                                                  taken_down: list[str], llama_cpu_image: str) -> None:
    require_engine("podman")
    require_tool("haproxy", "haproxy")
    require_tool("curl", "curl")
    found = steps((FOLDER / page).read_text())
    commands = [step.command for step in found]
    assert any(re.match(r"builder cluster up --local \S+-local\.yaml$", c) for c in commands), commands
    assert any("curl" in c and "/completions" in c for c in commands), "no completion through the gateway"
    assert commands[-1].startswith("builder cluster down --local"), "a page leaves its cluster running"
    env = {**os.environ, "PATH": path_with_builder}
    cwd, where = checkout, checkout / ".cwd"
    for step in found:
        up = re.match(r"builder cluster up --local (\S+)$", step.command)
        if up:
            taken_down.append(up.group(1))
        script = f'{step.command}\nrc=$?\npwd > "{where}"\nexit $rc\n'
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", script], cwd=cwd, env=env, text=True,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=COMMAND_TIMEOUT)
        assert proc.returncode == 0, f"{page}: `{step.command}` exited {proc.returncode}:\n{proc.stdout[-4000:]}"
        wrong = mismatch(step.shows, proc.stdout)
        assert wrong is None, f"{page}: `{step.command}` did not print {wrong!r}; it printed:\n{proc.stdout}"
        cwd = Path(where.read_text().strip())
        if step.command.startswith("builder cluster down --local"):
            taken_down.remove(step.command.split()[-1])
