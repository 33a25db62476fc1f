"""Netboot kernels pinned in builder.lock: the known-bad table, what `pxe build` says when the pin is missing, bad
or gone, and the pinned .debs fetched (by sha256) and unpacked from a small archive of the test's own."""

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_pinning import write_index

from builder.core.errors import LockError
from builder.core.run import run
from builder.flavours import lock as lockfile
from builder.netboot.kernels import (
    KERNELS,
    KernelSpec,
    fetch_kernel_tree,
    kernel_version,
    pinned_kernel,
    resolve_kernel,
)
from builder.netboot.known_bad import KNOWN_BAD, refusals
from conftest import ROOT, run_cli_inproc

SHIPPED = json.loads((ROOT / "builder.lock").read_text())


def made_up_lock(tmp_path: Path, target: str, **versions: str) -> Path:
    """The shipped lock with some of `target`'s pinned netboot packages at other versions."""
    lock = copy.deepcopy(SHIPPED)
    for deb in lock["netboot"][target]["resolved"]:
        if deb["name"] in versions:
            deb["version"] = versions[deb["name"]]
    path = tmp_path / "builder.lock"
    path.write_text(json.dumps(lock))
    return path


def refused_line(tmp_path: Path, target: str, **versions: str) -> str:
    """`pxe build` with a made-up pin: it must stop before building anything, with one error line."""
    proc = run_cli_inproc("pxe", "build", "--target", target, "--engine", "podman",
                          "--lock", str(made_up_lock(tmp_path, target, **versions)))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "image " not in proc.stderr  # nothing was built
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "builder lock --refresh-netboot" in proc.stderr
    return errors[0]


def test_a_strix_halo_kernel_before_6_16_9_is_refused(tmp_path: Path) -> None:
    line = refused_line(tmp_path, "strix-halo", **{"linux-image-amd64": "6.16.8-1"})
    assert "netboot.strix-halo: linux-image-amd64 6.16.8-1 is known bad for strix-halo" in line
    assert "15.5 GB" in line
    assert refusals("strix-halo", {"linux-image-amd64": "6.16.9-1"}) == []
    assert refusals("strix-halo", {"linux-image-amd64": "6.16~rc7-1~exp1"})
    assert refusals("cpu", {"linux-image-amd64": "6.1.192-3"}) == []  # the rule is Strix Halo's only


def test_linux_firmware_20251125_is_refused_for_strix_halo(tmp_path: Path) -> None:
    line = refused_line(tmp_path, "strix-halo", **{"firmware-amd-graphics": "20251125-2"})
    assert "firmware-amd-graphics 20251125-2 is known bad for strix-halo" in line and "recalled" in line
    for good in ("20251111-1", "20251205-1", "20260916-1"):
        assert refusals("strix-halo", {"firmware-amd-graphics": good}) == [], good
    assert refusals("strix-halo", {"firmware-amd-graphics": "20251125-1"})


def test_linux_7_0_rc1_and_rc2_are_refused_for_strix_halo(tmp_path: Path) -> None:
    line = refused_line(tmp_path, "strix-halo", **{"linux-image-amd64": "7.0~rc2-1~exp1"})
    assert "linux-image-amd64 7.0~rc2-1~exp1 is known bad" in line and "rc1 and rc2" in line
    assert refusals("strix-halo", {"linux-image-amd64": "7.0~rc1-1~exp1"})
    for good in ("7.0~rc3-1~exp1", "7.0-1", "7.2.13-1"):
        assert refusals("strix-halo", {"linux-image-amd64": good}) == [], good


def test_every_rule_names_a_netboot_target_and_a_pinned_package() -> None:
    for rule in KNOWN_BAD:
        spec = KERNELS[rule.target]
        assert rule.package in ("linux-image-amd64", *spec.firmware_packages), rule


def test_the_shipped_lock_pins_every_netboot_target_with_no_known_bad_version() -> None:
    for target, spec in KERNELS.items():
        entry = lockfile.netboot_entry(target)
        assert entry is not None, target
        assert pinned_kernel(target, spec, entry, "builder.lock") is entry
        assert {deb.name for deb in entry.resolved} >= set(spec.packages)


def test_pxe_build_without_a_pinned_kernel_names_the_command(tmp_path: Path) -> None:
    lock = copy.deepcopy(SHIPPED)
    del lock["netboot"]["cpu"]
    path = tmp_path / "builder.lock"
    path.write_text(json.dumps(lock))
    proc = run_cli_inproc("pxe", "build", "--target", "cpu", "--engine", "podman", "--lock", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "netboot.cpu: the kernel and firmware of cpu nodes are not pinned" in proc.stderr
    assert "hint: run `builder lock`" in proc.stderr
    check = run_cli_inproc("lock", "--check", "--lock", str(path))
    assert check.returncode == 1
    assert check.stdout.splitlines() == [f"{path}: netboot.cpu: not in the lock (the bookworm kernel of cpu nodes)"]


def test_a_pin_made_for_other_packages_is_not_used(tmp_path: Path) -> None:
    lock = copy.deepcopy(SHIPPED)
    lock["netboot"]["intel-arc"]["inputs"]["packages"].remove("firmware-intel-graphics")
    path = tmp_path / "builder.lock"
    path.write_text(json.dumps(lock))
    proc = run_cli_inproc("pxe", "build", "--target", "intel-arc", "--engine", "podman", "--lock", str(path))
    assert proc.returncode == 2 and "netboot.intel-arc: pinned for other packages" in proc.stderr
    check = run_cli_inproc("lock", "--check", "--lock", str(path))
    assert check.stdout.splitlines() == [f"{path}: netboot.intel-arc: pinned for other packages than builder asks for"]


# A kernel package with what a netboot tree needs of it: the image, one module, and the module folder.
KVER = "6.1.0-99-amd64"


def _deb(archive: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    tree = archive / f"build-{name}"
    (tree / "DEBIAN").mkdir(parents=True)
    for rel, data in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: t <t@example.org>\n"
        f"Priority: optional\nDescription: {name}, made by the tests\n")
    deb = archive / "pool" / "main" / f"{name}_{version}_all.deb"
    deb.parent.mkdir(parents=True, exist_ok=True)
    run(["dpkg-deb", "--root-owner-group", "--build", "--", tree, deb])
    shutil.rmtree(tree)
    return deb


@pytest.fixture
def archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BUILDER_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "archive"
    _deb(root, "linux-image-amd64", "6.1.99-1", {f"boot/vmlinuz-{KVER}": b"kernel",
                                                 f"lib/modules/{KVER}/kernel/drivers/x/dummy.ko": b"module"})
    for name in ("busybox-static", "dmsetup", "nftables", "netbase"):
        _deb(root, name, "1.0", {f"usr/share/{name}/x": name.encode()})
    write_index(root)
    return root


def _spec(archive: Path) -> KernelSpec:
    return KernelSpec("sid", (6, 1), "a test kernel", mirror=f"file://{archive}")


def test_the_pinned_debs_are_fetched_checked_and_unpacked(archive: Path, tmp_path: Path) -> None:
    spec = _spec(archive)
    entry = resolve_kernel(spec)
    assert sorted(deb.name for deb in entry.resolved) == sorted(spec.packages)
    tree = fetch_kernel_tree(spec, entry)
    assert kernel_version(tree) == KVER
    assert (tree / "lib/modules" / KVER / "modules.dep").is_file()  # depmod ran over the unpacked tree
    assert (tree / "usr/share/netbase/x").read_text() == "netbase"

    # the archive now serves other bytes under the pinned name: refused, nothing unpacked
    shutil.rmtree(tmp_path / "cache")
    deb = next(archive.rglob("netbase_1.0_all.deb"))
    _deb(tmp_path / "other", "netbase", "1.0", {"usr/share/netbase/x": b"changed"}).replace(deb)
    with pytest.raises(LockError, match="does not match the sha256 in the lock"):
        fetch_kernel_tree(spec, entry)

    # the archive dropped the pinned version: the one command that pins the current ones
    deb.unlink()
    with pytest.raises(LockError, match="no longer in the archive") as gone:
        fetch_kernel_tree(spec, entry)
    assert "builder lock --refresh-netboot" in gone.value.hint


def test_lock_keeps_a_pinned_kernel_until_asked_to_refresh(archive: Path) -> None:
    spec = _spec(archive)
    pinned: dict[str, Any] = resolve_kernel(spec).model_dump(mode="json")
    _deb(archive, "linux-image-amd64", "6.1.100-1", {f"boot/vmlinuz-{KVER}": b"newer"})
    (archive / "pool/main/linux-image-amd64_6.1.99-1_all.deb").unlink()
    write_index(archive)
    assert lockfile.compute_netboot({"t": pinned}, refresh=False, kernels={"t": spec})["t"] == pinned
    moved = lockfile.compute_netboot({"t": pinned}, refresh=True, kernels={"t": spec})["t"]
    assert {d["name"]: d["version"] for d in moved["resolved"]}["linux-image-amd64"] == "6.1.100-1"
