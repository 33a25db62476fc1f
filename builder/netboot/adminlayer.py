"""What every netbooted root gets from its own Debian suite at `pxe build`: systemd (the node's PID 1) and
systemd-journal-remote (systemd-journal-gatewayd: the journal for `builder cluster logs`), and what operators
reach, openssh-server and prometheus-node-exporter.

Pinned in builder.lock (`netboot_admin.<suite>`: the four packages and everything they depend on, each .deb with
its version and sha256, resolved by `builder lock` like a netboot kernel). `pxe build` reads the root's suite from
its /etc/os-release, fetches that suite's pinned .debs and unpacks into the root those packages its dpkg
database does not list (no maintainer scripts run: builder/netboot/nodeunits.py adds the journal's group, the
node makes the users at boot and the ssh host key on first start). Packages that only serve maintainer scripts
are left out. The image itself is untouched: adding them changes no image's fingerprint, only the netboot set
(docs/design.md says why). The node runs the ssh server and the exporter only when its plan says so (a cluster
file's `admins:`)"""

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.core.errors import EngineError, LockError
from builder.core.paths import cache_subdir
from builder.core.run import run
from builder.fetch.debian import AptSource, resolve_packages, suite_sources
from builder.fetch.debstore import DebStore
from builder.netboot.elf import needed
from builder.plan.bases import host_arch
from builder.recipe.models import LockedBase

PACKAGES = ("openssh-server", "prometheus-node-exporter", "systemd", "systemd-journal-remote")
# The Debian suites whose roots builder netboots today; `builder lock` pins the layer of each.
SUITES = ("bookworm", "trixie", "forky")
# Dependencies that serve only maintainer scripts (which never run on the node): not unpacked.
NOT_UNPACKED = ("adduser", "debconf", "lsb-base", "runit-helper", "sensible-utils", "ucf", "usrmerge")
# What the node runs: their libraries must be in the root.
PROGRAMS = ("usr/sbin/sshd", "usr/bin/ssh-keygen", "usr/bin/prometheus-node-exporter", "lib/systemd/systemd",
            "lib/systemd/systemd-journal-gatewayd")
# systemd's own libraries (libsystemd-shared-NNN.so) are in its private folder, found through its RUNPATH
LIBRARY_DIRS = ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu", "usr/lib", "lib",
                "usr/lib/x86_64-linux-gnu/systemd", "usr/lib/systemd", "lib/systemd")
HINT = "run `builder lock` to pin it (resolved from Debian's archive), review the diff and commit builder.lock"


@dataclass(frozen=True)
class AdminSpec:
    suite: str

    def lock_inputs(self) -> dict[str, Any]:
        return {"suite": self.suite, "components": ["main"], "packages": list(PACKAGES)}

    def sources(self) -> list[AptSource]:
        return suite_sources(self.suite, ("main",))


SPECS = {suite: AdminSpec(suite) for suite in SUITES}


def resolve_admin(spec: AdminSpec) -> LockedBase:
    """The lock entry of a suite's layer: its packages and their dependencies as the archive has them now."""
    return LockedBase(inputs=spec.lock_inputs(), resolved=resolve_packages(spec.sources(), host_arch(), PACKAGES))


def layers_key(entries: dict[str, LockedBase]) -> str:
    """What the pinned layers add to a netboot set's key: their .debs."""
    debs = {suite: sorted(deb.sha256 for deb in entry.resolved) for suite, entry in sorted(entries.items())}
    return hashlib.sha256(json.dumps(debs, sort_keys=True).encode()).hexdigest()


def root_suite(root: Path) -> str | None:
    """The Debian suite of an extracted root (VERSION_CODENAME in its os-release); None for another distribution."""
    for name in ("etc/os-release", "usr/lib/os-release"):
        path = root / name
        if path.is_file() and not path.is_symlink():
            fields = dict(re.findall(r"^([A-Z_]+)=\"?([^\"\n]*)\"?$", path.read_text(errors="replace"), re.MULTILINE))
            if fields.get("ID") != "debian":
                return None
            return fields.get("VERSION_CODENAME") or None
    return None


def installed(root: Path) -> set[str]:
    """The packages the root's dpkg database lists as installed."""
    status = root / "var/lib/dpkg/status"
    if not status.is_file():
        return set()
    out = set()
    for block in status.read_text(errors="replace").split("\n\n"):
        name = re.search(r"^Package: (\S+)$", block, re.MULTILINE)
        if name and re.search(r"^Status: install ok installed$", block, re.MULTILINE):
            out.add(name.group(1))
    return out


def add_admin_layer(root: Path, entries: dict[str, LockedBase], where: str) -> dict[str, object]:
    """Unpack the root's suite's pinned ssh server and metrics exporter into `root`; returns what the manifest
    records of them (`suite`, `packages` unpacked with their versions), or why there are none (`missing`)."""
    suite = root_suite(root)
    if suite is None:
        return {"missing": "the root is not Debian: no pinned ssh server or exporter for it"}
    entry = entries.get(suite)
    if entry is None:
        if suite in SPECS:
            raise LockError(f"{where}: netboot_admin.{suite}: the ssh server and exporter of {suite} roots are not "
                            "pinned", HINT)
        return {"missing": f"no ssh server or exporter is pinned for {suite} roots"}
    have = installed(root)
    wanted = [deb for deb in entry.resolved if deb.name not in have and deb.name not in NOT_UNPACKED]
    paths = DebStore(cache_subdir("debs")).fetch_all(wanted, SPECS[suite].sources(), where)
    for path in paths:
        run(["dpkg-deb", "--extract", "--", str(path), str(root)], timeout=600)
    for program in PROGRAMS:
        if not (root / program).is_file():
            raise EngineError(f"the pinned packages of {suite} have no /{program}", HINT)
        absent = [soname for soname in needed(root / program)
                  if not any(os.path.lexists(root / folder / soname) for folder in LIBRARY_DIRS)]
        if absent:
            raise EngineError(f"/{program} (pinned for {suite}) needs {', '.join(absent)}, which the root lacks",
                              "pin the ssh server again: builder lock --refresh-netboot")
    return {"suite": suite, "packages": {deb.name: deb.version for deb in wanted}}
