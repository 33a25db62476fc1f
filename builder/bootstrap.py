"""Base images bootstrapped from Debian packages (mmdebstrap, minbase), cached by their inputs.

No registry is reachable on our machines, so the default recipes start from here. The rootfs tarball is
kept in the cache, so a second engine imports it without bootstrapping again.
"""

import hashlib
import json
import os
import shlex
import shutil
import tempfile
from pathlib import Path

from builder.engines import Engine
from builder.errors import CommandError, EngineError
from builder.models import BootstrapBase, ImageBase
from builder.paths import cache_subdir
from builder.run import run, run_logged

# Bump when the way a base is made changes, so old cached bases are not reused.
BOOTSTRAP_VERSION = "2"
BASE_REPOSITORY = "localhost/builder-base"
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


def host_arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def bootstrap_key(spec: BootstrapBase) -> str:
    later_fields = {"components", "extra_suites", "prune"}
    inputs = {"v": BOOTSTRAP_VERSION, "arch": host_arch(), **spec.model_dump(exclude=later_fields)}
    inputs["packages"] = sorted(set(spec.packages))
    # Only non-default values of fields added later enter the key, so bases made before keep their names.
    if spec.components != ["main"]:
        inputs["components"] = sorted(set(spec.components))
    if spec.extra_suites:
        inputs["extra_suites"] = [{"suite": e.suite, "packages": sorted(set(e.packages))} for e in spec.extra_suites]
    if spec.prune:
        inputs["prune"] = [p.model_dump() for p in spec.prune]
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def base_ref(spec: ImageBase | BootstrapBase) -> str:
    """The reference a Containerfile's FROM uses for this base."""
    if isinstance(spec, ImageBase):
        return spec.ref
    return f"{BASE_REPOSITORY}:{spec.suite}-{bootstrap_key(spec)[:16]}"


def mmdebstrap_argv(spec: BootstrapBase, out: Path) -> list[str]:
    argv = ["mmdebstrap", "--variant=minbase", "--mode=root", "--format=tar", f"--architectures={host_arch()}",
            "--aptopt=Acquire::Languages \"none\"", "--aptopt=APT::Install-Recommends \"false\"",
            # sid's Release file is valid for a week only; a mirror that lags (or a snapshot) would fail
            # with "Release file … is expired". Signatures are still checked.
            "--aptopt=Acquire::Check-Valid-Until \"false\"",
            # merged /usr without the usrmerge package, which would pull perl into every image
            "--hook-dir=/usr/share/mmdebstrap/hooks/maybe-merged-usr"]
    argv += [f"--dpkgopt={rule}" for rule in _DPKG_EXCLUDES + prune_rules(spec)]
    if spec.packages:
        argv.append("--include=" + ",".join(sorted(set(spec.packages))))
    if spec.components != ["main"]:
        argv.append("--components=" + ",".join(spec.components))
    if spec.extra_suites:
        # Written before apt first reads its configuration, so the essential set is resolved with it too.
        prefs = shlex.quote(apt_preferences(spec))
        argv.append(f'--setup-hook=mkdir -p "$1"/etc/apt/preferences.d && printf %s {prefs} '
                    '> "$1"/etc/apt/preferences.d/builder-extra-suites.pref')
    argv.append("--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*.bin \"$1\"/var/log/*.log")
    argv += [spec.suite, str(out)]
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


def _rootfs_tarball(spec: BootstrapBase) -> Path:
    bases = cache_subdir("bases")
    key = bootstrap_key(spec)
    tarball = bases / f"{spec.suite}-{key[:16]}.tar"
    if tarball.is_file():
        return tarball
    if not shutil.which("mmdebstrap"):
        raise EngineError("mmdebstrap is not installed; it bootstraps base images from Debian packages",
                          "apt-get install mmdebstrap")
    if os.geteuid() != 0:
        raise EngineError(f"bootstrapping the {spec.suite} base needs root (mmdebstrap --mode=root)",
                          "run builder as root once to create it, or use a registry base pinned by digest")
    tmp = Path(tempfile.mkdtemp(dir=bases, prefix=".bootstrap-"))
    try:
        partial = tmp / "rootfs.tar"
        run_logged(mmdebstrap_argv(spec, partial), bases / f"{spec.suite}-{key[:16]}.log",
                   title=f"bootstrap {spec.suite} base ({len(spec.packages)} extra packages)")
        os.replace(partial, tarball)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tarball


def ensure_base(engine: Engine, spec: ImageBase | BootstrapBase) -> str:
    """Make the base available to the engine; returns the reference to build FROM."""
    ref = base_ref(spec)
    if isinstance(spec, ImageBase):
        if engine.inspect(ref) is None:
            try:
                run([*engine.command(), "pull", ref], timeout=1800)
            except CommandError as exc:
                last = (exc.tail.strip().splitlines() or [exc.message])[-1]
                raise EngineError(f"cannot pull base image {ref}: {last}",
                                  f"make the registry reachable, or `{engine.name} load` the image from a machine "
                                  "that can pull it") from None
        return ref
    if engine.inspect(ref) is None:
        engine.import_rootfs(_rootfs_tarball(spec), ref)
    return ref
