"""Docker: the CLI builds (BuildKit when buildx is there, else the legacy builder); the SDK inspects."""

import os
from pathlib import Path

import docker
import docker.errors

from builder.core.run import run
from builder.engines.base import ImageInfo
from builder.engines.cli import Engine
from builder.engines.oci import layout_from_docker_archive


class DockerEngine(Engine):
    name = "docker"
    binary = "docker"

    def __init__(self) -> None:
        self._client: docker.DockerClient | None = None

    def client(self) -> docker.DockerClient:
        if self._client is None:
            self._client = docker.from_env(timeout=120)
        return self._client

    def _works(self) -> str | None:
        try:
            self.client().ping()
        except docker.errors.DockerException as exc:
            return f"the docker daemon is not reachable ({str(exc)[:120]}); start dockerd"
        return None

    def _build_env(self) -> dict[str, str] | None:
        # Checked at call time: Debian's docker.io ships no buildx, and newer CLIs refuse to fall back to
        # the legacy builder unless told. Our Containerfiles build on both.
        env = dict(os.environ)
        if run(["docker", "buildx", "version"], check=False).returncode != 0:
            env["DOCKER_BUILDKIT"] = "0"
        return env

    def _cdi_flags(self, name: str) -> list[str]:
        # Debian's docker 20.10 predates CDI; the NVIDIA runtime hook takes --gpus.
        return ["--gpus", "all"]

    def export_oci(self, ref: str, layout: Path) -> None:
        archive = layout / ".save.tar"
        try:
            run([*self.command(), "save", "-o", str(archive), "--", ref], timeout=1800)
            layout_from_docker_archive(archive, layout)
        finally:
            archive.unlink(missing_ok=True)

    def inspect(self, ref: str) -> ImageInfo | None:
        try:
            image = self.client().images.get(ref)
        except docker.errors.ImageNotFound:
            return None
        attrs = image.attrs
        labels = (attrs.get("Config") or {}).get("Labels") or {}
        env = tuple((attrs.get("Config") or {}).get("Env") or ())
        return ImageInfo(ref=ref, id=str(image.id), labels=labels, size=int(attrs.get("Size", 0)), env=env)
