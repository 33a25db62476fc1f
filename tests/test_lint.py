"""Static checks that are part of the suite: ruff, strict mypy, shellcheck on every shipped script."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, require_tool

SCRIPTS = sorted((ROOT / "images").glob("*/*.sh")) + sorted((ROOT / "bench").glob("*.sh")) + [ROOT / ".ci" / "run"]


def check(*argv: str) -> None:
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_ruff() -> None:
    check(sys.executable, "-m", "ruff", "check", "builder", "tests", "bench")


def test_mypy_strict() -> None:
    check(sys.executable, "-m", "mypy")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script: Path) -> None:
    require_tool("shellcheck", "shellcheck")
    check("shellcheck", "--severity=info", str(script))
