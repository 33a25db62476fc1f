"""Static checks that are part of the suite: ruff, strict mypy, shellcheck on every shipped script."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

SCRIPTS = sorted((ROOT / "images").glob("*/*.sh")) + [ROOT / ".ci" / "run"]


def check(*argv: str) -> None:
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_ruff() -> None:
    check(sys.executable, "-m", "ruff", "check", "builder", "tests", "bench")


def test_mypy_strict() -> None:
    check(sys.executable, "-m", "mypy")


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is installed by .ci/run")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script: Path) -> None:
    check("shellcheck", "--severity=info", str(script))
