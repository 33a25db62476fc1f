"""`--compression` of `builder pxe build` and `pxe publish`: the default chosen by measurement (zstd at level 3,
docs/benchmarks.md) and the levels mksquashfs takes for each algorithm, checked before anything is built."""

import pytest

from builder.core.errors import RecipeError
from builder.netboot.artifacts import DEFAULT_COMPRESSION, Squash
from conftest import run_cli


def test_default_is_zstd_level_3() -> None:
    assert Squash.parse(DEFAULT_COMPRESSION) == Squash() == Squash("zstd", 3)
    assert Squash().flags() == ["-comp", "zstd", "-Xcompression-level", "3"]
    assert str(Squash()) == "zstd:3"


@pytest.mark.parametrize(("text", "flags"), [
    ("zstd", ["-comp", "zstd"]),  # mksquashfs's own default level (15)
    ("zstd:19", ["-comp", "zstd", "-Xcompression-level", "19"]),
    ("gzip:1", ["-comp", "gzip", "-Xcompression-level", "1"]),
    ("xz", ["-comp", "xz"]),
    ("lz4", ["-comp", "lz4"]),
])
def test_levels_reach_mksquashfs(text: str, flags: list[str]) -> None:
    squash = Squash.parse(text)
    assert squash.flags() == flags and str(squash) == text


@pytest.mark.parametrize(("text", "says"), [
    ("zstd:0", "the level of zstd is a number from 1 to 22"),
    ("zstd:23", "the level of zstd is a number from 1 to 22"),
    ("gzip:10", "the level of gzip is a number from 1 to 9"),
    ("zstd:", "the level of zstd is a number from 1 to 22"),
    ("zstd:３", "the level of zstd is a number from 1 to 22"),  # a digit, but not an ASCII one
    ("xz:6", "xz takes no level"),
    ("lz4:1", "lz4 takes no level"),
    ("brotli", "unknown algorithm"),
])
def test_bad_compression_is_refused(text: str, says: str) -> None:
    with pytest.raises(RecipeError) as caught:
        Squash.parse(text)
    assert says in caught.value.message


def test_pxe_build_refuses_a_bad_level_before_building() -> None:
    """One line, exit 2, before the engine or the kernel's .debs are touched."""
    proc = run_cli("pxe", "build", "--target", "cpu", "--compression", "xz:6")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--compression 'xz:6': xz takes no level" in proc.stderr and "Traceback" not in proc.stderr
