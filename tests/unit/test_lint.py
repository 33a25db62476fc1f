"""Static checks that are part of the suite: ruff, strict mypy, shellcheck on every shipped script."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, require_tool

# builder/'s folders from the bottom up, as docs/architecture.md lists them: a module imports from its own folder
# and the ones before it only.
STAGES = ("core", "recipe", "engines", "registry", "plan", "fetch", "render", "pipeline", "netboot", "publish",
          "flavours", "use", "cluster", "cli")
SCRIPTS = sorted((ROOT / "images").glob("*/*.sh")) + sorted((ROOT / "bench").glob("*.sh")) + [ROOT / ".ci" / "run"]


def check(*argv: str) -> None:
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_ruff() -> None:
    check(sys.executable, "-m", "ruff", "check", "builder", "tests", "bench", "docs/quickstarts")


def test_mypy_strict() -> None:
    check(sys.executable, "-m", "mypy")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script: Path) -> None:
    require_tool("shellcheck", "shellcheck")
    check("shellcheck", "--severity=info", str(script))


def test_imports_flow_one_way_through_the_stages() -> None:
    package = ROOT / "builder"
    folders = {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert folders == set(STAGES), "a folder under builder/ that docs/architecture.md and STAGES do not place"
    assert not [p.name for p in package.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    upward = []
    for path in sorted(package.glob("*/*.py")):
        here = path.parent.name
        for node in ast.walk(ast.parse(path.read_text())):
            # every spelling: from builder.X import ..., from builder import X, import builder.X (even in a function)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("builder."):
                names = [node.module]
            elif isinstance(node, ast.ImportFrom) and node.module == "builder":
                names = [f"builder.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names if alias.name.startswith("builder.")]
            else:
                continue
            for name in names:
                there = name.split(".")[1]
                if there in STAGES and STAGES.index(there) > STAGES.index(here):
                    upward.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert not upward, "\n".join(upward)


def test_test_modules_have_unique_names_across_folders() -> None:
    """pytest imports test modules by their base name (rootdir-based, no packages): two folders holding the same
    name stop the whole run at collection, before any test runs."""
    seen: dict[str, Path] = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        assert path.name not in seen, f"{path.relative_to(ROOT)} and {seen[path.name].relative_to(ROOT)}"
        seen[path.name] = path


def test_modules_stay_under_six_hundred_lines() -> None:
    """A module past 600 lines holds more than one idea (docs/architecture.md): split it by what it does."""
    long = {str(path.relative_to(ROOT)): n for path in sorted((ROOT / "builder").rglob("*.py"))
            if (n := len(path.read_text().splitlines())) > 600}
    assert not long, long
