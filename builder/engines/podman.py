"""Podman (rootful or rootless): CLI for everything, with host quirks detected at call time."""

import json
import logging
import os
import re
import resource
import shutil
from functools import cache
from pathlib import Path

from builder.core.run import run
from builder.engines.base import ImageInfo
from builder.engines.cli import Engine

# Podman raises these limits in every container by default; a host with lower hard limits (and no
# CAP_SYS_RESOURCE) makes the OCI runtime fail with "setrlimit: Operation not permitted".
_PODMAN_NOFILE = 1_048_576
_PODMAN_NPROC = 4_194_304
# Podman 4.x writes an image's record before its manifest: a build killed between the two leaves an image
# that has neither manifest nor name, and every later inspect of an image built on top of it fails with this.
_HALF_MADE = re.compile(r'locating item named "manifest" for image with ID "([0-9a-f]{64})"')
_REPAIRS = 8  # half-made images removed in one go at most (a kill leaves one or two)
log = logging.getLogger("builder")


def _hybrid_cgroups() -> bool:
    """cgroup v1 with a v2 hierarchy beside it: crun refuses to start containers there."""
    return os.path.ismount("/sys/fs/cgroup/unified") and not os.path.exists("/sys/fs/cgroup/cgroup.controllers")


def _pid_max() -> int:
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            return int(f.read())
    except OSError:
        return _PODMAN_NPROC


@cache
def _ulimit_flags() -> tuple[str, ...]:
    flags: list[str] = []
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if 0 < nofile < _PODMAN_NOFILE:
        flags += ["--ulimit", f"nofile={nofile}:{nofile}"]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    nproc = min(nproc if nproc > 0 else _PODMAN_NPROC, _pid_max())
    if nproc < _PODMAN_NPROC:
        flags += ["--ulimit", f"nproc={nproc}:{nproc}"]
    return tuple(flags)


def quirk_containers_conf() -> str | None:
    """This host's quirks as a containers.conf, for tools that run podman themselves (Toolbx, distrobox).

    None on a host without them: the file replaces the system's containers.conf while it is in use.
    """
    lines: list[str] = []
    limits = [flag for flag in _ulimit_flags() if flag != "--ulimit"]
    if limits:
        lines += ["[containers]", f"default_ulimits = {json.dumps(limits)}"]
    if _hybrid_cgroups() and shutil.which("runc"):
        lines += ["[engine]", 'runtime = "runc"']
    return "\n".join(["# written by builder toolbox: this host's podman quirks", *lines, ""]) if lines else None


class PodmanEngine(Engine):
    name = "podman"
    binary = "podman"

    def command(self) -> list[str]:
        if _hybrid_cgroups() and shutil.which("runc"):
            return ["podman", "--runtime", "runc"]
        return ["podman"]

    def container_flags(self) -> list[str]:
        return list(_ulimit_flags())

    def _group_flags(self, gids: list[int]) -> list[str]:
        # Rootless podman cannot map named or numeric host groups; keep-groups passes the user's own.
        return ["--group-add", "keep-groups"] if os.geteuid() != 0 else super()._group_flags(gids)

    def _works(self) -> str | None:
        if _hybrid_cgroups() and not shutil.which("runc"):
            return "podman's crun cannot run containers on this host's hybrid cgroups; apt-get install runc"
        proc = run(["podman", "info", "--format", "{{.Store.GraphDriverName}}"], check=False, timeout=60)
        return None if proc.returncode == 0 else f"podman does not work: {proc.stderr.strip()[:200]}"

    def export_oci(self, ref: str, layout: Path) -> None:
        # gzip layers: what every registry and engine accepts; podman reuses compressed blobs it made before.
        run([*self.command(), "push", "--quiet", "--compression-format", "gzip", "--", ref, f"oci:{layout}:image"],
            timeout=1800)

    def _drop_half_made(self, stderr: str) -> bool:
        """Remove the half-made image an error names (podman itself advises it); False when none is named."""
        found = _HALF_MADE.search(stderr)
        if found is None:
            return False
        log.warning("podman's storage holds image %s without a manifest (a build was killed while it wrote it); "
                    "removing it", found[1][:12])
        run([*self.command(), "rmi", "--force", "--", found[1]], check=False, timeout=300)
        return True

    def repair(self) -> None:
        for _ in range(_REPAIRS):
            proc = run([*self.command(), "images", "--all", "--quiet"], check=False, timeout=300)
            if proc.returncode == 0 or not self._drop_half_made(proc.stderr):
                return

    def inspect(self, ref: str) -> ImageInfo | None:
        for _ in range(_REPAIRS):
            proc = run(["podman", "image", "inspect", "--", ref], check=False)
            if proc.returncode == 0 or not self._drop_half_made(proc.stderr):
                break
        if proc.returncode != 0:
            return None
        data = json.loads(proc.stdout)[0]
        image_id = data["Id"] if data["Id"].startswith("sha256:") else f"sha256:{data['Id']}"
        env = tuple((data.get("Config") or {}).get("Env") or ())
        return ImageInfo(ref=ref, id=image_id, labels=data.get("Labels") or {}, size=int(data.get("Size", 0)),
                         env=env)
