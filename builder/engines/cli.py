"""The engine interface, and what podman and docker share: their build and run CLIs take the same flags for what
we use."""

import os
import secrets
import shutil
from abc import ABC, abstractmethod
from pathlib import Path

from builder.core.run import LOCAL_TIMEOUT, run, run_logged
from builder.engines.base import ImageInfo
from builder.engines.cleanup import forget_container, record_container, temp_path
from builder.engines.host import driver_volumes
from builder.recipe.targets import Host


class Engine(ABC):
    """A container engine driven through its CLI (builds) and its API or CLI (inspection)."""

    name = ""
    binary = ""

    @abstractmethod
    def inspect(self, ref: str) -> ImageInfo | None:
        """The image's id, labels and size, or None when the engine has no such image."""

    @abstractmethod
    def export_oci(self, ref: str, layout: Path) -> None:
        """Write the image as an OCI layout (index.json, blobs/) into the empty folder `layout`."""

    def command(self) -> list[str]:
        """argv prefix of the engine's CLI, e.g. ['podman'], for `stop`, `logs` and friends."""
        return [self.binary]

    def container_flags(self) -> list[str]:
        """Flags every container this engine starts needs on this host (builds included)."""
        return []

    def device_flags(self, host: Host, driver_dirs: tuple[Path, ...] = ()) -> list[str]:
        """Devices, groups, security options, environment and host driver mounts a variant's container needs.

        Devices and driver libraries missing on the host are left out (`builder doctor` explains them).
        Access goes through the device nodes' own group ids, which need not exist by name inside the image.
        `driver_dirs` are searched for the driver before the host's library folders.
        """
        flags: list[str] = []
        gids: set[int] = set()
        for device in host.devices:
            path = Path(device)
            if not path.exists():
                continue
            flags += ["--device", device]
            nodes = [p for p in path.iterdir() if not p.is_dir()] if path.is_dir() else [path]
            gids |= {node.stat().st_gid for node in nodes}
        if gids:
            flags += self._group_flags(sorted(gids))
        for option in host.security:
            flags += ["--security-opt", option]
        for key, value in host.env.items():
            flags += ["--env", f"{key}={value}"]
        if host.cdi:
            flags += self._cdi_flags(host.cdi)
        if host.driver:
            volumes, _ = driver_volumes(host.driver, driver_dirs)
            flags += [flag for volume in volumes for flag in ("--volume", volume)]
        return flags

    def _group_flags(self, gids: list[int]) -> list[str]:
        return [flag for gid in gids for flag in ("--group-add", str(gid))]

    def _cdi_flags(self, name: str) -> list[str]:
        return ["--device", name]

    def run_argv(self) -> list[str]:
        """argv prefix that starts a container, with the flags this host needs."""
        return [*self.command(), "run", *self.container_flags()]

    def available(self) -> str | None:
        """None when usable now, else the reason it is not."""
        return self._works() if shutil.which(self.binary) else f"{self.binary} is not installed"

    def _works(self) -> str | None:
        """Installed: None when the engine answers, else why not."""
        return None

    def _build_env(self) -> dict[str, str] | None:
        return None

    def build(self, context: Path, tag: str, *, build_args: dict[str, str], labels: dict[str, str], log: Path,
              no_cache: bool = False, env_args: dict[str, str] | None = None) -> None:
        """Build context/Containerfile into `tag` on the host network; output goes to `log`.

        `env_args` are build arguments whose values go through the engine's environment, never its
        command line (which any local user can read): secrets.
        """
        argv = [*self.command(), "build", *self.container_flags(), "--network", "host",
                "-f", str(context / "Containerfile"), "-t", tag]
        for key, value in build_args.items():
            argv += ["--build-arg", f"{key}={value}"]
        env = self._build_env()
        if env_args:
            # `--build-arg KEY` alone: both engines read the value from their environment
            env = {**(env if env is not None else os.environ), **env_args}
            argv += [flag for key in env_args for flag in ("--build-arg", key)]
        for key, value in labels.items():
            argv += ["--label", f"{key}={value}"]
        if no_cache:
            argv.append("--no-cache")
        argv += ["--", str(context)]
        run_logged(argv, log, title=f"{self.name} build {tag}", env=env)

    def import_rootfs(self, tarball: Path, ref: str) -> None:
        run([*self.command(), "import", "--change", 'CMD ["/bin/bash"]', "--", str(tarball), ref], timeout=600)

    def export_rootfs(self, ref: str, tarball: Path) -> None:
        """Write the image's flattened root filesystem to a tarball (for netboot roots)."""
        # Named and recorded before it exists, so a killed run's container is removed by the next run.
        container = record_container(self.name, f"builder-export-{secrets.token_hex(6)}")
        partial = temp_path(tarball.parent)
        try:
            run([*self.command(), "create", "--name", container, "--", ref], timeout=LOCAL_TIMEOUT)
            run([*self.command(), "export", "-o", str(partial), "--", container], timeout=1800)
            os.replace(partial, tarball)
        finally:
            partial.unlink(missing_ok=True)
            self.remove_container(container)
            forget_container(self.name, container)

    def remove_container(self, name: str) -> None:
        run([*self.command(), "rm", "--force", "--", name], check=False, timeout=LOCAL_TIMEOUT)

    def tag(self, ref: str, new_ref: str) -> None:
        run([*self.command(), "tag", "--", ref, new_ref], timeout=LOCAL_TIMEOUT)

    def remove(self, ref: str) -> None:
        run([*self.command(), "rmi", "--force", "--", ref], check=False)

    def repair(self) -> None:
        """Remove what a killed engine command left half-written in the engine's storage.

        Nothing by default: docker's daemon finishes or rolls back its own writes."""
        return None
