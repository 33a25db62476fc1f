"""Bootstrapped bases: what mmdebstrap is asked for, and which inputs name the base."""

import subprocess
from pathlib import Path

import pytest
import yaml
from test_recipes import assert_one_clear_error

from builder.fetch.bootstrap import apt_preferences, mmdebstrap_argv
from builder.plan.bases import base_ref, bootstrap_key, host_arch, lock_name
from builder.recipe.models import BootstrapBase, ExtraSuite, Prune
from conftest import run_cli_inproc


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
    from builder.recipe.models import LockedBase, LockedDeb

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


SID_WITH_EXPERIMENTAL = BootstrapBase(
    kind="bootstrap", suite="sid", packages=["hipcc", "cmake"],
    extra_suites=[ExtraSuite(suite="experimental", packages=["hipcc", "libamdhip64-7"])],
    prune=[Prune(drop="/usr/lib/rocblas/library/*gfx*", keep=["/usr/lib/rocblas/library/*gfx1151*"])])


def test_extra_suites_add_a_sources_line_and_pin_only_their_packages() -> None:
    argv = mmdebstrap_argv(SID_WITH_EXPERIMENTAL, Path("/tmp/x.tar"))
    # The base suite keeps the plain mirror; each extra suite gets its own line with the same components.
    assert argv[-4:] == ["sid", "/tmp/x.tar", "http://deb.debian.org/debian",
                         "deb http://deb.debian.org/debian experimental main"]
    prefs = apt_preferences(SID_WITH_EXPERIMENTAL)
    # experimental is named by its archive; a codename (sid, trixie) would match n=.
    assert "Package: hipcc libamdhip64-7\nPin: release a=experimental\nPin-Priority: 990\n" in prefs
    assert "Package: *" not in prefs
    hooks = [a for a in argv if a.startswith("--setup-hook=")]
    assert len(hooks) == 1 and "/etc/apt/preferences.d/" in hooks[0]
    plain = BootstrapBase(kind="bootstrap", suite="sid", packages=["hipcc", "cmake"])
    assert bootstrap_key(plain) != bootstrap_key(SID_WITH_EXPERIMENTAL)


def test_setup_hook_writes_the_preferences_file_exactly(tmp_path: Path) -> None:
    """mmdebstrap runs a hook with sh -c and the root as $1: run the same way, the file holds the preferences."""
    hook = next(a for a in mmdebstrap_argv(SID_WITH_EXPERIMENTAL, Path("/tmp/x.tar"))
                if a.startswith("--setup-hook="))
    subprocess.run(["sh", "-c", hook.removeprefix("--setup-hook="), "hook", str(tmp_path)], check=True)
    written = (tmp_path / "etc/apt/preferences.d/builder-extra-suites.pref").read_text()
    assert written == apt_preferences(SID_WITH_EXPERIMENTAL)


def test_prune_rules_follow_the_image_rules_each_keep_after_its_drop() -> None:
    argv = mmdebstrap_argv(SID_WITH_EXPERIMENTAL, Path("/tmp/x.tar"))
    rules = [a.removeprefix("--dpkgopt=") for a in argv if a.startswith("--dpkgopt=")]
    # dpkg applies the last rule that matches a path: the keep must come after its drop.
    assert rules[-2:] == ["path-exclude=/usr/lib/rocblas/library/*gfx*",
                          "path-include=/usr/lib/rocblas/library/*gfx1151*"]


def bootstrap_recipe(tmp_path: Path, **fields: object) -> Path:
    base = {"kind": "bootstrap", "suite": "sid", "packages": ["cmake"], **fields}
    recipe = {"target": "strix-halo", "variants": {"rocm": {"base": {"toolchain": base, "runtime": base}}}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


FIELD = "bad.yaml: variants.rocm.base.toolchain.bootstrap"


@pytest.mark.parametrize(("fields", "needles"), [
    ({"extra_suites": [{"suite": "Experimental", "packages": ["hipcc"]}]},
     [f"{FIELD}.extra_suites[0].suite", "should match pattern"]),
    ({"extra_suites": [{"suite": "experimental; rm -rf /", "packages": ["hipcc"]}]},
     [f"{FIELD}.extra_suites[0].suite"]),
    ({"extra_suites": [{"suite": "experimental", "packages": ["hipcc", "hip cc'"]}]},
     [f"{FIELD}.extra_suites[0].packages[1]", "should match pattern"]),
    ({"extra_suites": [{"suite": "experimental", "packages": []}]},
     [f"{FIELD}.extra_suites[0].packages", "at least 1"]),
    ({"extra_suites": [{"suite": "sid", "packages": ["hipcc"]}]},
     [FIELD, "extra_suites[0].suite: sid is already a suite of this base"]),
    ({"extra_suites": [{"suite": "experimental", "packages": ["hipcc"]},
                       {"suite": "trixie-backports", "packages": ["hipcc"]}]},
     [FIELD, "extra_suites[1].packages: hipcc is taken from experimental already"]),
    ({"prune": [{"drop": "usr/lib/*gfx*"}]}, [f"{FIELD}.prune[0].drop", "should match pattern"]),
    ({"prune": [{"drop": "/usr/lib/*gfx*", "keep": ["/usr/lib/../../etc/*"]}]},
     [f"{FIELD}.prune[0].keep[0]", "'..'"]),
])
def test_bad_extra_suite_or_prune_is_one_line_exit_2(tmp_path: Path, fields: dict[str, object],
                                                     needles: list[str]) -> None:
    proc = run_cli_inproc("plan", "--recipe", str(bootstrap_recipe(tmp_path, **fields)))
    assert_one_clear_error(proc, *needles)
