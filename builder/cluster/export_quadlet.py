"""`builder cluster export --format quadlet`: podman Quadlet units for a cluster file's processes.

Per node a folder of units for /etc/containers/systemd/: one `.container` per process (its server, RPC
worker or pipeline rank), running the same image arguments as the `builder run` line `builder cluster
commands` prints for it, with what `builder run` adds for the node's variant; Ray pipelines are left out, as
`cluster commands` leaves them out. What the units hold: docs/clusters.md, "Quadlet units"; why podman 4.9's
keys only and device groups found when the unit starts: docs/design.md.
"""

import re
import shlex
from collections.abc import Callable
from pathlib import Path

from builder.cluster.commands import is_ray_pipeline
from builder.cluster.export_kube import (
    RPC_CACHE,
    Export,
    Exporter,
    Models,
    line_env,
    model_check,
    source_name,
    split_run,
    unit_name,
)
from builder.cluster.model import Loaded, Process
from builder.core.errors import RecipeError
from builder.recipe.load import builds_rpc_rdma, display_path
from builder.recipe.targets import TARGETS, Host
from builder.use.launch import RDMA_DEVICES

# The oldest podman whose Quadlet accepts every key these units use.
MIN_PODMAN = "4.9"
# Every key the units write is in podman 4.9's podman-systemd.unit(5) ([Container], [Volume]) or systemd's own
# sections, which pass through Quadlet (tests/unit/test_cluster_export_quadlet.py checks every file).
HEADER = "# Written by `builder cluster export --format quadlet` from {source}: regenerate it, do not edit.\n"
# Where a unit's ExecStartPre leaves the device groups it found, for PodmanArgs=$BUILDER_GROUPS.
GROUPS_DIR = "/run/builder"
GROUPS_VARIABLE = "BUILDER_GROUPS"
# A model loads for a long time (a 34B GGUF from a slow disk): health checks count only after this.
START_PERIOD = "1h"
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")
_MODEL_FLAGS = ("-m", "--model")


def systemd_word(word: str) -> str:
    """One word of a command line as systemd (and Quadlet's Exec=, PodmanArgs=) reads it: plain, or double
    quoted with \\ and " escaped; % and $ doubled, so systemd expands neither."""
    if any(ord(c) < 32 or ord(c) == 127 for c in word):
        raise RecipeError(f"{word!r}: a control character cannot go into a systemd unit")
    word = word.replace("%", "%%").replace("$", "$$")
    if word and _PLAIN_WORD.fullmatch(word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_line(words: list[str]) -> str:
    return " ".join(systemd_word(w) for w in words)


def shell_script(script: str) -> str:
    """An ExecStartPre= running `script` with /bin/sh, escaped for systemd."""
    return f"/bin/sh -c {systemd_word(script)}"


def mount_model(role: str, args: list[str]) -> tuple[list[str], list[str]]:
    """The model the role's arguments name (-m FILE, or vLLM's serve PATH) mounted read-only under /models and
    the path rewritten, as `builder run` mounts it: the arguments and the Volume= values."""
    out = list(args)
    volumes: list[str] = []
    for i, word in enumerate(out[:-1]):
        if word in _MODEL_FLAGS:
            inside = f"/models/{Path(out[i + 1]).name}"
            volumes.append(f"{out[i + 1]}:{inside}:ro")
            out[i + 1] = inside
    if role == "serve" and out and out[0].startswith("/"):
        inside = f"/models/{Path(out[0]).name}"
        volumes.append(f"{out[0]}:{inside}:ro")
        out[0] = inside
    return out, volumes


def groups_script(devices: tuple[str, ...], env_file: str) -> str:
    """The shell that finds the gids of the device nodes (each path, or the nodes in a folder, as `builder
    run` looks) and writes them as --group-add flags into `env_file`."""
    paths = " ".join(shlex.quote(d) for d in devices)
    return (f"mkdir -p {GROUPS_DIR}; gids=$(find {paths} -maxdepth 1 ! -type d -exec stat -c %g {{}} + "
            f"| sort -un); flags=; for g in $gids; do flags=\"$flags --group-add $g\"; done; "
            f"echo \"{GROUPS_VARIABLE}=$flags\" > {env_file}")


def health_check(process: Process, address: str) -> str:
    """A check that runs inside the container (bash is the image's shell): the RPC worker's port accepts, the
    server's GET /health answers 200 (llama-server says 503 while loading; vllm serve opens once loaded)."""
    connect = f"exec 3<>/dev/tcp/{address}/{process.port}"
    if process.role == "rpc-worker":
        return f"bash -c '{connect}'"
    return (f"bash -c '{connect} && printf \"GET /health HTTP/1.0\\r\\nHost: {address}\\r\\n\\r\\n\" >&3 "
            "&& head -n 1 <&3 | grep -q \" 200 \"'")


def security_keys(host: Host) -> list[tuple[str, str]]:
    """The variant's --security-opt values as Quadlet keys (SeccompProfile=, SecurityLabelDisable=), the
    others as PodmanArgs=."""
    keys = []
    for option in host.security:
        kind, _, value = option.partition("=")
        if kind == "seccomp":
            keys.append(("SeccompProfile", value))
        elif option == "label=disable":
            keys.append(("SecurityLabelDisable", "true"))
        else:
            keys.append(("PodmanArgs", systemd_line(["--security-opt", option])))
    return keys


class _Units(Exporter):
    def __init__(self, loaded: Loaded, models: Models, image: Callable[[str, str, str], str] | None) -> None:
        super().__init__(loaded, models, image)
        self.source = source_name(loaded.path)

    def header(self, kind: str) -> str:
        return HEADER.format(source=self.source) + f"# podman {MIN_PODMAN} or later (Quadlet); {kind}\n"

    def container(self, process: Process) -> dict[str, str]:
        """The process's .container unit and, for an RPC worker, its cache's .volume: file name -> text."""
        service = self.loaded.service(process.service)
        node = self.loaded.node(process.node)
        target, variant = process.target, process.variant
        host = TARGETS[target].variants[variant].host
        options, args = split_run(self.lines[process])
        image = self.image_of(process)
        name = unit_name(service.name, process.role)
        address = self.address(process)
        role, role_args = args[0], args[1:]
        role_args, volumes = mount_model(role, role_args)
        files: dict[str, str] = {}

        unit: list[tuple[str, str]] = [
            ("Description", f"builder: {service.name} {process.role} on {node.name} ({address}:{process.port})"),
            ("Wants", "network-online.target"), ("After", "network-online.target")]
        box: list[tuple[str, str]] = [
            ("Image", image), ("ContainerName", name), ("Network", "host"),
            ("Label", f"dev.builder.service={service.name}"), ("Label", f"dev.builder.role={process.role}")]
        box += [("AddDevice", device) for device in host.devices]
        if host.cdi:
            box.append(("AddDevice", host.cdi))
        box += security_keys(host)
        if service.engine == "llama.cpp" and builds_rpc_rdma(target, variant):
            # what `builder run` adds for an RDMA image: the RDMA devices where the node has them (the leading
            # '-': Quadlet leaves the line out on a node without /dev/infiniband), and no cap on locked memory
            box += [("AddDevice", f"-{RDMA_DEVICES}"), ("Ulimit", "memlock=-1:-1")]
        env, from_box = line_env(options)
        self.warnings += [f"{node.name}: {name} takes {key} from the box's environment on a `builder run` line; a "
                          "unit does not: gloo and NCCL then use the interface of the node's hostname (add "
                          f"Environment={key}=IFACE if it does not hold {address})" for key in from_box]
        box += [("Environment", systemd_word(f"{key}={value}")) for key, value in {**host.env, **env}.items()]
        for size in options.get("--shm-size", []):
            box.append(("ShmSize", size))
        box += [("Volume", volume) for volume in volumes]
        if host.driver is not None:
            self.warnings.append(f"{node.name}: {target}/{variant} takes the {host.driver.name} from the host: add "
                                 f"Volume= lines for its libraries to {name}.container (`builder run --print "
                                 f"--target {target} --variant {variant}` on the node shows them)")
        if process.role == "rpc-worker":
            cache = f"{name}-cache"
            box.append(("Volume", f"{cache}.volume:{RPC_CACHE}"))
            files[f"{cache}.volume"] = self.header(f"the tensor cache of {service.name}'s RPC worker") + \
                render({"Volume": [("Label", f"dev.builder.service={service.name}")]})
        if process.role != "pipeline-worker":
            box += [("HealthCmd", health_check(process, address)), ("HealthInterval", "30s"),
                    ("HealthTimeout", "10s"), ("HealthRetries", "3"), ("HealthStartPeriod", START_PERIOD),
                    ("HealthOnFailure", "kill")]
        service_keys: list[tuple[str, str]] = [("Restart", "always"), ("RestartSec", "10"),
                                               ("TimeoutStartSec", "900")]
        if host.devices:
            env_file = f"{GROUPS_DIR}/{name}.env"
            service_keys += [("ExecStartPre", shell_script(groups_script(host.devices, env_file))),
                             ("EnvironmentFile", f"-{env_file}")]
            box.append(("PodmanArgs", f"${GROUPS_VARIABLE}"))
        if "--model-sha256" in options and process.role != "rpc-worker":
            path = service.ref.on_box(self.models.path)
            service_keys.append(("ExecStartPre", shell_script(model_check(service, path))))
        box.append(("Exec", systemd_line([role, *role_args])))
        files[f"{name}.container"] = self.header(f"{service.name} {process.role}") + render(
            {"Unit": unit, "Container": box, "Service": service_keys, "Install": [("WantedBy", "multi-user.target")]})
        return files


def render(sections: dict[str, list[tuple[str, str]]]) -> str:
    out = []
    for section, keys in sections.items():
        out.append(f"[{section}]")
        out += [f"{key}={value}" for key, value in keys]
        out.append("")
    return "\n".join(out)


def _steps(loaded: Loaded, models: Models, out: str, nodes: list[str], nvidia: bool) -> list[str]:
    steps = [f"# on each node, with podman {MIN_PODMAN} or later: copy {out}/NODE/ into /etc/containers/systemd/, "
             "then: systemctl daemon-reload && systemctl start builder-SERVICE.service (each unit of the folder)"]
    for node in nodes:
        served = [s for s in loaded.cluster.services
                  if any(p.node == node and p.service == s.name and p.role != "rpc-worker" for p in loaded.processes)]
        steps += [f"# {node}: {s.model} -> {s.ref.on_box(models.path)}" for s in served]
    if nvidia:
        steps.append("# NVIDIA nodes: the GPUs reach the containers through CDI (AddDevice=nvidia.com/gpu=all): "
                     "install the NVIDIA Container Toolkit, then nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml")
    steps.append("builder cluster up CLUSTER-FILE   # on the control node: the gateway in front of them")
    return steps


def export_quadlet(loaded: Loaded, models: Models, out: str, image: Callable[[str, str, str], str] | None = None
                   ) -> Export:
    """Every node's units (NODE/FILE), in memory: nothing is written here."""
    units = _Units(loaded, models, image)
    files: dict[str, str] = {}
    skipped: list[str] = []
    nvidia = False
    for process in loaded.processes:
        service = loaded.service(process.service)
        if is_ray_pipeline(loaded, service):
            skipped.append(service.name)
            continue
        nvidia = nvidia or TARGETS[process.target].variants[process.variant].host.cdi is not None
        for name, text in units.container(process).items():
            key = f"{process.node}/{name}"
            if key in files:
                raise RecipeError(f"{display_path(loaded.path)}: two units on {process.node} would be {name}",
                                  "rename one of the services")
            files[key] = text
    warnings = list(dict.fromkeys(units.warnings))
    warnings += [f"{name}: a Ray pipeline is not exported as units (each node's Ray container needs the model "
                 "folder and a shared token): use topology: replicate, or --format kube"
                 for name in dict.fromkeys(skipped)]
    nodes = list(dict.fromkeys(key.split("/")[0] for key in files))
    return Export(files, tuple(warnings), tuple(_steps(loaded, models, out, nodes, nvidia)), units.images,
                  ("*/*.container", "*/*.volume"), HEADER.split("{")[0])
