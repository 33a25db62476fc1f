"""The engine interface: the handful of operations builder needs from podman or docker."""

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from builder.recipe.targets import Host


@dataclass(frozen=True)
class ImageInfo:
    ref: str
    id: str  # sha256:<hex> of the image config: the local content address of the image
    labels: dict[str, str]
    size: int  # uncompressed bytes
    env: tuple[str, ...] = ()  # the image's ENV as KEY=VALUE, for roots that run without an engine (netboot)


class Engine(Protocol):
    """A container engine driven through its CLI (builds) and its API or CLI (inspection)."""

    name: str

    def available(self) -> str | None:
        """None when usable now, else the reason it is not."""

    def build(self, context: Path, tag: str, *, build_args: dict[str, str], labels: dict[str, str], log: Path,
              no_cache: bool = False, env_args: dict[str, str] | None = None) -> None:
        """Build context/Containerfile into `tag` on the host network; output goes to `log`.

        `env_args` are build arguments whose values go through the engine's environment, never its
        command line (which any local user can read): secrets.
        """

    def inspect(self, ref: str) -> ImageInfo | None:
        """The image's id, labels and size, or None when the engine has no such image."""

    def tag(self, ref: str, new_ref: str) -> None:
        """Add another name to an image."""

    def remove(self, ref: str) -> None:
        """Untag/remove an image by reference; no error when it is absent."""

    def remove_container(self, name: str) -> None:
        """Remove a container (stopping it); no error when it is absent."""

    def repair(self) -> None:
        """Remove what a killed engine command left half-written in the engine's storage."""

    def import_rootfs(self, tarball: Path, ref: str) -> None:
        """Import a root filesystem tarball as an image."""

    def export_rootfs(self, ref: str, tarball: Path) -> None:
        """Write the image's flattened root filesystem to a tarball (for netboot roots)."""

    def export_oci(self, ref: str, layout: Path) -> None:
        """Write the image as an OCI layout (index.json, blobs/) into the empty folder `layout`."""

    def command(self) -> list[str]:
        """argv prefix of the engine's CLI, e.g. ['podman'], for `stop`, `logs` and friends."""

    def device_flags(self, host: Host, driver_dirs: tuple[Path, ...] = ()) -> list[str]:
        """Flags that give a container the devices, groups, environment and host driver a variant needs."""

    def run_argv(self) -> list[str]:
        """argv prefix that starts a container, with the flags this host needs."""
