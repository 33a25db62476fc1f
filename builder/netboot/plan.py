"""A netbooted node's plan: what it runs, as plain data, and the one text form its units read.

Every netbooted node boots from a plan: a small text file published as a blob and named on its kernel
command line (`builder.plan=URL builder.plan_sha256=HEX`), which builder-plan.service fetches, checks and turns
into one systemd unit per line (images/netboot/node.sh, builder/netboot/nodeunits.py). builder/cluster/plans.py
makes each node's plan from a cluster file; this module only knows the lines. One line per item, fields separated
by one tab, `-` for a field that is empty:

    env         NAME     VALUE
    agent       PORT
    admin-key   TYPE     BASE64
    ssh         PORT
    metrics     PORT
    memory      SERVICE  BYTES
    rpc-worker  SERVICE  PORT  [MODEL_URL  MODEL_SHA256]
    server      SERVICE  PORT  MODEL_URL  MODEL_SHA256  RPC  CTX  [LLAMA-SERVER ARGS…]
    vllm        SERVICE  PORT  MODEL_URL  MODEL_SHA256  MOUNT  ENV  ARGV…

* env: exported to every process the node starts (before any of them starts).
* agent: the node's HAProxy agent on its address and PORT (AGENT_PORT): the gateway's agent-check asks it, per
  llama-server, `up` or `down #degraded: …` (a server whose device is missing stays out of the rotation).
* admin-key: an operator's SSH public key (a cluster file's admins:), one line each: public, never a secret.
* ssh: the node's ssh server (images/netboot/sshd.sh) on its address and PORT, key-only login as root with
  the admin-key lines as its authorized keys; its host key is made on the node (kept on its cache disk).
* metrics: the node's Prometheus exporter (images/netboot/metrics.sh) on its address and PORT.
* memory: the most memory each process of SERVICE on this node may use (the cluster file's service `memory:`,
  when it gives one): its unit's MemoryMax= (the kernel ends the process beyond it, and systemd restarts it).
* rpc-worker: ggml-rpc-server on the node's address and PORT; with a model (a service's `preseed`), the GGUF at
  MODEL_URL (checked against MODEL_SHA256) kept on the node's cache disk fills its tensor cache first
  (`rpc-worker --seed`), so the head's first load sends hashes instead of the large tensors.
* server: llama-server on the node's address and PORT serving the GGUF at MODEL_URL (checked against
  MODEL_SHA256), `--rpc RPC` (HOST:PORT,… of its workers) and `-c CTX` when given, then the service's args.
* vllm: the image's entrypoint with ARGV (`serve …`, or a pipeline node's) once the squashfs of the model
  folder at MODEL_URL (checked against MODEL_SHA256) is mounted read-only at MOUNT; ENV is NAME=VALUE,…
  for that process; PORT `-` is a pipeline node that serves no API (it is started, never probed).

Lines starting with `#` are comments. Nothing in a field may be a tab, a newline or empty (a reader that
splits on tabs would lose it); `serialize` refuses such a value, `parse` refuses any line it cannot read.
"""

import re
from dataclasses import dataclass
from typing import ClassVar

NONE = "-"
# The port of a node's agent (HAProxy's agent-check), on a node that runs a llama-server; the control node only
# may connect to it (the node's firewall).
AGENT_PORT = 7999
HEADER = ("# fields, tab-separated, '-' for none: env NAME VALUE | agent PORT | admin-key TYPE BASE64 | ssh PORT "
          "| metrics PORT | memory SERVICE BYTES | rpc-worker SERVICE PORT [MODEL_URL MODEL_SHA256] | server "
          "SERVICE PORT MODEL_URL MODEL_SHA256 RPC CTX [ARGS...] | vllm SERVICE PORT MODEL_URL MODEL_SHA256 MOUNT ENV "
          "ARGV...\n")


@dataclass(frozen=True)
class EnvLine:
    name: str
    value: str


@dataclass(frozen=True)
class PortLine:
    """`WORD PORT`: what listens there is its subclass's."""

    port: int
    word: ClassVar[str]


class AgentLine(PortLine):
    word = "agent"


class SshLine(PortLine):
    word = "ssh"


class MetricsLine(PortLine):
    word = "metrics"


_PORT_LINES: dict[str, type[PortLine]] = {cls.word: cls for cls in (AgentLine, SshLine, MetricsLine)}


@dataclass(frozen=True)
class AdminKeyLine:
    kind: str  # ssh-ed25519, ...
    blob: str  # base64


@dataclass(frozen=True)
class MemoryLine:
    service: str
    bytes: int


@dataclass(frozen=True)
class RpcWorkerLine:
    service: str
    port: int
    model_url: str | None = None  # preseed: the GGUF its tensor cache is filled from
    model_sha256: str | None = None


@dataclass(frozen=True)
class ServerLine:
    service: str
    port: int
    model_url: str
    model_sha256: str
    rpc: tuple[str, ...] = ()  # HOST:PORT of each RPC worker
    context: int | None = None
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class VllmLine:
    service: str
    port: int | None  # None: a pipeline node that serves no API
    model_url: str
    model_sha256: str
    mount: str
    env: tuple[tuple[str, str], ...]
    argv: tuple[str, ...]


Line = EnvLine | PortLine | AdminKeyLine | MemoryLine | RpcWorkerLine | ServerLine | VllmLine


@dataclass(frozen=True)
class NodePlan:
    node: str
    lines: tuple[Line, ...]

    @property
    def engines(self) -> set[str]:
        """The engines the node runs: llama.cpp (rpc-worker, server), vllm."""
        return {"vllm" if isinstance(line, VllmLine) else "llama.cpp" for line in self.lines
                if not isinstance(line, EnvLine | PortLine | AdminKeyLine | MemoryLine)}


def _field(value: str, what: str) -> str:
    if not value or "\t" in value or value.splitlines() != [value]:
        raise ValueError(f"plan: {what} {value!r} is empty or holds a tab or line break")
    return value


def _words(line: Line) -> list[str]:
    if isinstance(line, EnvLine):
        if line.value == NONE:
            raise ValueError(f"plan: env {line.name}: the value '-' reads back as empty")
        return ["env", line.name, line.value or NONE]
    if isinstance(line, PortLine):
        return [line.word, str(_port(str(line.port)))]
    if isinstance(line, AdminKeyLine):
        if not re.fullmatch(r"[a-z0-9@.-]{1,64}", line.kind) or not re.fullmatch(r"[A-Za-z0-9+/]+={0,2}", line.blob):
            raise ValueError(f"plan: admin-key {line.kind[:40]!r}: not a key type and base64 blob")
        return ["admin-key", line.kind, line.blob]
    if isinstance(line, MemoryLine):
        if line.bytes < 1:
            raise ValueError(f"plan: memory {line.service}: {line.bytes} is not a number of bytes")
        return ["memory", line.service, str(line.bytes)]
    if isinstance(line, RpcWorkerLine):
        model = [line.model_url, line.model_sha256 or NONE] if line.model_url else []
        return ["rpc-worker", line.service, str(line.port), *model]
    if isinstance(line, ServerLine):
        return ["server", line.service, str(line.port), line.model_url, line.model_sha256,
                ",".join(line.rpc) or NONE, str(line.context) if line.context else NONE, *line.args]
    for name, value in line.env:
        if "," in name + value or "=" in name:
            raise ValueError(f"plan: vllm env {name}={value} holds a comma or a second '='")
    env = ",".join(f"{name}={value}" for name, value in line.env)
    return ["vllm", line.service, str(line.port) if line.port else NONE, line.model_url, line.model_sha256,
            line.mount, env or NONE, *line.argv]


def serialize(plan: NodePlan) -> str:
    """The plan as the node reads it: a comment naming the node, the fields' header, one line per item."""
    out = [f"# builder node plan for {_field(plan.node, 'node')}, from cluster.yaml: regenerate it, do not edit.\n",
           HEADER]
    out += ["\t".join(_field(word, type(line).__name__) for word in _words(line)) + "\n" for line in plan.lines]
    return "".join(out)


def _port(word: str) -> int:
    port = int(word)
    if not 1 <= port <= 65535:
        raise ValueError(f"plan: {word} is not a port")
    return port


def _optional(word: str) -> str | None:
    return None if word == NONE else word


def parse(text: str) -> NodePlan:
    """A plan's text back into a NodePlan (ValueError for a line it cannot read)."""
    node = ""
    lines: list[Line] = []
    for raw in text.splitlines():
        if raw.startswith("# builder node plan for "):
            node = raw.removeprefix("# builder node plan for ").split(",", 1)[0]
        if not raw or raw.startswith("#"):
            continue
        kind, *fields = raw.split("\t")
        if kind == "env" and len(fields) == 2:
            lines.append(EnvLine(fields[0], "" if fields[1] == NONE else fields[1]))
        elif kind in _PORT_LINES and len(fields) == 1:
            lines.append(_PORT_LINES[kind](_port(fields[0])))
        elif kind == "admin-key" and len(fields) == 2:
            lines.append(AdminKeyLine(fields[0], fields[1]))
        elif kind == "memory" and len(fields) == 2 and fields[1].isdigit() and fields[1].isascii():
            lines.append(MemoryLine(fields[0], int(fields[1])))
        elif kind == "rpc-worker" and len(fields) in (2, 4):
            model = (fields[2], _optional(fields[3])) if len(fields) == 4 else ()
            lines.append(RpcWorkerLine(fields[0], _port(fields[1]), *model))
        elif kind == "server" and len(fields) >= 6:
            rpc, ctx = _optional(fields[4]), _optional(fields[5])
            lines.append(ServerLine(fields[0], _port(fields[1]), fields[2], fields[3],
                                    tuple(rpc.split(",")) if rpc else (), int(ctx) if ctx else None,
                                    tuple(fields[6:])))
        elif kind == "vllm" and len(fields) >= 7:
            port, env = _optional(fields[1]), _optional(fields[5]) or ""
            pairs = tuple((name, value) for name, _, value in (item.partition("=") for item in env.split(",") if item))
            lines.append(VllmLine(fields[0], _port(port) if port else None, fields[2], fields[3], fields[4],
                                  pairs, tuple(fields[6:])))
        else:
            raise ValueError(f"plan: cannot read the line {raw[:80]!r}")
    return NodePlan(node, tuple(lines))
