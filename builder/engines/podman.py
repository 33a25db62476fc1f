"""Podman (rootful or rootless): CLI for everything."""

import json

from builder.engines.base import ImageInfo
from builder.engines.cli import CliEngine
from builder.run import run


class PodmanEngine(CliEngine):
    name = "podman"
    binary = "podman"

    def available(self) -> str | None:
        missing = self._installed()
        if missing:
            return missing
        proc = run(["podman", "info", "--format", "{{.Store.GraphDriverName}}"], check=False, timeout=60)
        return None if proc.returncode == 0 else f"podman does not work: {proc.stderr.strip()[:200]}"

    def inspect(self, ref: str) -> ImageInfo | None:
        proc = run(["podman", "image", "inspect", ref], check=False)
        if proc.returncode != 0:
            return None
        data = json.loads(proc.stdout)[0]
        image_id = data["Id"] if data["Id"].startswith("sha256:") else f"sha256:{data['Id']}"
        return ImageInfo(ref=ref, id=image_id, labels=data.get("Labels") or {}, size=int(data.get("Size", 0)))
