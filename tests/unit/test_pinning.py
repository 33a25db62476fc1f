"""Pinning that survives a moving archive: bases locked to exact .debs, kept by sha256, rebuilt offline.

Everything runs against a small apt archive made here (tiny packages built with dpkg-deb, a hand-written
index, a file:// mirror): real apt resolves it, as `builder lock` does against Debian's archive. No network.
"""

import hashlib
import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest

from builder.core.errors import LockError
from builder.core.run import run
from builder.fetch.bootstrap import locked_argv
from builder.fetch.debian import apt_sources, resolve
from builder.fetch.debstore import DebStore, write_repository
from builder.plan.bases import lock_name
from builder.plan.make import runtime_base
from builder.recipe.load import load_recipe
from builder.recipe.models import BootstrapBase, LockedBase, LockedDeb
from conftest import ROOT, require, require_engine, require_tool, run_cli, run_cli_inproc

# name, version, fields: a minbase in miniature (Essential, Priority required, apt) and a package with a library.
PACKAGES = [
    ("tiny-base", "1.0", {"Essential": "yes", "Priority": "required", "Depends": "libtiny"}),
    ("libtiny", "1.0", {"Priority": "optional"}),
    ("tiny-required", "2:1.0-1", {"Priority": "required"}),
    ("apt", "9.9", {"Priority": "important"}),  # its own control file says important …
    ("app", "1.0", {"Priority": "optional", "Depends": "libapp (>= 1.0)"}),
    ("libapp", "1.0", {"Priority": "optional"}),
    ("unrelated", "1.0", {"Priority": "optional"}),
    # what every bootstrapped runtime base gets for Toolbx
    ("libcap2-bin", "1.0", {"Priority": "optional"}),
    ("sudo", "1.0", {"Priority": "optional"}),
]
# … the archive's index says required, as Debian's override does for apt.
INDEX_PRIORITY = {"apt": "required"}


def make_deb(out: Path, name: str, version: str, fields: dict[str, str]) -> Path:
    tree = out / f"build-{name}-{version}"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "usr" / "share" / name).mkdir(parents=True)
    (tree / "usr" / "share" / name / "version").write_text(version + "\n")
    control = {"Package": name, "Version": version, "Architecture": "all", "Maintainer": "t <t@example.org>",
               **fields, "Description": f"{name}, a package made by the tests"}
    (tree / "DEBIAN" / "control").write_text("".join(f"{k}: {v}\n" for k, v in control.items()))
    deb = out / "pool" / "main" / f"{name}_{version.split(':')[-1]}_all.deb"  # no epoch, as in Debian's pool
    deb.parent.mkdir(parents=True, exist_ok=True)
    run(["dpkg-deb", "--root-owner-group", "--build", "--", tree, deb])
    shutil.rmtree(tree)
    return deb


def write_index(archive: Path, suite: str = "sid") -> None:
    """Packages and Release for every .deb in the archive's pool, as a Debian mirror lays them out."""
    stanzas = []
    for deb in sorted((archive / "pool").rglob("*.deb")):
        control = run(["dpkg-deb", "--field", "--", deb]).stdout.strip()
        name = next(line.split(": ", 1)[1] for line in control.splitlines() if line.startswith("Package: "))
        if name in INDEX_PRIORITY:
            control = "\n".join(line for line in control.splitlines() if not line.startswith("Priority: "))
            control += f"\nPriority: {INDEX_PRIORITY[name]}"
        data = deb.read_bytes()
        stanzas.append(f"{control}\nFilename: {deb.relative_to(archive)}\nSize: {len(data)}\n"
                       f"SHA256: {hashlib.sha256(data).hexdigest()}\n")
    index = "\n".join(stanzas).encode()
    binary = archive / "dists" / suite / "main" / "binary-amd64"
    binary.mkdir(parents=True, exist_ok=True)
    (binary / "Packages").write_bytes(index)
    (archive / "dists" / suite / "Release").write_text(textwrap.dedent(f"""\
        Suite: {suite}
        Codename: {suite}
        Date: Thu, 01 Jan 2026 00:00:00 UTC
        Architectures: amd64
        Components: main
        SHA256:
         {hashlib.sha256(index).hexdigest()} {len(index)} main/binary-amd64/Packages
        """))


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    require_tool("apt-get", "apt")
    root = tmp_path / "archive"
    for name, version, fields in PACKAGES:
        make_deb(root, name, version, fields)
    write_index(root)
    return root


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DebStore:
    monkeypatch.setenv("BUILDER_CACHE", str(tmp_path / "cache"))
    return DebStore(tmp_path / "cache" / "debs")


def base_on(archive: Path) -> BootstrapBase:
    return BootstrapBase(kind="bootstrap", suite="sid", mirror=f"file://{archive}", packages=["app"])


def test_lock_holds_what_minbase_installs_with_exact_files(archive: Path) -> None:
    resolved = resolve(base_on(archive), "amd64")
    by_name = {deb.name: deb for deb in resolved}
    # Essential and its dependency, the required set (apt by the index's priority), the asked-for package
    # and its library; nothing optional that nobody asked for.
    assert sorted(by_name) == ["app", "apt", "libapp", "libtiny", "tiny-base", "tiny-required"]
    required = by_name["tiny-required"]
    assert (required.version, required.suite, required.priority) == ("2:1.0-1", "sid", "required")
    assert by_name["apt"].priority == "required"
    for deb in resolved:
        data = (archive / deb.filename).read_bytes()
        assert (deb.sha256, deb.size) == (hashlib.sha256(data).hexdigest(), len(data))


def test_a_rebuild_after_the_archive_moved_uses_the_cache_then_names_what_is_gone(
        archive: Path, store: DebStore, tmp_path: Path) -> None:
    base = base_on(archive)
    locked = resolve(base, "amd64")
    sources = apt_sources(base)
    store.fetch_all(locked, sources, "builder.lock: bases.x")

    # The archive moves on: app 1.0 is replaced by 2.0 (as sid does), so the index no longer has 1.0.
    (archive / "pool" / "main" / "app_1.0_all.deb").unlink()
    make_deb(archive, "app", "2.0", {"Priority": "optional", "Depends": "libapp (>= 1.0)"})
    write_index(archive)
    assert {d.version for d in resolve(base, "amd64") if d.name == "app"} == {"2.0"}

    # From the cache alone: the repository the bootstrap installs from offers exactly the locked set.
    paths = store.fetch_all(locked, sources, "builder.lock: bases.x")
    assert all(p.is_file() for p in paths)
    repo = tmp_path / "repo"
    write_repository(locked, store, "sid", "amd64", repo)
    again = resolve(base.model_copy(update={"mirror": f"file://{repo}"}), "amd64")
    assert [(d.name, d.version, d.sha256) for d in again] == [(d.name, d.version, d.sha256) for d in locked]

    # Without the cache, the gone version is one line naming it and its suite, and what to do.
    shutil.rmtree(store.root)
    store.root.mkdir()
    with pytest.raises(LockError) as gone:
        store.fetch_all(locked, sources, "builder.lock: bases.x")
    assert gone.value.message == (f"builder.lock: bases.x: app 1.0 (sid) is no longer in the archive "
                                  f"(file://{archive}) nor in the cache")
    assert "builder lock --refresh" in gone.value.hint and "https://snapshot.debian.org/archive/debian/" \
        in gone.value.hint


def test_a_damaged_deb_in_the_cache_is_fetched_again(archive: Path, store: DebStore) -> None:
    base = base_on(archive)
    locked = resolve(base, "amd64")
    app = next(d for d in locked if d.name == "app")
    path = store.fetch(app, apt_sources(base), "w")
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # a download cut short
    assert store.fetch(app, apt_sources(base), "w").read_bytes() == good
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # same size, one bit changed
    assert store.fetch(app, apt_sources(base), "w").read_bytes() == good
    # Damaged and gone from the archive: named, not used.
    path.write_bytes(b"junk")
    (archive / app.filename).unlink()
    with pytest.raises(LockError, match=r"app 1\.0 \(sid\) is no longer in the archive"):
        store.fetch(app, apt_sources(base), "w")
    assert not path.exists()
    # A mirror that serves other bytes under the locked name is refused, not stored.
    (archive / app.filename).write_bytes(good + b"x")
    with pytest.raises(LockError, match="does not match the sha256 in the lock"):
        store.fetch(app, apt_sources(base), "w")
    assert not path.exists() and not list(store.root.glob(".fetch-*"))


def test_the_bootstrap_asks_for_locked_versions_from_the_local_repository(archive: Path, tmp_path: Path) -> None:
    base = base_on(archive)
    locked = LockedBase(inputs={}, resolved=resolve(base, "amd64"))
    argv = locked_argv(base, locked, tmp_path / "repo", tmp_path / "out.tar", tmp_path / "installed.txt")
    assert "--include=app=1.0" in argv
    assert argv[-3:] == ["sid", str(tmp_path / "out.tar"), f"deb [trusted=yes] copy://{tmp_path / 'repo'} sid main"]
    # The image keeps the base's own sources, not the temporary repository.
    assert any(a.startswith("--customize-hook=printf %s") and f"deb file://{archive} sid main" in a for a in argv)


def test_lock_entries_are_validated_and_named(tmp_path: Path) -> None:
    deb = LockedDeb(name="app", version="1.0", arch="all", suite="sid", filename="pool/main/app_1.0_all.deb",
                    sha256="a" * 64, size=1, priority="optional")
    good = LockedBase(inputs={"suite": "sid"}, resolved=[deb]).model_dump(mode="json")
    bad = json.loads(json.dumps(good))
    bad["resolved"][0]["filename"] = "../../etc/passwd"
    lock = tmp_path / "builder.lock"
    lock.write_text(json.dumps({"version": 1, "images": {}, "bases": {"sid-0": good, "sid-1": bad}}))
    proc = run_cli_inproc("build", "--target", "cpu", "--lock", str(lock), "--engine", "podman")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{lock}: bases.sid-1.resolved.0.filename: String should match pattern" in proc.stderr


def test_check_and_build_name_a_base_missing_from_the_lock(tmp_path: Path) -> None:
    lock = json.loads((ROOT / "builder.lock").read_text())
    cpu = load_recipe(ROOT / "recipes" / "cpu.yaml")
    spec = runtime_base(cpu.variants["cpu"].base.runtime)
    assert isinstance(spec, BootstrapBase)
    runtime = lock_name(spec)
    lock["bases"]["sid-0123456789abcdef"] = lock["bases"].pop(runtime)
    stale = tmp_path / "builder.lock"
    stale.write_text(json.dumps(lock))
    proc = run_cli_inproc("lock", "--check", "--lock", str(stale))
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        f"{stale}: bases.{runtime}: not in the lock (the trixie base of cpu/cpu runtime)",
        f"{stale}: bases.sid-0123456789abcdef: in the lock, but no recipe uses it"]
    # build refuses the image: its runtime base would install whatever the archive has today.
    proc = run_cli_inproc("build", "--target", "cpu", "--lock", str(stale), "--engine", "podman")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"cpu/cpu: bases.{runtime}: the trixie base of the runtime stage has no locked package set" \
        in proc.stderr and "builder lock" in proc.stderr


def test_build_stops_with_one_line_when_a_locked_version_is_gone(archive: Path, tmp_path: Path) -> None:
    """`builder build` as a user runs it: lock, the archive moves, the cache is empty -> exit 2, nothing tagged."""
    require_engine("podman")
    require_tool("mmdebstrap", "mmdebstrap")
    require(None if os.geteuid() == 0 else "bootstrapping needs root")
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    shutil.copy(ROOT / "recipes" / "llama-cpp.yaml", recipes)
    base = f"{{kind: bootstrap, suite: sid, mirror: 'file://{archive}', packages: [app]}}"
    (recipes / "cpu.yaml").write_text(f"target: cpu\nvariants:\n  cpu:\n    base:\n"
                                      f"      toolchain: {base}\n      runtime: {base}\n")
    lock = tmp_path / "builder.lock"
    # the shipped netboot kernels are kept (same inputs): nothing is resolved from Debian's archive
    netboot = json.loads((ROOT / "builder.lock").read_text())["netboot"]
    lock.write_text(json.dumps({"version": 1, "images": {}, "netboot": netboot}))
    proc = run_cli("lock", "--recipes", str(recipes), "--lock", str(lock))
    assert proc.returncode == 0, proc.stderr
    # six packages in the toolchain base, those and what Toolbx needs in the runtime base
    assert "1 image(s), 2 bootstrapped base(s), 14 packages" in proc.stdout
    (archive / "pool" / "main" / "app_1.0_all.deb").unlink()
    make_deb(archive, "app", "2.0", {"Priority": "optional", "Depends": "libapp (>= 1.0)"})
    write_index(archive)
    tree = tmp_path / "llama.cpp"
    tree.mkdir()
    (tree / "CMakeLists.txt").write_text('project("llama.cpp" C CXX)\n')
    env = {"BUILDER_CACHE": str(tmp_path / "cache")}
    proc = run_cli("build", "--recipe", str(recipes / "cpu.yaml"), "--lock", str(lock), "--engine", "podman",
                   "--llama-cpp-source", str(tree), env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].endswith(f"app 1.0 (sid) is no longer in the archive (file://{archive}) "
                                                   "nor in the cache"), proc.stderr
    assert "hint: run `builder lock --refresh`" in proc.stderr and "snapshot.debian.org" in proc.stderr
    tag = proc.stderr.split("building ", 1)[1].split()[0]
    assert run(["podman", "image", "exists", "--", tag], check=False).returncode == 1
    assert not list((tmp_path / "cache" / "bases").glob("*.tar"))
