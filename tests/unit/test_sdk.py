"""SDK wheels: the pin decides what pip fetches, unpacking is cached, staging fails on a `ship` glob that
matches nothing, and a pinned wheel's checksum is verified."""

import hashlib
import zipfile
from pathlib import Path

import pytest

from builder.core.errors import RecipeError, SourceError
from builder.fetch.sdk import fetch_wheel, pip_download_argv, unpacked
from builder.flavours.llama import stage_sdks
from builder.plan.make import make_plan
from builder.recipe.load import load_recipe, recipe_path_for
from builder.recipe.models import SourceInfo, WheelSdk

FILE = "demo_sdk-1.2.3-45-cp311-cp311-manylinux_2_28_x86_64.whl"


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUILDER_CACHE", str(tmp_path / "cache"))


def cached_wheel(tmp_path: Path, members: dict[str, bytes]) -> WheelSdk:
    """A wheel placed in the cache the way a verified download leaves it."""
    wheel = tmp_path / FILE
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o100755 << 16
            archive.writestr(info, data)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (tmp_path / "cache" / "sdks" / "wheels").mkdir(parents=True)
    wheel.rename(tmp_path / "cache" / "sdks" / "wheels" / f"{digest}.whl")
    return WheelSdk(kind="wheel", package="demo-sdk", version="1.2.3", file=FILE, sha256=digest,
                    ship=["demo_sdk/libs/libdemo.so.*"])


def test_pip_fetches_exactly_the_pinned_tags_not_this_pythons(tmp_path: Path) -> None:
    spec = WheelSdk(kind="wheel", package="demo-sdk", version="1.2.3", file=FILE, sha256="a" * 64)
    argv = pip_download_argv(spec, tmp_path)
    joined = " ".join(argv)
    for part in ("--no-deps", "--only-binary :all:", "--implementation cp", "--python-version 311",
                 "--abi cp311", "--platform manylinux_2_28_x86_64"):
        assert part in joined
    assert argv[-1] == "demo-sdk==1.2.3"


def test_wheel_file_must_be_the_pinned_package_and_version() -> None:
    with pytest.raises(ValueError, match="is not other 1.2.3"):
        WheelSdk(kind="wheel", package="other", version="1.2.3", file=FILE, sha256="a" * 64)
    with pytest.raises(ValueError, match="wheel file name"):
        WheelSdk(kind="wheel", package="demo-sdk", version="1.2.3", file="demo.tar.gz", sha256="a" * 64)


def test_unpacked_once_and_staged_with_hard_links(tmp_path: Path) -> None:
    spec = cached_wheel(tmp_path, {"demo_sdk/libs/libdemo.so.1": b"\x7fELF", "demo_sdk/cmake/Demo.cmake": b"#"})
    tree = unpacked(spec)
    assert (tree / "demo_sdk" / "libs" / "libdemo.so.1").read_bytes() == b"\x7fELF"
    assert unpacked(spec) == tree
    recipe = load_recipe(recipe_path_for("intel-npu"))
    section = recipe.variants["openvino"].model_copy(update={"sdks": {"demo": spec}})
    recipe = recipe.model_copy(update={"variants": {"openvino": section}})
    plan = make_plan(recipe, "recipes/intel-npu.yaml", SourceInfo(locator="x", identity="sha256:" + "b" * 64,
                                                                 version="1", epoch=0))
    out = tmp_path / "ctx"
    (out / "sdk" / "stale").mkdir(parents=True)
    stage_sdks(plan, out)
    staged = out / "sdk" / "demo" / "demo_sdk" / "libs" / "libdemo.so.1"
    assert staged.stat().st_ino == (tree / "demo_sdk" / "libs" / "libdemo.so.1").stat().st_ino
    assert not (out / "sdk" / "stale").exists()
    assert plan.ship == ["/opt/sdk/demo/demo_sdk/libs/libdemo.so.*"]

    broken = spec.model_copy(update={"ship": ["demo_sdk/libs/libgone.so"]})
    plan = plan.model_copy(update={"sdks": {"demo": broken}})
    with pytest.raises(RecipeError, match=r"sdks.demo.ship: demo_sdk/libs/libgone.so match nothing"):
        stage_sdks(plan, out)


def write_wheel(folder: Path) -> Path:
    """A minimal valid wheel that pip accepts from a local folder."""
    wheel = folder / FILE
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("demo_sdk/libs/libdemo.so.1", b"\x7fELF")
        archive.writestr("demo_sdk-1.2.3.dist-info/METADATA", "Metadata-Version: 2.1\nName: demo-sdk\nVersion: 1.2.3\n")
        archive.writestr("demo_sdk-1.2.3.dist-info/WHEEL",
                         "Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: cp311-cp311-manylinux_2_28_x86_64\n")
        archive.writestr("demo_sdk-1.2.3.dist-info/RECORD", "")
    return wheel


def test_pip_download_is_checked_against_the_pin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real pip, offline: a local folder stands in for the package index."""
    index = tmp_path / "index"
    index.mkdir()
    digest = hashlib.sha256(write_wheel(index).read_bytes()).hexdigest()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    spec = WheelSdk(kind="wheel", package="demo-sdk", version="1.2.3", file=FILE, sha256="f" * 64)
    with pytest.raises(SourceError, match=f"{FILE}: sha256 mismatch: expected f+, got {digest}"):
        fetch_wheel(spec)
    assert not list((tmp_path / "cache" / "sdks" / "wheels").iterdir()), "nothing kept under the pin"
    missing = spec.model_copy(update={"version": "9.9", "file": FILE.replace("1.2.3", "9.9")})
    with pytest.raises(SourceError, match="cannot fetch demo_sdk-9.9-45-cp311"):
        fetch_wheel(missing)
    fetched = fetch_wheel(spec.model_copy(update={"sha256": digest}))
    assert fetched.name == f"{digest}.whl"
