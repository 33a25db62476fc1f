"""`builder run`: the engine command line that starts an image in a role, on the host network."""

import sys
from pathlib import Path

from builder.core.errors import RecipeError
from builder.engines import Engine
from builder.flavours.llama import LLAMA_CPP
from builder.pipeline.flavour import Prepared

_MODEL_FLAGS = ("-m", "--model")


def named_model(args: list[str]) -> str | None:
    """The file -m/--model names (the last one, as llama-server reads them), or None."""
    found, i = None, 0
    while i < len(args):
        if args[i] in _MODEL_FLAGS and i + 1 < len(args):
            found, i = args[i + 1], i + 2
            continue
        if args[i].startswith("--model="):
            found = args[i].split("=", 1)[1]
        i += 1
    return found


def _mount_models(args: list[str]) -> tuple[list[str], list[str]]:
    """Host model files named by -m/--model are mounted read-only under /models; paths rewritten."""
    out: list[str] = []
    volumes: list[str] = []

    def mount(value: str) -> str:
        path = Path(value).expanduser()
        if not path.is_file():
            return value
        inside = f"/models/{path.name}"
        volumes.append(f"{path.resolve()}:{inside}:ro")
        return inside

    i = 0
    while i < len(args):
        arg = args[i]
        if arg in _MODEL_FLAGS and i + 1 < len(args):
            out += [arg, mount(args[i + 1])]
            i += 2
            continue
        if arg.startswith("--model="):
            arg = "--model=" + mount(arg.split("=", 1)[1])
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
    args, volumes = _mount_models(args)
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
