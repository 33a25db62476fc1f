"""What podman and docker share: their build and run CLIs take the same flags for what we use."""

import os
import shutil
from pathlib import Path

from builder.run import run, run_logged


class CliEngine:
    name = ""
    binary = ""

    def command(self) -> list[str]:
        return [self.binary]

    def container_flags(self) -> list[str]:
        """Flags every container this engine starts needs on this host (builds included)."""
        return []

    def run_argv(self) -> list[str]:
        return [*self.command(), "run", *self.container_flags()]

    def _installed(self) -> str | None:
        return None if shutil.which(self.binary) else f"{self.binary} is not installed"

    def _build_env(self) -> dict[str, str] | None:
        return None

    def build(
        self,
        context: Path,
        tag: str,
        *,
        build_args: dict[str, str],
        labels: dict[str, str],
        log: Path,
        no_cache: bool = False,
    ) -> None:
        argv = [*self.command(), "build", *self.container_flags(), "--network", "host",
                "-f", str(context / "Containerfile"), "-t", tag]
        for key, value in build_args.items():
            argv += ["--build-arg", f"{key}={value}"]
        for key, value in labels.items():
            argv += ["--label", f"{key}={value}"]
        if no_cache:
            argv.append("--no-cache")
        argv.append(str(context))
        run_logged(argv, log, title=f"{self.name} build {tag}", env=self._build_env())

    def import_rootfs(self, tarball: Path, ref: str) -> None:
        run([*self.command(), "import", "--change", 'CMD ["/bin/bash"]', str(tarball), ref], timeout=600)

    def export_rootfs(self, ref: str, tarball: Path) -> None:
        container = run([*self.command(), "create", ref]).stdout.strip().splitlines()[-1]
        partial = tarball.with_name(f".{tarball.name}.part")
        try:
            run([*self.command(), "export", "-o", str(partial), container], timeout=1800)
            os.replace(partial, tarball)
        finally:
            partial.unlink(missing_ok=True)
            run([*self.command(), "rm", "--force", container], check=False)

    def tag(self, ref: str, new_ref: str) -> None:
        run([*self.command(), "tag", ref, new_ref])

    def remove(self, ref: str) -> None:
        run([*self.command(), "rmi", "--force", ref], check=False)
