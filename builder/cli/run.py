"""`builder run` and `builder toolbox …`: a built image of any flavour as a container on this host."""

import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from builder.cli.common import (
    DEFAULT_FLAVOUR,
    JSON_ERRORS,
    EngineOpt,
    FlavourOpt,
    RecipeOpt,
    RecipesOpt,
    TargetOpt,
    VariantOpt,
    prepared,
)
from builder.cli.conventions import err
from builder.cluster.hfmodel import folder_hash
from builder.core.digests import sha256_file
from builder.core.errors import RecipeError
from builder.core.run import replace_process
from builder.engines import get_engine
from builder.engines.host import driver_volumes
from builder.flavours.prepare import flavour_named
from builder.recipe.load import select
from builder.recipe.targets import Host, did_you_mean
from builder.use.launch import RPC_CACHE, RPC_CACHE_ROLES, container_argv, image_for_run, named_model, rdma_flags
from builder.use.toolbox import TOOL_CHOICES, Box, check_tool, exists, pick_tool, run_steps, tool_of

# vLLM's workers share tensors through /dev/shm; engines give containers 64 MB by default.
DEFAULT_SHM = "16g"
EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True, "allow_interspersed_args": False}


def run(
    role: Annotated[str, typer.Argument(help="rpc-worker, rpc-seed, server, bench, shell or smoke; vLLM: serve, "
                                             "ray-head, ray-worker, shell or smoke.")],
    args: Annotated[list[str] | None, typer.Argument(help="Arguments for the role.")] = None,
    target: TargetOpt = None,
    recipe: RecipeOpt = None,
    variant: VariantOpt = None,
    engine: EngineOpt = "auto",
    image: Annotated[str | None, typer.Option(help="Run this image reference instead.")] = None,
    name: Annotated[str | None, typer.Option(help="Container name.")] = None,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Run in the background.")] = False,
    print_only: Annotated[bool, typer.Option("--print", help="Print the engine command, run nothing.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help=f"With --print: the command as a JSON list of words ({JSON_ERRORS}).")] = False,
    env: Annotated[list[str] | None, typer.Option("--env", help="KEY=VALUE for the container (repeatable).")] = None,
    flavour: FlavourOpt = DEFAULT_FLAVOUR,
    shm_size: Annotated[str, typer.Option(
        "--shm-size", help="vLLM: size of /dev/shm (e.g. 16g), or `host` to share the host's IPC namespace.")
    ] = DEFAULT_SHM,
    driver_dir: Annotated[list[Path] | None, typer.Option(
        "--driver-dir", help="A folder to take the variant's host driver libraries from before the host's own "
        "library folders (e.g. Intel's NPU driver unpacked with dpkg-deb -x).")] = None,
    model_sha256: Annotated[str | None, typer.Option(
        "--model-sha256", help="The sha256 the model must have (-m FILE, or vLLM's serve FILE-OR-FOLDER: a "
        "folder's is `builder cluster hash-model`'s): checked before the container starts, not with --print; "
        "a missing or different model stops here (exit 2).")] = None,
    rpc_cache: Annotated[Path | None, typer.Option(
        "--rpc-cache", help="rpc-worker and rpc-seed: keep ggml-rpc-server's tensor cache in this folder of the "
        "host (made if missing) instead of the container, so it outlasts the container.")] = None,
    recipes: RecipesOpt = None,
) -> None:
    """Run an image in a role on the host network (model files given with --model are mounted).

    Options go before ROLE; everything after ROLE is passed to the role.
    Example: builder run --target cpu rpc-worker --host 10.0.0.5 --port 50052
    An RPC worker given its own copy of the model (rpc-worker --seed FILE.gguf) fills its tensor cache from
    it before it listens, so the head's first load sends hashes instead of the large tensors.
    vLLM images (--flavour vllm) get a 16 GB /dev/shm (--shm-size); a host model folder given as
    `serve PATH` is mounted read-only under /models.
    """
    if as_json and not print_only:
        raise RecipeError("--json goes with --print (a running container reports nothing)", "add --print")
    kind = flavour_named(flavour)
    driver_dirs = tuple(driver_dir or ())
    for folder in driver_dirs:
        if not folder.is_dir():
            raise RecipeError(f"--driver-dir {folder}: {'not a' if folder.exists() else 'no such'} folder",
                              "pass the folder that holds the driver's libraries, e.g. usr/lib/x86_64-linux-gnu of "
                              "the unpacked .debs")
    if role not in kind.roles:
        raise RecipeError(f"unknown role {role!r}{did_you_mean(role, kind.roles)}", f"roles: {', '.join(kind.roles)}")
    cache_flags = cache_volume(role, rpc_cache) if rpc_cache is not None else ()
    if model_sha256 is not None:
        served = kind.served_model(role, list(args or []))
        check_model(model_sha256, served if served is not None else named_model(list(args or []), role),
                    folder=served is not None, print_only=print_only)
    if image is None and target is None and recipe is None:
        _refuse_misplaced(role, list(args or []))
    chosen = get_engine(engine)
    role_args, extra_flags = kind.run_flags(role, list(args or []), shm_size)
    host = Host()
    if image is None or target is not None:
        if image is None:
            prep = prepared(flavour, target, recipe, variant)
            image = image_for_run(chosen, prep)
            entry, variant_entry = select(prep.plan.target, prep.plan.variant)
        else:  # another image of the target (--image): it still gets the variant's run contract
            entry, variant_entry = select(str(target), variant, variant_from_cli=variant is not None)
        host = variant_entry.host
        warn_missing(host, entry.name, driver_dirs)
    for item in env or []:
        # KEY alone passes builder's own value through (kept out of the command line, e.g. a secret)
        if "=" not in item and item not in os.environ:
            raise RecipeError(f"--env {item!r}: expected KEY=VALUE, or KEY set in this environment")
    env_flags = tuple(flag for item in env or [] for flag in ("--env", item))
    argv = container_argv(chosen, image, role, role_args, name=name, detach=detach,
                          run_flags=(*chosen.device_flags(host, driver_dirs), *rdma_flags(chosen, image),
                                     *env_flags, *cache_flags, *extra_flags))
    if print_only:
        typer.echo(json.dumps(list(argv)) if as_json else " ".join(argv))
        return
    if rpc_cache is not None:
        make_cache(rpc_cache)
    replace_process(argv)


def cache_volume(role: str, folder: Path) -> tuple[str, str]:
    """--rpc-cache: the host folder mounted where the image keeps ggml-rpc-server's tensor cache (checked here,
    made only when the container is about to start)."""
    if role not in RPC_CACHE_ROLES:
        raise RecipeError(f"--rpc-cache goes with the roles {' and '.join(RPC_CACHE_ROLES)}, not {role!r}",
                          "drop --rpc-cache, or run an RPC worker")
    path = folder.expanduser().absolute()
    if ":" in str(path) or "," in str(path):
        raise RecipeError(f"--rpc-cache {folder}: the engine's --volume cannot take a path with ':' or ','",
                          "pick a folder whose path has neither")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise RecipeError(f"--rpc-cache {folder}: {existing} is not a folder", "give a folder (it is made if missing)")
    return "--volume", f"{path}:{RPC_CACHE}"


def make_cache(folder: Path) -> None:
    try:
        folder.expanduser().absolute().mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RecipeError(f"--rpc-cache {folder}: cannot make it ({exc.strerror})",
                          "give a folder you can write, or make it first") from None


def check_model(sha256: str, given: str | None, *, folder: bool, print_only: bool) -> None:
    """--model-sha256: the model the role's arguments name is on this machine and has that sha256 (a folder's
    content hash); --print only checks the option, the file is the running machine's business."""
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise RecipeError(f"--model-sha256: {sha256!r} is not a sha256", "give 64 lowercase hex digits")
    if given is None:
        raise RecipeError("--model-sha256: the role's arguments name no model",
                          "name it after ROLE: server -m FILE, rpc-worker --seed FILE, rpc-seed FILE, or (vLLM) "
                          "serve FOLDER")
    if print_only:
        return
    path = Path(given).expanduser()
    if not (path.is_file() or folder and path.is_dir()):
        what = "file or folder" if folder else "file"
        raise RecipeError(f"--model-sha256: {given} is not a {what} on this machine",
                          "copy the model there first (`builder cluster commands` names it by its sha256)")
    actual = folder_hash(path, f"--model-sha256: {given}", given) if path.is_dir() else sha256_file(path)
    if actual != sha256:
        kind = "content hash" if path.is_dir() else "sha256"
        raise RecipeError(f"--model-sha256: {given} has {kind} {actual}, not {sha256}",
                          "it is not the model this command serves: copy the right one there (check a file with "
                          "sha256sum, a folder with `builder cluster hash-model`)")


# `builder run`'s own long options: after ROLE they reach the role, which is why no image was chosen.
_RUN_OPTIONS = frozenset({"--target", "--recipe", "--recipes", "--variant", "--image", "--flavour", "--engine",
                          "--print", "--json", "--detach", "--name", "--env", "--shm-size", "--driver-dir",
                          "--model-sha256", "--rpc-cache"})


def _refuse_misplaced(role: str, args: list[str]) -> None:
    """No image chosen and one of run's options after ROLE: say where it went, in one line."""
    word = next((a.split("=", 1)[0] for a in args if a.split("=", 1)[0] in _RUN_OPTIONS), None)
    if word is not None:
        raise RecipeError(f"{word} comes after ROLE {role!r}, so it went to the role, not to builder run",
                          f"put builder run's options before ROLE: builder run {word} … {role} …")


def warn_missing(host: Host, target: str, driver_dirs: tuple[Path, ...] = ()) -> None:
    """One warning per part of the run contract this host lacks (the container starts without it)."""
    missing = [d for d in host.devices if not Path(d).exists()]
    if missing:
        err.print(f"warning: {', '.join(missing)} not on this host; see `builder doctor --target {target}`")
    if host.driver:
        _, absent = driver_volumes(host.driver, driver_dirs)
        if absent:
            err.print(f"warning: {host.driver.name} ({', '.join(absent)}) not found on this host, so the "
                      f"container cannot use the device; see `builder doctor --target {target}`")


toolbox_app = typer.Typer(
    help="An image as an interactive container with your home folder: Toolbx, distrobox or plain podman.",
    no_args_is_help=True,
)

ToolOpt = Annotated[str, typer.Option("--tool", help=f"{', '.join(TOOL_CHOICES)} (auto: toolbox, then distrobox, "
                                      "then podman).")]
BoxNameOpt = Annotated[str | None, typer.Option("--name", help="Container name (default builder-TARGET-VARIANT).")]
PrintOpt = Annotated[bool, typer.Option("--print", help="Print the commands, run nothing.")]
PrintJsonOpt = Annotated[bool, typer.Option("--json", help=f"With --print: env and steps as JSON ({JSON_ERRORS}).")]


def _box(tool: str, flavour: str, target: str | None, recipe: Path | None, variant: str | None, name: str | None,
         image: str | None = None, need_image: bool = False) -> Box:
    chosen = pick_tool(tool)
    if target is None and recipe is None:
        if name is None or (need_image and image is None):
            raise RecipeError("no target chosen", "pass --target NAME, or --name (and --image for create)")
        box = Box(chosen, name, image or "")
    else:
        # The run contract comes from the target table; a recipe is planned only when given or its image is needed.
        prep = prepared(flavour, target, recipe, variant) if recipe or (need_image and image is None) else None
        entry, variant_entry = select(prep.plan.target if prep else str(target), prep.plan.variant if prep else variant,
                                      variant_from_cli=variant is not None)
        box = Box(chosen, name or f"builder-{entry.name}-{flavour_named(flavour).tag_prefix}{variant_entry.name}",
                  image or "", variant_entry.host)
        if prep and need_image and image is None:
            box = Box(chosen, box.name, image_for_run(box.engine, prep), box.host)
        warn_missing(box.host, entry.name)
    if tool == "auto" and not need_image and shutil.which("podman"):
        # enter and rm go through the tool that made the container, whatever is installed now.
        made_by = tool_of(box.name)
        if made_by is not None and made_by is not box.tool:
            box = Box(made_by, box.name, box.image, box.host)
    return box


def _require_box(box: Box, hint: str) -> None:
    """The tool works and the container is there (what enter and rm need before running anything)."""
    check_tool(box.tool)
    if not exists(box):
        raise RecipeError(f"no container {box.name}", hint)


def _steps(box: Box, steps: list[list[str]], print_only: bool, as_json: bool) -> None:
    env = box.tool_env()
    if as_json and not print_only:
        raise RecipeError("--json goes with --print", "add --print")
    if as_json:
        typer.echo(json.dumps({"env": env, "steps": steps}, indent=2))
        return
    if print_only:
        prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in env.items())
        for argv in steps:
            typer.echo(prefix + shlex.join(argv))
        return
    run_steps(steps, env)


@toolbox_app.command("create")
def toolbox_create(
    target: TargetOpt = None,
    recipe: RecipeOpt = None,
    variant: VariantOpt = None,
    name: BoxNameOpt = None,
    image: Annotated[str | None, typer.Option(help="Use this image reference instead of the target's.")] = None,
    tool: ToolOpt = "auto",
    print_only: PrintOpt = False,
    flavour: FlavourOpt = DEFAULT_FLAVOUR,
    as_json: PrintJsonOpt = False,
    recipes: RecipesOpt = None,
) -> None:
    """Create a toolbox container from a target's image, with the variant's devices, groups and environment.

    Toolbx and distrobox share /dev and run privileged; plain podman gets the same flags as `builder run`.
    """
    box = _box(tool, flavour, target, recipe, variant, name, image, need_image=True)
    if not print_only:
        check_tool(box.tool)
        if exists(box):
            raise RecipeError(f"container {box.name} already exists",
                              f"enter it with `builder toolbox enter --name {box.name}`, or remove it first "
                              f"with `builder toolbox rm --name {box.name} --tool {box.tool}`")
    _steps(box, box.create(), print_only, as_json)


@toolbox_app.command("enter", context_settings=EXTRA_ARGS)
def toolbox_enter(
    command: Annotated[list[str] | None, typer.Argument(help="A command to run instead of a login shell.")] = None,
    target: TargetOpt = None,
    recipe: RecipeOpt = None,
    variant: VariantOpt = None,
    name: BoxNameOpt = None,
    tool: ToolOpt = "auto",
    print_only: PrintOpt = False,
    flavour: FlavourOpt = DEFAULT_FLAVOUR,
    as_json: PrintJsonOpt = False,
    recipes: RecipesOpt = None,
) -> None:
    """Enter a toolbox container: a login shell, or the command after `--`.

    Example: builder toolbox enter --target cpu -- llama-cli --version
    """
    box = _box(tool, flavour, target, recipe, variant, name)
    if not print_only:
        flags = f" --flavour {flavour}" if flavour != DEFAULT_FLAVOUR else ""
        create = f"builder toolbox create{flags} --target {target}" if target else "builder toolbox create"
        _require_box(box, f"create it first: {create}")
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    _steps(box, box.enter(list(command or []), tty), print_only, as_json)


@toolbox_app.command("rm")
def toolbox_rm(
    target: TargetOpt = None,
    recipe: RecipeOpt = None,
    variant: VariantOpt = None,
    name: BoxNameOpt = None,
    tool: ToolOpt = "auto",
    print_only: PrintOpt = False,
    flavour: FlavourOpt = DEFAULT_FLAVOUR,
    as_json: PrintJsonOpt = False,
    recipes: RecipesOpt = None,
) -> None:
    """Remove a toolbox container (stopping it first); the image stays."""
    box = _box(tool, flavour, target, recipe, variant, name)
    if not print_only:
        _require_box(box, "`podman ps --all` lists the containers")
    _steps(box, box.remove(), print_only, as_json)
