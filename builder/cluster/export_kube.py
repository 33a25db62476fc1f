"""`builder cluster export --format kube`: Kubernetes manifests for a cluster file's processes.

Every process of `Loaded.processes` becomes a pod pinned to its node on the node's own network, running the
same image arguments as the `builder run` line that `builder cluster commands` prints for it (its options become
the pod's env, volumes, devices and an init container that checks the model's sha256). What each becomes:
docs/clusters.md; why pods on the host network, Deployments of one and no Secret manifest: docs/design.md.
"""

import hashlib
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from builder.cluster.commands import is_ray_pipeline, node_commands
from builder.cluster.gateway import KEY_MAP, MALLOC_TUNABLES, haproxy_config, models_document
from builder.cluster.model import Loaded, Process, Service
from builder.cluster.vllm_service import RAY_TOKEN, launch, node_variant
from builder.core.errors import RecipeError
from builder.core.files import write_atomically
from builder.recipe.load import display_path
from builder.recipe.targets import DEVICE_PLUGINS, TARGETS
from builder.registry.client import RegistryClient, Repository

Manifest = dict[str, Any]
# HAProxy's official image (Debian-based, HAProxy 3.0 LTS like Debian trixie's); its user is uid 99.
HAPROXY_IMAGE = "docker.io/library/haproxy:3.0"
HAPROXY_UID = 99
HAPROXY_DIR = "/usr/local/etc/haproxy"
LWS_API = "leaderworkerset.x-k8s.io/v1"
# Where the RPC worker keeps its tensor cache in the image ($LLAMA_CACHE/rpc), and where the node keeps it.
RPC_CACHE = "/var/cache/llama.cpp/rpc"
RPC_CACHE_ON_NODE = "/var/cache/builder/rpc"
# builder run's options on the lines `cluster commands` prints: those that take a value, and --detach.
_RUN_OPTIONS = ("--flavour", "--target", "--variant", "--env", "--name", "--shm-size", "--model-sha256")
_NAME_SUFFIX = {"server": "", "rpc-worker": "-rpc", "pipeline-worker": "-pipeline"}
# A model loads for a long time (a 34B GGUF from a slow disk, a vLLM model compiling): the startup probe
# gives a server this long before its liveness counts.
STARTUP_SECONDS = 3600
HEADER = "# Written by `builder cluster export --format kube` from {source}: regenerate it, do not edit.\n"
_PLAIN = re.compile(r"/[A-Za-z0-9/._+-]*")
_CLAIM = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class Models:
    """Where every pod finds the models, named by sha256: a folder on each node, or a PersistentVolumeClaim,
    mounted read-only at `path` (the folder the `cluster commands` lines name)."""

    path: str
    claim: str | None = None

    def __post_init__(self) -> None:
        if not _PLAIN.fullmatch(self.path) or self.path == "/":
            raise RecipeError(f"--models: {self.path!r} is not an absolute folder path of plain characters",
                              "e.g. --models /srv/models")
        if self.claim is not None and not _CLAIM.fullmatch(self.claim):
            raise RecipeError(f"--models-claim: {self.claim!r} is not a PersistentVolumeClaim name",
                              "lowercase letters, digits and '-', at most 63")


@dataclass(frozen=True)
class Export:
    """What `cluster export` writes, in any format, in memory."""

    files: dict[str, str]  # path under the folder -> its text
    warnings: tuple[str, ...]
    steps: tuple[str, ...]  # what the user does with the files (kube: the Secrets and models before applying)
    images: dict[str, str]  # node/engine(/device, on a node with several) -> the image it runs
    stale: tuple[str, ...] = ()  # globs of the files an earlier export of this format may have left
    mark: str = "# Written by "  # how such a file starts

    def write(self, out: Path) -> list[str]:
        """The files into `out` (created if missing), each written whole then renamed; files an earlier export
        wrote that this one does not are removed. The names written."""
        out.mkdir(parents=True, exist_ok=True)
        for name, text in self.files.items():
            path = out / name
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, text)
        for old in (path for pattern in self.stale for path in out.glob(pattern)):
            if old.relative_to(out).as_posix() not in self.files and old.is_file() \
                    and old.read_text(errors="replace").startswith(self.mark):
                old.unlink()
        return sorted(self.files)


def source_name(path: Path) -> str:
    """The cluster file's name as a header names it (unprintable characters as '?')."""
    return "".join(c if c.isprintable() else "?" for c in path.name)


def plain_stem(path: Path) -> str:
    """The cluster file's stem in lowercase letters, digits and '-' (`cluster` when none is left)."""
    return re.sub(r"[^a-z0-9-]+", "-", path.stem.lower()).strip("-") or "cluster"


def unit_name(service: str, role: str) -> str:
    """The container's (and a unit's) name: builder-SERVICE[-rpc|-pipeline], as `cluster commands` names it
    (a service's name is letters, digits, '.', '_' and '-': a unit name as it is)."""
    return f"builder-{service}{_NAME_SUFFIX[role]}"


def model_check(service: Service, path: str) -> str:
    """The shell check of the model's sha256 before the container starts (a folder: `cluster hash-model`'s
    content hash); its message names the file and both hashes."""
    quoted = shlex.quote(path)
    if service.ref.folder:
        digest = f"$(cd {quoted} && find . -type f -printf '%P\\0' | LC_ALL=C sort -z | xargs -0 sha256sum " \
                 "| sha256sum | cut -d' ' -f1)"
    else:
        digest = f"$(sha256sum < {quoted} | cut -d' ' -f1)"
    return (f"found={digest}; [ \"$found\" = {service.sha256} ] || {{ echo \"{path}: sha256 $found, the "
            f"cluster file says {service.sha256}\" >&2; exit 1; }}")


def kube_name(*parts: str) -> str:
    """A DNS-1035 label (what Services need, and fine for every other kind) from `parts`; a name that had to
    change (case, dots, underscores, length) gets 6 hex of the original, so two names never meet."""
    raw = "-".join(parts)
    name = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", raw.lower())).strip("-")
    if not name[:1].isalpha():
        name = f"b-{name}"
    if name != raw or len(name) > 52:
        name = f"{name[:45].rstrip('-')}-{hashlib.sha256(raw.encode()).hexdigest()[:6]}"
    return name


def split_run(argv: tuple[str, ...]) -> tuple[dict[str, list[str]], list[str]]:
    """A `builder run` line: its options (by name, each value in order) and the image's arguments."""
    assert argv[:2] == ("builder", "run"), argv
    options: dict[str, list[str]] = {}
    i = 2
    while i < len(argv):
        word = argv[i]
        if word == "--detach":
            i += 1
        elif word in _RUN_OPTIONS:
            options.setdefault(word, []).append(argv[i + 1])
            i += 2
        else:
            assert not word.startswith("-"), f"builder run option {word} has no Kubernetes form"
            return options, list(argv[i:])
    raise AssertionError(f"no role in {argv}")


def _ray_argv(loaded: Loaded, process: Process, models: Models) -> tuple[str, ...]:
    """A Ray pipeline's process as a `builder run` line would say it (`cluster commands` lists none: a
    `builder run` line cannot mount the model for ray-worker; a pod can), its token a Secret at RAY_TOKEN."""
    service = loaded.service(process.service)
    node = loaded.node(process.node)
    addresses = {n.name: str(n.address) for n in loaded.cluster.nodes}
    peers = {n.name: str(n.peer_address) for n in loaded.cluster.nodes}
    started = launch(service, process, node, Path(service.ref.on_box(models.path)), addresses, None,
                     lambda: Path(RAY_TOKEN), mount=False, peers=peers)
    flags = started.flags
    kept = [w for i in range(0, len(flags), 2) if flags[i] != "--volume" for w in flags[i:i + 2]]
    target, variant = node_variant(node, service.device)
    return ("builder", "run", "--flavour", "vllm", "--target", target, "--variant", variant, "--detach", "--name",
            unit_name(service.name, process.role), *kept, "--model-sha256", service.sha256,
            *started.argv)


def run_lines(loaded: Loaded, models: Models) -> dict[Process, tuple[str, ...]]:
    """Every process's `builder run` line: the ones `cluster commands` prints, and the Ray pipelines' own."""
    lines: dict[tuple[str, str], tuple[str, ...]] = {}
    for entry in node_commands(loaded, models.path):
        for argv in entry.argv:
            lines[(entry.node, split_run(argv)[0]["--name"][0])] = argv
    out = {}
    for process in loaded.processes:
        if is_ray_pipeline(loaded, loaded.service(process.service)):
            out[process] = _ray_argv(loaded, process, models)
        else:
            out[process] = lines[(process.node, unit_name(process.service, process.role))]
    return out


def local_image(target: str, variant: str, engine: str) -> str:
    """The floating tag `builder build` gives the image on the machine that built it."""
    return f"localhost/builder/{target}:{'vllm-' if engine == 'vllm' else ''}{variant}"


def published_images(repo: Repository) -> Callable[[str, str, str], str]:
    """The image each node runs by digest: what the registry serves for the floating tag `builder publish`
    gives it (TARGET-[vllm-]VARIANT), resolved once per tag; one line when it was never published."""
    client = RegistryClient(repo)
    found: dict[str, str] = {}

    def image(target: str, variant: str, engine: str) -> str:
        flavour = "vllm-" if engine == "vllm" else ""
        tag = f"{target}-{flavour}{variant}"
        if tag not in found:
            digest = client.manifest_digest(tag)
            if digest is None:
                option = " --flavour vllm" if engine == "vllm" else ""
                raise RecipeError(f"--registry {repo}: {target}/{flavour}{variant} was never published there "
                                  f"(no tag {tag})", f"builder publish{option} --target {target} --variant "
                                  f"{variant} --registry {repo}")
            found[tag] = f"{repo}@{digest}"
        return found[tag]

    return image


class Exporter:
    """What an export of the processes keeps while it goes: their run lines, the images the nodes run, warnings."""

    def __init__(self, loaded: Loaded, models: Models, image: Callable[[str, str, str], str] | None) -> None:
        self.loaded = loaded
        self.models = models
        self.image = image or local_image
        self.warnings: list[str] = []
        self.images: dict[str, str] = {}
        self.lines = run_lines(loaded, models)

    def image_of(self, process: Process) -> str:
        """The image the process runs on its node (recorded for the report)."""
        service = self.loaded.service(process.service)
        image = self.image(process.target, process.variant, service.engine)
        self.images[f"{process.node}/{service.engine}" + (f"/{process.device}" if process.device else "")] = image
        return image

    def address(self, process: Process) -> str:
        """Where the process listens: an RPC worker on its node's data network, when it has one (docs/netboot.md)."""
        node = self.loaded.node(process.node)
        return str(node.peer_address if process.role == "rpc-worker" else node.address)


def line_env(options: dict[str, list[str]]) -> tuple[dict[str, str], list[str]]:
    """A run line's --env NAME=VALUE, and the bare --env NAMEs (a box's line takes them from its environment)."""
    pairs = [item.partition("=") for item in options.get("--env", [])]
    return ({name: value for name, has_value, value in pairs if has_value},
            [name for name, has_value, _ in pairs if not has_value])


class _Builder(Exporter):
    def __init__(self, loaded: Loaded, models: Models, image: Callable[[str, str, str], str] | None) -> None:
        super().__init__(loaded, models, image)
        self.prefix = kube_name(plain_stem(loaded.path))

    def labels(self, service: str, role: str, node: str | None = None) -> dict[str, str]:
        out = {"app.kubernetes.io/managed-by": "builder", "app.kubernetes.io/part-of": self.prefix,
               "builder/service": kube_name(service), "builder/role": role}
        return {**out, "builder/node": node} if node else out

    def meta(self, name: str, labels: dict[str, str]) -> Manifest:
        return {"name": name, "labels": dict(labels)}

    def check_init(self, service: Service, image: str) -> Manifest:
        """An init container that checks the model's sha256 before the server starts (`--model-sha256`)."""
        script = "set -eu; " + model_check(service, service.ref.on_box(self.models.path))
        return {"name": "check-model", "image": image, "args": ["shell", "-c", script],
                "volumeMounts": [{"name": "models", "mountPath": self.models.path, "readOnly": True}]}

    def pod(self, process: Process, args: list[str], env: list[Manifest]) -> Manifest:
        """The pod spec of one process: its node, its image, its devices, volumes and probes."""
        service = self.loaded.service(process.service)
        node = self.loaded.node(process.node)
        target, variant = process.target, process.variant
        options, _ = split_run(self.lines[process])
        image = self.image_of(process)
        host = TARGETS[target].variants[variant].host
        env = [*env, *({"name": k, "value": v} for k, v in host.env.items())]
        volumes: list[Manifest] = []
        mounts: list[Manifest] = []
        if process.role != "rpc-worker":
            source: Manifest = {"persistentVolumeClaim": {"claimName": self.models.claim, "readOnly": True}} \
                if self.models.claim else {"hostPath": {"path": self.models.path, "type": "Directory"}}
            volumes.append({"name": "models", **source})
            mounts.append({"name": "models", "mountPath": self.models.path, "readOnly": True})
        else:
            volumes.append({"name": "rpc-cache", "hostPath": {
                "path": f"{RPC_CACHE_ON_NODE}/{kube_name(service.name)}", "type": "DirectoryOrCreate"}})
            mounts.append({"name": "rpc-cache", "mountPath": RPC_CACHE})
        if "--shm-size" in options:
            size = options["--shm-size"][0].upper().rstrip("B")
            volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{size}i"}})
            mounts.append({"name": "shm", "mountPath": "/dev/shm"})
        if is_ray_pipeline(self.loaded, service):
            token = Path(RAY_TOKEN)
            secret = {"secretName": self.ray_secret(service), "defaultMode": 0o400,
                      "items": [{"key": "ray-token", "path": token.name}]}
            volumes.append({"name": "ray-token", "secret": secret})
            mounts.append({"name": "ray-token", "mountPath": str(token.parent), "readOnly": True})
        container: Manifest = {"name": process.role, "image": image, "args": args}
        if env:
            container["env"] = env
        address = self.address(process)
        if process.role != "pipeline-worker":
            container["ports"] = [{"name": "rpc" if process.role == "rpc-worker" else "http",
                                   "containerPort": process.port, "protocol": "TCP"}]
            container.update(self.probes(process, address))
        plugin = DEVICE_PLUGINS.get((target, variant))
        if plugin:
            container["resources"] = {"limits": {plugin.resource: 1}}
        security: Manifest = {"allowPrivilegeEscalation": False}
        if "seccomp=unconfined" in host.security:
            security["seccompProfile"] = {"type": "Unconfined"}
        container["securityContext"] = security
        container["volumeMounts"] = mounts
        spec: Manifest = {"hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet",
                          "automountServiceAccountToken": False, "enableServiceLinks": False,
                          "nodeSelector": {"kubernetes.io/hostname": node.name}}
        if "--model-sha256" in options and process.role != "rpc-worker":
            spec["initContainers"] = [self.check_init(service, image)]
        spec["containers"] = [container]
        spec["volumes"] = volumes
        if host.driver is not None:
            self.warnings.append(f"{node.name}: {target}/{variant} takes the {host.driver.name} from the host, "
                                 "which a pod does not: install it into the node's image or mount it (hostPath)")
        return spec

    def probes(self, process: Process, address: str) -> Manifest:
        """The server's /health (llama-server answers 503 while loading, vllm serve opens its port once loaded)
        or the worker's port, at the address it binds (the node's, which need not be the kubelet's)."""
        if process.role == "rpc-worker":
            check: Manifest = {"tcpSocket": {"host": address, "port": process.port}}
        else:
            check = {"httpGet": {"host": address, "port": process.port, "path": "/health"}}
        return {"startupProbe": {**check, "periodSeconds": 10, "failureThreshold": STARTUP_SECONDS // 10},
                "readinessProbe": {**check, "periodSeconds": 5, "failureThreshold": 2},
                "livenessProbe": {**check, "periodSeconds": 10, "failureThreshold": 6}}

    def container_env(self, process: Process) -> list[Manifest]:
        """The line's --env NAME=VALUE; a bare --env NAME (a box's interface) is left out with one warning."""
        env, from_box = line_env(split_run(self.lines[process])[0])
        if from_box:
            self.warnings.append(f"{process.service}: {' and '.join(from_box)} left out (a box's line takes them "
                                 "from the box's environment): gloo and NCCL then use the interface of the node's "
                                 "hostname; add them to the pods' env if that one does not hold the node's address")
        return [{"name": name, "value": value} for name, value in env.items()]

    def deployment(self, process: Process) -> Manifest:
        role = "rpc-worker" if process.role == "rpc-worker" else "server"
        name = kube_name(self.prefix, process.service, *(["rpc"] if role == "rpc-worker" else []), process.node)
        labels = self.labels(process.service, role, process.node)
        _, args = split_run(self.lines[process])
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": self.meta(name, labels), "spec": {
            "replicas": 1,
            # a pod on the host network holds its port: the old one must go before the new one starts
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels},
                         "spec": self.pod(process, args, self.container_env(process))}}}

    def service_object(self, service: Service) -> Manifest | None:
        """A Service in front of the service's servers; None when it has none (RPC workers alone)."""
        servers = self.loaded.servers(service.name)
        if not servers:
            return None
        port = servers[0].port
        selector = self.labels(service.name, "server")
        return {"apiVersion": "v1", "kind": "Service",
                "metadata": self.meta(kube_name(self.prefix, service.name), selector),
                "spec": {"selector": selector,
                         "ports": [{"name": "http", "port": port, "targetPort": port, "protocol": "TCP"}]}}

    def ray_secret(self, service: Service) -> str:
        return kube_name(self.prefix, service.name, "ray-token")

    def leader_worker_set(self, service: Service) -> Manifest:
        """A pipeline: the leader is rank 0 on the first node; the workers, ranks 1… on the other nodes, share
        one template: LWS_WORKER_INDEX is their rank and the node's address comes from status.hostIP."""
        processes = [p for p in self.loaded.processes if p.service == service.name]
        if any(self.loaded.node(p.node).data_interface for p in processes):
            i = self.loaded.cluster.services.index(service)
            raise RecipeError(f"{display_path(self.loaded.path)}: services[{i}]: the pipeline {service.name} joins "
                              "over the data network, and a LeaderWorkerSet's workers know only their node's "
                              "primary address (status.hostIP)", "export it without its nodes' data_interface:, "
                              "or run it with `builder cluster commands` lines")
        leader, first = processes[0], processes[1]
        leader_labels = self.labels(service.name, "server", leader.node)
        worker_labels = self.labels(service.name, "pipeline-worker")
        _, leader_args = split_run(self.lines[leader])
        leader_spec = self.pod(leader, leader_args, self.container_env(leader))
        address = str(self.loaded.node(first.node).address)
        _, args = split_run(self.lines[first])
        worker_args = [worker_template_word(w, address, args, i) for i, w in enumerate(args)]
        env = [{"name": e["name"], "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}
               if e.get("value") == address else e for e in self.container_env(first)]
        worker_spec = self.pod(first, worker_args, env)
        del worker_spec["nodeSelector"]
        others = [p.node for p in processes[1:]]
        worker_spec["affinity"] = {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": others}]}]}},
            "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": worker_labels}, "topologyKey": "kubernetes.io/hostname"}]}}
        return {"apiVersion": LWS_API, "kind": "LeaderWorkerSet",
                "metadata": self.meta(kube_name(self.prefix, service.name), self.labels(service.name, "pipeline")),
                "spec": {"replicas": 1, "startupPolicy": "LeaderCreated", "leaderWorkerTemplate": {
                    "size": len(processes),
                    # a pipeline cannot lose a stage: one pod restarting restarts the whole group
                    "restartPolicy": "RecreateGroupOnPodRestart",
                    "leaderTemplate": {"metadata": {"labels": leader_labels}, "spec": leader_spec},
                    "workerTemplate": {"metadata": {"labels": worker_labels}, "spec": worker_spec}}}}

    def gateway(self) -> list[Manifest]:
        cluster = self.loaded.cluster
        port = cluster.gateway.port
        addresses = {n.name: str(n.address) for n in cluster.nodes if n.address}
        stand_in = "192.0.2.1"  # TEST-NET-1: rendered, then replaced by the pod's own address
        config = haproxy_config(self.loaded, bind=stand_in, addresses=addresses, state=Path(HAPROXY_DIR))
        bind = f"    bind {stand_in}:{port}\n"
        assert config.count(bind) == 1
        config = config.replace(bind, f'    bind "${{POD_IP}}:{port}"\n')
        name = kube_name(self.prefix, "gateway")
        labels = self.labels("gateway", "gateway")
        configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": self.meta(name, labels), "data": {
            "haproxy.cfg": config, "models.json": models_document(self.loaded, 0)}}
        check = {"httpGet": {"port": port, "path": "/health"}, "periodSeconds": 5}
        container = {
            "name": "haproxy", "image": HAPROXY_IMAGE,
            "command": ["haproxy", "-W", "-db", "-f", f"{HAPROXY_DIR}/haproxy.cfg"],
            "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "GLIBC_TUNABLES", "value": MALLOC_TUNABLES}],
            "ports": [{"name": "api", "containerPort": port, "protocol": "TCP"}],
            "readinessProbe": check, "livenessProbe": {**check, "periodSeconds": 10, "failureThreshold": 3},
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "runAsNonRoot": True, "runAsUser": HAPROXY_UID, "runAsGroup": HAPROXY_UID,
                                "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [{"name": "config", "mountPath": HAPROXY_DIR, "readOnly": True}]}
        if port < 1024:
            self.warnings.append(f"gateway.port {port}: HAProxy runs as uid {HAPROXY_UID} in its pod and cannot "
                                 "bind a port below 1024; give the Service that port and the gateway a higher one")
        projected = {"defaultMode": 0o440, "sources": [
            {"configMap": {"name": name}},
            {"secret": {"name": self.key_secret(), "items": [{"key": KEY_MAP, "path": KEY_MAP}]}}]}
        deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": self.meta(name, labels), "spec": {
            "replicas": 1, "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {
                "automountServiceAccountToken": False, "enableServiceLinks": False,
                "securityContext": {"fsGroup": HAPROXY_UID, "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [container], "volumes": [{"name": "config", "projected": projected}]}}}}
        service = {"apiVersion": "v1", "kind": "Service", "metadata": self.meta(name, labels), "spec": {
            "selector": labels, "ports": [{"name": "api", "port": port, "targetPort": port, "protocol": "TCP"}]}}
        return [configmap, deployment, service]

    def key_secret(self) -> str:
        return kube_name(self.prefix, "gateway-key")


def worker_template_word(word: str, address: str, args: list[str], index: int) -> str:
    """One word of rank 1's arguments as every worker's: its rank and its node's address as variables."""
    if index and args[index - 1] == "--node-rank":
        return "$(LWS_WORKER_INDEX)"
    return "$(VLLM_HOST_IP)" if word == address else word


def _steps(builder: _Builder, out: str) -> list[str]:
    loaded = builder.loaded
    key_file = loaded.cluster.gateway.key_file
    key = shlex.quote(str(loaded.path.parent / key_file)) if key_file else "KEYFILE"
    steps = [f"printf 'key %s\\n' \"$(cat {key})\" | kubectl create secret generic {builder.key_secret()} "
             f"--from-file={KEY_MAP}=/dev/stdin" + ("" if key_file else
                                                   "   # KEYFILE: a file holding the API key (mode 0600)")]
    for service in loaded.cluster.services:
        if is_ray_pipeline(loaded, service):
            steps.append(f"head -c 32 /dev/urandom | base64 | kubectl create secret generic "
                         f"{builder.ray_secret(service)} --from-file=ray-token=/dev/stdin")
    where = f"the PersistentVolumeClaim {builder.models.claim}" if builder.models.claim else \
        f"{builder.models.path} on each node that serves it"
    for service in loaded.cluster.services:
        if any(p.service == service.name and p.role != "rpc-worker" for p in loaded.processes):
            steps.append(f"# {service.name}: {service.model} -> {where}, as {service.ref.box_name}")
    if any(s.topology == "pipeline" for s in loaded.cluster.services):
        steps.append("# a vLLM pipeline is a LeaderWorkerSet: install the LWS controller (kubernetes-sigs/lws) first")
    steps.append(f"kubectl apply -f {shlex.quote(out)}")
    return steps


class _Dumper(yaml.SafeDumper):
    """A multi-line string (haproxy.cfg in its ConfigMap) as a block; a dict used twice (a Deployment's labels)
    written out twice, never as an alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True

    def block_str(self, value: str) -> yaml.Node:
        return self.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _Dumper.block_str)


def to_yaml(document: Manifest, source: str) -> str:
    text = yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=False)
    return HEADER.format(source=source) + text


def export_kube(loaded: Loaded, models: Models, out: str, image: Callable[[str, str, str], str] | None = None
                ) -> Export:
    """Every manifest of the cluster file, in memory: nothing is written here."""
    builder = _Builder(loaded, models, image)
    manifests: list[Manifest] = []
    for service in loaded.cluster.services:
        if service.topology == "pipeline":
            manifests.append(builder.leader_worker_set(service))
            continue
        ordered = sorted((p for p in loaded.processes if p.service == service.name),
                         key=lambda p: p.role != "rpc-worker")
        manifests += [builder.deployment(p) for p in ordered]
        front = builder.service_object(service)
        manifests += [front] if front else []
    manifests += builder.gateway()
    source = source_name(loaded.path)
    files: dict[str, str] = {}
    for manifest in manifests:
        name = f"{manifest['kind'].lower()}-{manifest['metadata']['name']}.yaml"
        if name in files:
            raise RecipeError(f"{display_path(loaded.path)}: two objects would be {manifest['kind']} "
                              f"{manifest['metadata']['name']} (a service's name meets the gateway's or another "
                              "service's)", "rename the service (e.g. a service named gateway)")
        files[name] = to_yaml(manifest, source)
    return Export(files, tuple(dict.fromkeys(builder.warnings)), tuple(_steps(builder, out)), builder.images,
                  ("*.yaml",), HEADER.split("{")[0])
