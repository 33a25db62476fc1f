"""Base images bootstrapped from Debian packages (mmdebstrap, minbase), cached by their inputs.

The shipped recipes start from here, so they build on a machine that reaches no registry. The rootfs tarball is
kept in the cache, so a second engine imports it without bootstrapping again.

A base with an entry in builder.lock (its full package set, see builder/fetch/debian.py) is bootstrapped from
exactly the locked .debs, kept by sha256 in the cache (builder/fetch/debstore.py), through a local repository:
the same packages on every rebuild however far the archive has moved, or one line naming the package
that is gone. A base without one (a recipe in development) installs whatever its mirror has today.
"""

import os
import shlex
import shutil
from pathlib import Path

from builder.core.errors import CommandError, EngineError, LockError
from builder.core.locks import lock_file
from builder.core.locks import locked as holding
from builder.core.paths import cache_subdir
from builder.core.run import run, run_logged
from builder.engines import Engine
from builder.engines.cleanup import temp_dir
from builder.fetch.debian import apt_sources
from builder.fetch.debstore import DebStore, write_repository
from builder.plan.bases import LockedBases, base_ref, bootstrap_key, host_arch, lock_name, locked_for
from builder.recipe.models import BootstrapBase, ImageBase, LockedBase

# mmdebstrap's default mirror, named when extra suites need a sources line of their own.
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Above the base suite's 500 (and experimental's 1), below 1000: apt takes the listed packages from their
# suite, but would never downgrade one already installed.
EXTRA_SUITE_PRIORITY = 990

# Documentation, man pages and translations are not needed in images: keep copyright files only.
_DPKG_EXCLUDES = [
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
]


def _common_argv(spec: BootstrapBase) -> list[str]:
    argv = ["mmdebstrap", "--variant=minbase", "--mode=root", "--format=tar", f"--architectures={host_arch()}",
            "--aptopt=Acquire::Languages \"none\"", "--aptopt=APT::Install-Recommends \"false\"",
            # sid's Release file is valid for a week only; a mirror that lags (or a snapshot) would fail
            # with "Release file … is expired". Signatures are still checked.
            "--aptopt=Acquire::Check-Valid-Until \"false\"",
            # merged /usr without the usrmerge package, which would pull perl into every image
            "--hook-dir=/usr/share/mmdebstrap/hooks/maybe-merged-usr"]
    return argv + [f"--dpkgopt={rule}" for rule in _DPKG_EXCLUDES + prune_rules(spec)]


_CLEAN_HOOK = "--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*.bin \"$1\"/var/log/*.log"


def mmdebstrap_argv(spec: BootstrapBase, out: Path) -> list[str]:
    """A base without a lock entry: whatever the mirror has today."""
    argv = _common_argv(spec)
    if spec.packages:
        argv.append("--include=" + ",".join(sorted(set(spec.packages))))
    if spec.components != ["main"]:
        argv.append("--components=" + ",".join(spec.components))
    if spec.extra_suites:
        # Written before apt first reads its configuration, so the essential set is resolved with it too.
        prefs = shlex.quote(apt_preferences(spec))
        argv.append(f'--setup-hook=mkdir -p "$1"/etc/apt/preferences.d && printf %s {prefs} '
                    '> "$1"/etc/apt/preferences.d/builder-extra-suites.pref')
    argv.append(_CLEAN_HOOK)
    argv += ["--", spec.suite, str(out)]
    mirror = spec.mirror or (DEFAULT_MIRROR if spec.extra_suites else None)
    if mirror:
        argv.append(mirror)
        components = " ".join(spec.components)
        argv += [f"deb {mirror} {extra.suite} {components}" for extra in spec.extra_suites]
    return argv


def prune_rules(spec: BootstrapBase) -> list[str]:
    """dpkg filter rules for the base's `prune` entries: the last matching rule wins, so each keep follows its drop."""
    rules = []
    for prune in spec.prune:
        rules.append(f"path-exclude={prune.drop}")
        rules += [f"path-include={keep}" for keep in prune.keep]
    return rules


def apt_preferences(spec: BootstrapBase) -> str:
    """apt preferences that take each extra suite's packages from it, and nothing else."""
    stanzas = []
    for extra in spec.extra_suites:
        # A suite is named by its archive (experimental, unstable) or its codename (sid, trixie): match either.
        for field in ("a", "n"):
            stanzas.append(f"Package: {' '.join(sorted(set(extra.packages)))}\nPin: release {field}={extra.suite}\n"
                           f"Pin-Priority: {EXTRA_SUITE_PRIORITY}\n")
    return "\n".join(stanzas)


def locked_argv(spec: BootstrapBase, locked: LockedBase, repo: Path, out: Path, record: Path) -> list[str]:
    """A base from its locked .debs only (the repository at `repo`), asking for each package's locked version.

    The image keeps the base's real sources in /etc/apt/sources.list, and `record` gets what was installed.
    """
    versions = {deb.name: deb.version for deb in locked.resolved}
    unlocked = sorted(set(spec.packages) - set(versions))
    if unlocked:
        raise LockError(f"the {spec.suite} base's lock entry has no {unlocked[0]}",
                        "run `builder lock --refresh` to resolve the base again")
    argv = _common_argv(spec)
    if spec.packages:
        argv.append("--include=" + ",".join(f"{name}={versions[name]}" for name in sorted(set(spec.packages))))
    sources = "".join(source.line() + "\n" for source in apt_sources(spec))
    query = "chroot \"$1\" dpkg-query -W -f '${Package}\\t${Version}\\n'"
    argv += [f"--customize-hook={query} > {shlex.quote(str(record))}",
             f"--customize-hook=printf %s {shlex.quote(sources)} > \"$1\"/etc/apt/sources.list",
             _CLEAN_HOOK, "--", spec.suite, str(out), f"deb [trusted=yes] copy://{repo} {spec.suite} main"]
    return argv


def _check_installed(spec: BootstrapBase, locked: LockedBase, record: Path) -> None:
    """What dpkg says the base holds must be the lock's package set, version for version."""
    installed = dict(line.split("\t", 1) for line in record.read_text().splitlines() if "\t" in line)
    wanted = {deb.name: deb.version for deb in locked.resolved}
    for name in sorted(set(installed) | set(wanted)):
        if installed.get(name) != wanted.get(name):
            raise LockError(f"the {spec.suite} base ({lock_name(spec)}) got {name} {installed.get(name, '(none)')}, "
                            f"its lock has {wanted.get(name, '(none)')}",
                            "run `builder lock --refresh` to resolve the base again, and report it if it persists")


def _bootstrap_locked(spec: BootstrapBase, locked: LockedBase, partial: Path, log: Path) -> None:
    store = DebStore(cache_subdir("debs"))
    where = f"builder.lock: bases.{lock_name(spec)}"
    store.fetch_all(locked.resolved, apt_sources(spec), where)
    work = partial.parent
    write_repository(locked.resolved, store, spec.suite, host_arch(), work / "repo")
    record = work / "installed.txt"
    run_logged(locked_argv(spec, locked, work / "repo", partial, record), log,
               title=f"bootstrap {spec.suite} base from its {len(locked.resolved)} locked packages")
    _check_installed(spec, locked, record)


def _tarball_path(spec: BootstrapBase, locked: LockedBase | None) -> Path:
    return cache_subdir("bases") / f"{spec.suite}-{bootstrap_key(spec, locked)[:16]}.tar"


def prefetch_base(spec: ImageBase | BootstrapBase, locked: LockedBases | None = None) -> int:
    """A bootstrapped base's locked .debs into the store, unless its rootfs is cached already (then nothing
    is needed from the network); the number of packages checked. Registry bases are the engine's to pull."""
    if isinstance(spec, ImageBase):
        return 0
    entry = locked_for(spec, locked or {})
    if entry is None or _tarball_path(spec, entry).is_file():
        return 0
    where = f"builder.lock: bases.{lock_name(spec)}"
    DebStore(cache_subdir("debs")).fetch_all(entry.resolved, apt_sources(spec), where)
    return len(entry.resolved)


def _rootfs_tarball(spec: BootstrapBase, locked: LockedBase | None) -> Path:
    bases = cache_subdir("bases")
    key = bootstrap_key(spec, locked)
    tarball = _tarball_path(spec, locked)
    if tarball.is_file():
        return tarball
    if not shutil.which("mmdebstrap"):
        raise EngineError("mmdebstrap is not installed; it bootstraps base images from Debian packages",
                          "apt-get install mmdebstrap")
    if os.geteuid() != 0:
        raise EngineError(f"bootstrapping the {spec.suite} base needs root (mmdebstrap --mode=root)",
                          "run builder as root once to create it, or use a registry base pinned by digest")
    with holding(lock_file(f"base-{key}"), f"bootstrapping the {spec.suite} base"):
        if tarball.is_file():
            return tarball
        with temp_dir(bases) as tmp:
            partial = tmp / "rootfs.tar"
            log = bases / f"{spec.suite}-{key[:16]}.log"
            if locked is not None:
                _bootstrap_locked(spec, locked, partial, log)
            else:
                run_logged(mmdebstrap_argv(spec, partial), log,
                           title=f"bootstrap {spec.suite} base ({len(spec.packages)} extra packages)")
            os.replace(partial, tarball)
    return tarball


def ensure_base(engine: Engine, spec: ImageBase | BootstrapBase, locked: LockedBases | None = None) -> str:
    """Make the base available to the engine; returns the reference to build FROM.

    A bootstrapped base with an entry in `locked` is made from exactly its locked packages."""
    ref = base_ref(spec, locked)
    if isinstance(spec, ImageBase):
        if engine.inspect(ref) is None:
            try:
                run([*engine.command(), "pull", "--", ref], timeout=1800)
            except CommandError as exc:
                raise EngineError(f"cannot pull base image {ref}: {exc.last_line}",
                                  f"make the registry reachable, or `{engine.name} load` the image from a machine "
                                  "that can pull it") from None
        return ref
    if engine.inspect(ref) is None:
        # One run bootstraps and imports a base; another that needs it waits, then finds it there.
        entry = locked_for(spec, locked or {})
        with holding(lock_file(f"base-{engine.name}-{bootstrap_key(spec, entry)}"), f"importing the {spec.suite} base"):
            if engine.inspect(ref) is None:
                engine.import_rootfs(_rootfs_tarball(spec, entry), ref)
    return ref
