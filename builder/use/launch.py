"""`builder run`: the engine command line that starts an image in a role, on the host network."""

import sys
from pathlib import Path

from builder.core.errors import RecipeError
from builder.engines import Engine
from builder.flavours.llama import LLAMA_CPP
from builder.pipeline.flavour import Prepared
from builder.plan.make import RDMA_LABEL

_MODEL_FLAGS = ("-m", "--model")
# Host files other roles name, mounted read-only under /models like a model: the GGUF an RPC worker fills its
# tensor cache from and the list of tensors placed on it (rpc-worker --seed, --seed-tensors), rpc-seed's list.
_FILE_FLAGS = {"rpc-worker": ("--seed", "--seed-tensors"), "rpc-seed": ("--tensors",)}
_RPC_SEED_VALUED = ("--cache", "--tensors", "--threads")  # rpc-seed's options that take a value
RPC_CACHE = "/var/cache/llama.cpp/rpc"  # ggml-rpc-server's tensor cache in the image ($LLAMA_CACHE/rpc)
RPC_CACHE_ROLES = ("rpc-worker", "rpc-seed")
# The RDMA devices of the host (uverbs*, rdma_cm), where rdma-core's udev rules put them.
RDMA_DEVICES = Path("/dev/infiniband")


def rdma_flags(engine: Engine, image: str, devices: Path = RDMA_DEVICES) -> list[str]:
    """An image built with `rpc_rdma` (its label says so) on a host with RDMA devices: the devices, and no cap on
    locked memory (ggml-rpc registers its send and receive buffers with the NIC, which pins them). Otherwise
    nothing, and the image is not even looked at: its RPC then stays on TCP."""
    if not devices.is_dir():
        return []
    info = engine.inspect(image)  # None: not in the engine's storage yet (the engine pulls it), so unknown
    if info is None or info.labels.get(RDMA_LABEL) != "true":
        return []
    return ["--device", str(devices), "--ulimit", "memlock=-1:-1"]


def _positional(args: list[str]) -> int | None:
    """rpc-seed's MODEL: the index of its one word that is neither an option nor an option's value."""
    i = 0
    while i < len(args):
        if args[i] == "--":
            return i + 1 if i + 1 < len(args) else None
        if args[i] in _RPC_SEED_VALUED:
            i += 2
            continue
        if not args[i].startswith("-"):
            return i
        i += 1
    return None


def named_model(args: list[str], role: str = "server") -> str | None:
    """The model file the role's arguments name (the last -m/--model, as llama-server reads them; an RPC
    worker's --seed; rpc-seed's MODEL), or None."""
    if role == "rpc-seed":
        at = _positional(args)
        return args[at] if at is not None else None
    flags = ("--seed",) if role == "rpc-worker" else _MODEL_FLAGS
    found, i = None, 0
    while i < len(args):
        if args[i] in flags and i + 1 < len(args):
            found, i = args[i + 1], i + 2
            continue
        for flag in flags:
            if flag.startswith("--") and args[i].startswith(flag + "="):
                found = args[i].split("=", 1)[1]
        i += 1
    return found


def _mount_models(args: list[str], role: str = "server") -> tuple[list[str], list[str]]:
    """Host files named by -m/--model (and the role's other file flags, rpc-seed's MODEL) are mounted read-only
    under /models; paths rewritten."""
    out: list[str] = []
    volumes: list[str] = []
    used: dict[str, Path] = {}
    flags = (*_MODEL_FLAGS, *_FILE_FLAGS.get(role, ()))

    def mount(value: str) -> str:
        path = Path(value).expanduser()
        if not path.is_file():
            return value
        name = path.name
        if used.get(name, path.resolve()) != path.resolve():  # two files of one name: keep them apart
            name = f"{len(used)}-{name}"
        inside = f"/models/{name}"
        if name not in used:  # a file named twice is mounted once (an engine refuses two mounts on one path)
            used[name] = path.resolve()
            volumes.append(f"{path.resolve()}:{inside}:ro")
        return inside

    positional = _positional(args) if role == "rpc-seed" else None
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in flags and i + 1 < len(args):
            out += [arg, mount(args[i + 1])]
            i += 2
            continue
        flag = arg.split("=", 1)[0]
        if flag in flags and flag.startswith("--") and "=" in arg:
            arg = f"{flag}={mount(arg.split('=', 1)[1])}"
        elif i == positional:
            arg = mount(arg)
        out.append(arg)
        i += 1
    return out, volumes


def container_argv(
    engine: Engine,
    image: str,
    role: str,
    args: list[str],
    *,
    name: str | None = None,
    detach: bool = False,
    run_flags: tuple[str, ...] = (),
) -> list[str]:
    args, volumes = _mount_models(args, role)
    argv = [*engine.run_argv(), "--rm", "--network", "host"]
    if detach:
        argv.append("--detach")
    elif role == "shell" and sys.stdin.isatty():
        argv += ["--interactive", "--tty"]
    if name:
        argv += ["--name", name]
    for volume in volumes:
        argv += ["--volume", volume]
    argv += list(run_flags)
    return [*argv, "--", image, role, *args]


def image_for_run(engine: Engine, prep: Prepared) -> str:
    """The image `builder run` starts: the exact content tag, else the last build of the target."""
    for ref in (prep.tag, prep.floating):
        if engine.inspect(ref) is not None:
            return ref
    flavour = "" if prep.flavour is LLAMA_CPP else f" --flavour {prep.flavour.name}"
    raise RecipeError(f"no image for {prep.name} in {engine.name}",
                      f"build it first: builder build{flavour} --target {prep.plan.target} --engine {engine.name}")
