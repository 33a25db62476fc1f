"""`builder toolbox`: an image as a long-lived interactive container with Toolbx, distrobox or plain podman.

Each tool is a row of what it runs for create, enter and rm. The variant's run contract (devices, groups,
security options, environment, CDI) goes in the same way `builder run` passes it, as far as each tool lets it:

* Toolbx takes no podman flags. Its containers run --privileged with the host's /dev mounted, so every
  device node is there and seccomp is off; the environment is set per command (`env K=V CMD`).
* distrobox also runs --privileged with /dev mounted; the contract flags go through --additional-flags.
* plain podman gets the contract flags like `builder run`, plus host network, the user's home, and
  --userns=keep-id when rootless.
"""

import json
import os
import pwd
import shlex
import shutil
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from builder.core.errors import EngineError, RecipeError
from builder.core.paths import cache_subdir
from builder.core.run import LOCAL_TIMEOUT, replace_process, run
from builder.engines.podman import PodmanEngine, quirk_containers_conf
from builder.recipe.targets import Host

LABEL = "dev.builder.toolbox"
# Our images carry Toolbx's label, and containers inherit image labels: containers that Toolbx did not create
# say so, or `toolbox list` would show them and `toolbox enter` would fail on them.
NOT_TOOLBX = "com.github.containers.toolbox=false"


class Tool(StrEnum):
    TOOLBOX = "toolbox"
    DISTROBOX = "distrobox"
    PODMAN = "podman"


TOOL_CHOICES = ("auto", *(t.value for t in Tool))


def pick_tool(name: str) -> Tool:
    """`auto`: Toolbx if installed, else distrobox, else plain podman."""
    if name != "auto":
        if name not in {t.value for t in Tool}:
            raise RecipeError(f"--tool: unknown tool {name!r}", f"choose one of: {', '.join(TOOL_CHOICES)}")
        return Tool(name)
    for tool in (Tool.TOOLBOX, Tool.DISTROBOX):
        if shutil.which(tool.value):
            return tool
    return Tool.PODMAN


@dataclass(frozen=True)
class Box:
    """One toolbox container: its name, image, the tool that manages it and the variant's contract."""

    tool: Tool
    name: str
    image: str
    host: Host = field(default_factory=Host)
    engine: PodmanEngine = field(default_factory=PodmanEngine)

    def contract_flags(self) -> list[str]:
        return self.engine.device_flags(self.host)

    def create(self) -> list[list[str]]:
        """The commands that create (and for plain podman, start) the container, in order."""
        if self.tool is Tool.TOOLBOX:
            return [["toolbox", "create", "--image", self.image, self.name]]
        if self.tool is Tool.DISTROBOX:
            # --no-entry: no desktop launcher, whose icon distrobox would otherwise download from the internet.
            argv = ["distrobox", "create", "--yes", "--no-entry", "--image", self.image, "--name", self.name]
            flags = ["--label", NOT_TOOLBX, *self.contract_flags()]
            return [argv + ["--additional-flags", shlex.join(flags)]]
        return [self._podman_create(), [*self.engine.command(), "start", self.name]]

    def _podman_create(self) -> list[str]:
        home = str(Path.home())
        argv = [*self.engine.command(), "create", *self.engine.container_flags(),
                "--name", self.name, "--hostname", self.name, "--label", f"{LABEL}=true", "--label", NOT_TOOLBX,
                "--network", "host",
                # The home folder must stay as it is on the host: no SELinux relabelling of it.
                "--security-opt", "label=disable",
                "--volume", f"{home}:{home}", "--env", f"HOME={home}", "--workdir", home]
        if os.geteuid() != 0:
            argv += ["--userns", "keep-id"]
        argv += self.contract_flags()
        # The image's entrypoint runs roles; a toolbox only needs a process that keeps the container up.
        # sleep as PID 1 ignores SIGTERM, so stop with SIGKILL right away instead of after a timeout.
        return [*argv, "--stop-signal", "SIGKILL", "--entrypoint", "sleep", "--", self.image, "infinity"]

    def enter(self, command: list[str], tty: bool) -> list[list[str]]:
        """The commands that enter the container; the last one replaces builder's process."""
        env = [f"{k}={v}" for k, v in self.host.env.items()]
        if self.tool is Tool.TOOLBOX:
            if not command and not env:
                return [["toolbox", "enter", self.name]]
            # Toolbx sets no container environment of its own; the contract's goes on the command.
            inner = command or ["bash", "--login"]
            return [["toolbox", "run", "--container", self.name, *(["env", *env] if env else []), *inner]]
        if self.tool is Tool.DISTROBOX:
            return [["distrobox", "enter", "--name", self.name, *(["--", *command] if command else [])]]
        home = str(Path.home())
        cwd = Path.cwd()
        workdir = str(cwd) if cwd == Path(home) or Path(home) in cwd.parents else home
        exec_argv = [*self.engine.command(), "exec", "--interactive", *(["--tty"] if tty else []),
                     "--workdir", workdir, *(["--env", "TERM"] if tty and "TERM" in os.environ else []),
                     self.name, *(command or ["bash", "--login"])]
        return [[*self.engine.command(), "start", self.name], exec_argv]

    def remove(self) -> list[list[str]]:
        if self.tool is Tool.TOOLBOX:
            return [["toolbox", "rm", "--force", self.name]]
        if self.tool is Tool.DISTROBOX:
            return [["distrobox", "rm", "--force", self.name]]
        return [[*self.engine.command(), "rm", "--force", "--time", "0", self.name]]

    def tool_env(self) -> dict[str, str]:
        """Variables Toolbx and distrobox need on top of the caller's environment (none for plain podman).

        This host's podman quirks go in a containers.conf, as the tools cannot pass them as flags; podman
        records the runtime and limits in the container, so they only matter at `create`.
        """
        if self.tool is Tool.PODMAN:
            return {}
        extra: dict[str, str] = {}
        # Toolbx takes the user's shell from $SHELL only and refuses to work without it (cron, CI, su -c).
        if self.tool is Tool.TOOLBOX and not os.environ.get("SHELL"):
            extra["SHELL"] = pwd.getpwuid(os.getuid()).pw_shell or "/bin/sh"
        conf = quirk_containers_conf()
        if conf is not None and "CONTAINERS_CONF" not in os.environ:
            path = cache_subdir("toolbox") / "containers.conf"
            if not path.is_file() or path.read_text() != conf:
                path.write_text(conf)
            extra["CONTAINERS_CONF"] = str(path)
        return extra


def check_tool(tool: Tool) -> None:
    """The tool must be installed, and podman must work (Toolbx and distrobox drive podman too)."""
    if tool is not Tool.PODMAN and not shutil.which(tool.value):
        package = {Tool.TOOLBOX: "podman-toolbox", Tool.DISTROBOX: "distrobox"}[tool]
        raise EngineError(f"--tool {tool.value}: {tool.value} is not installed", f"apt-get install {package}")
    reason = PodmanEngine().available()
    if reason:
        raise EngineError(f"builder toolbox needs podman: {reason}", "apt-get install podman")
    if tool is Tool.DISTROBOX and os.geteuid() == 0:
        raise EngineError("distrobox refuses to run as root",
                          "run builder toolbox as your own user (rootless podman), or use --tool podman")


def exists(box: Box) -> bool:
    proc = run([*box.engine.command(), "container", "exists", box.name], check=False, timeout=LOCAL_TIMEOUT)
    return proc.returncode == 0


def tool_of(name: str) -> Tool | None:
    """Which tool made an existing container, from its labels; None when there is no such container."""
    proc = run([*PodmanEngine().command(), "container", "inspect", "--format", "{{json .Config.Labels}}", name],
               check=False, timeout=LOCAL_TIMEOUT)
    if proc.returncode != 0:
        return None
    labels = json.loads(proc.stdout or "{}") or {}
    if labels.get(LABEL) == "true":
        return Tool.PODMAN
    if labels.get("manager") == "distrobox":
        return Tool.DISTROBOX
    return Tool.TOOLBOX if labels.get("com.github.containers.toolbox") == "true" else None


def run_steps(steps: list[list[str]], extra_env: dict[str, str] | None = None) -> None:
    """Run every step but the last, then replace this process with the last (an interactive tool)."""
    env = {**os.environ, **extra_env} if extra_env else None
    for argv in steps[:-1]:
        run(argv, env=env, timeout=600)
    replace_process(steps[-1], env)
