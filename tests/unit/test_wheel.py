"""builder as an installed tool: the wheel built from this tree, installed into a fresh virtual environment,
renders every target and flavour exactly as the checkout does (recipes, images and builder.lock ride inside)."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, run_cli


@dataclass(frozen=True)
class Installed:
    wheel: Path
    bin: Path
    home: Path  # a working folder outside the checkout


def _tree_files() -> list[str]:
    """The files a fresh clone of this working tree would have (tracked, or new and not ignored)."""
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True, timeout=60).stdout.decode()
    return [name for name in out.split("\0") if name and (ROOT / name).is_file() and not (ROOT / name).is_symlink()]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    top = tmp_path_factory.mktemp("wheel")
    src = top / "src"
    for name in _tree_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "--wheel-dir", str(top / "dist"), str(src)], check=True, timeout=300)
    wheel, = (top / "dist").glob("builder-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(top / "venv")], check=True, timeout=120)
    venv_pip = [str(top / "venv" / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*venv_pip, "install", str(wheel)], check=True, timeout=600)
    home = top / "home"
    home.mkdir()
    return Installed(wheel, top / "venv" / "bin", home)


def installed_cli(installed: Installed, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(installed.bin / "builder"), *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=installed.home)


def _context(folder: Path) -> dict[str, bytes | object]:
    """A rendered context by file; plan.json without the paths its recipe and lock were read from."""
    files: dict[str, bytes | object] = {p.relative_to(folder).as_posix(): p.read_bytes()
                                        for p in folder.rglob("*") if p.is_file()}
    plan = json.loads(files.pop("plan.json", b"{}"))
    plan.pop("recipe", None)
    plan.pop("lock_file", None)
    files["plan.json"] = plan
    return files


def test_the_wheel_carries_every_recipe_template_script_and_the_lock(installed: Installed) -> None:
    shipped = [name for name in _tree_files() if name.split("/")[0] in ("recipes", "images") or name == "builder.lock"]
    assert "recipes/cpu.yaml" in shipped and "images/netboot/init.sh" in shipped
    with zipfile.ZipFile(installed.wheel) as wheel:
        for name in shipped:
            assert wheel.read(f"builder/shipped/{name}") == (ROOT / name).read_bytes(), name


def test_the_installed_tool_runs_from_its_own_environment(installed: Installed) -> None:
    where = subprocess.run([str(installed.bin / "python"), "-c", "import builder; print(builder.PROJECT_ROOT)"],
                           capture_output=True, text=True, check=True, timeout=60, cwd=installed.home).stdout.strip()
    assert where.startswith(str(installed.bin.parent)) and where.endswith("builder/shipped"), where
    proc = installed_cli(installed, "lock", "--check")
    assert proc.returncode == 0 and "matches the recipes" in proc.stdout, proc.stdout + proc.stderr


def test_the_installed_tool_renders_every_target_and_flavour_as_the_checkout_does(installed: Installed,
                                                                                   tmp_path: Path) -> None:
    proc = installed_cli(installed, "targets", "--json")
    assert proc.returncode == 0, proc.stderr
    entries = json.loads(proc.stdout)
    images = [(e["target"], e["variant"], flavour) for e in entries
              for flavour, key in (("llama.cpp", "llama_cpp"), ("vllm", "vllm")) if e[key]]
    assert ("cpu", "cpu", "vllm") in images and ("nvidia", "cuda-nvidia", "llama.cpp") in images
    for target, variant, flavour in images:
        args = ["render", "--flavour", flavour, "--target", target, "--variant", variant]
        mine, theirs = tmp_path / f"{target}-{variant}-{flavour}", tmp_path / f"{target}-{variant}-{flavour}-checkout"
        proc = installed_cli(installed, *args, "--out", str(mine))
        assert proc.returncode == 0, f"{target}/{variant} ({flavour}): {proc.stderr}"
        checkout = run_cli(*args, "--out", str(theirs))
        assert checkout.returncode == 0, checkout.stderr
        assert proc.stdout.split("image tag ")[-1] == checkout.stdout.split("image tag ")[-1]
        assert _context(mine) == _context(theirs), f"{target}/{variant} ({flavour})"


def test_a_recipe_of_your_own_works_with_the_installed_tool(installed: Installed) -> None:
    mine = installed.home / "my-cpu.yaml"
    mine.write_text((ROOT / "recipes" / "cpu.yaml").read_text().replace("description:", "description: mine -", 1))
    proc = installed_cli(installed, "plan", "--recipe", str(mine), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["target"] == "cpu"
