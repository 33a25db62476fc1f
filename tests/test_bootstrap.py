"""Bootstrapped bases: what mmdebstrap is asked for, and which inputs name the base."""

from pathlib import Path

import pytest

from builder.bootstrap import base_ref, bootstrap_key, host_arch, lock_name, mmdebstrap_argv
from builder.models import BootstrapBase


def test_components_reach_mmdebstrap_and_the_base_name() -> None:
    main = BootstrapBase(kind="bootstrap", suite="trixie", packages=["cmake"])
    nonfree = BootstrapBase(kind="bootstrap", suite="trixie", packages=["cmake"], components=["main", "non-free"])
    assert "--components=main,non-free" in mmdebstrap_argv(nonfree, Path("/tmp/x.tar"))
    assert not any(a.startswith("--components") for a in mmdebstrap_argv(main, Path("/tmp/x.tar")))
    assert bootstrap_key(main) != bootstrap_key(nonfree) and base_ref(main) != base_ref(nonfree)


@pytest.mark.skipif(host_arch() != "amd64", reason="the recorded name is of the amd64 base")
def test_default_components_keep_existing_base_names() -> None:
    # The cpu recipe's bookworm toolchain base was named this before the components field existed.
    toolchain = BootstrapBase(kind="bootstrap", suite="bookworm",
                              packages=["build-essential", "cmake", "ninja-build", "ccache"])
    assert base_ref(toolchain) == "localhost/builder-base:bookworm-c5ea919670dba849"


def test_expired_release_files_do_not_stop_a_sid_bootstrap() -> None:
    argv = mmdebstrap_argv(BootstrapBase(kind="bootstrap", suite="sid"), Path("/tmp/x.tar"))
    assert '--aptopt=Acquire::Check-Valid-Until "false"' in argv
    assert argv[-2:] == ["sid", "/tmp/x.tar"]


def test_a_locked_base_is_named_by_its_packages_not_by_its_mirror() -> None:
    from builder.models import LockedBase, LockedDeb

    def locked(version: str) -> LockedBase:
        deb = LockedDeb(name="libgomp1", version=version, arch="amd64", suite="sid", priority="optional",
                        filename=f"pool/main/g/gcc/libgomp1_{version}_amd64.deb", sha256=version[0] * 64, size=1)
        return LockedBase(inputs={}, resolved=[deb])

    sid = BootstrapBase(kind="bootstrap", suite="sid", packages=["libgomp1"])
    snapshot = sid.model_copy(update={"mirror": "https://snapshot.debian.org/archive/debian/20261101T000000Z/"})
    assert lock_name(sid) == lock_name(snapshot)
    old, new = locked("1.0"), locked("2.0")
    assert base_ref(sid, {lock_name(sid): old}) == base_ref(snapshot, {lock_name(sid): old})
    assert base_ref(sid, {lock_name(sid): old}) != base_ref(sid, {lock_name(sid): new}) != base_ref(sid)
