"""The `builder` command: thin verbs over the pipeline, and the only place errors become exit codes."""

import json
import logging
import os
import shlex
import shutil
import signal
import sys
import traceback
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.console import Console

from builder import __version__, cleanup
from builder import lock as lockfile
from builder.build import (
    BuildResult,
    build,
    context_dir,
    image_for_run,
    prepare,
    recipe_file,
    refuse_placeholders,
)
from builder.cli_cluster import cluster_app
from builder.cli_pxe import pxe_app
from builder.doctor import diagnose
from builder.engines import ENGINE_CHOICES, get_engine
from builder.errors import BuilderError, CommandError, RecipeError, Stopped, request_stop
from builder.hostlib import driver_volumes
from builder.launch import container_argv
from builder.listing import target_entries, target_rows
from builder.matrix import matrix as ci_matrix
from builder.models import Recipe
from builder.pin import pin_recipe
from builder.publish import publish as publish_image
from builder.recipes import RECIPES_DIR, display_path, load_recipe, select
from builder.registry import Repository
from builder.render import plan_document, stage_apt_files, stage_sdks, stage_source, write_context
from builder.sbom import make_sbom, make_vllm_sbom, read_contents, sbom_bytes
from builder.targets import Host
from builder.toolbox import TOOL_CHOICES, Box, Tool, check_tool, exists, pick_tool, run_steps, tool_of
from builder.vllm import (
    FLAVOURS,
    build_vllm,
    image_for_run_vllm,
    lock_variant,
    mount_served_model,
    prepare_vllm,
    require_lock,
    vllm_recipe_path,
    vllm_shm_flags,
    write_vllm_context,
)
from builder.vllm_models import VllmRecipe

app = typer.Typer(
    help="Build llama.cpp inference images (RPC workers and servers) from recipes, for every accelerator.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(pxe_app, name="pxe")
app.add_typer(cluster_app, name="cluster")
err = Console(stderr=True, highlight=False, soft_wrap=True)
_debug = False
ROLES = ("rpc-worker", "server", "bench", "shell", "smoke", "help")
VLLM_ROLES = ("serve", "ray-head", "ray-worker", "shell", "smoke", "help")
# vLLM's workers share tensors through /dev/shm; engines give containers 64 MB by default.
DEFAULT_SHM = "16g"

TargetOpt = Annotated[str | None, typer.Option("--target", "-t", help="Target name: picks recipes/NAME.yaml.")]
RecipeOpt = Annotated[Path | None, typer.Option("--recipe", help="Any recipe file instead of --target.")]
VariantOpt = Annotated[str | None, typer.Option("--variant", help="Variant of the target (default: its first).")]
SourceOpt = Annotated[
    str | None,
    typer.Option("--llama-cpp-source", metavar="PATH_OR_ARCHIVE",
                 help="A local llama.cpp tree or tar archive instead of the recipe's pinned source."),
]
EngineOpt = Annotated[
    str, typer.Option("--engine", "-e", help=f"Container engine: {', '.join(ENGINE_CHOICES)}.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
LockOpt = Annotated[Path, typer.Option("--lock", help="The lock file (default: builder.lock of the project).")]
FlavourOpt = Annotated[
    str, typer.Option("--flavour", help=f"What the image serves with: {', '.join(FLAVOURS)} (recipes/vllm/).")
]


def _vllm(flavour: str) -> bool:
    if flavour not in FLAVOURS:
        raise RecipeError(f"--flavour: unknown flavour {flavour!r}", f"flavours: {', '.join(FLAVOURS)}")
    return flavour == "vllm"


def _vllm_recipe(target: str | None, recipe: Path | None) -> Path:
    if recipe is not None:
        return recipe
    if target:
        return vllm_recipe_path(target)
    raise RecipeError("no recipe chosen", "pass --target NAME (see `builder targets`) or --recipe PATH")


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Log every command and show tracebacks.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    global _debug
    _debug = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(message)s")
    if version:
        typer.echo(f"builder {__version__}")
        raise typer.Exit()


@app.command()
def targets(as_json: JsonOpt = False) -> None:
    """List every target/variant (the default marked *): which shipped recipes build it and its state here.

    LLAMA.CPP: in recipes/NAME.yaml; VLLM: in recipes/vllm/NAME.yaml (--flavour vllm); STATE: how far it got on
    the project's own machines (no GPU, no NPU, no vendor site): built and run here, built here but needing its
    device to run, or render-only, and why.
    """
    entries = target_entries()
    if as_json:
        typer.echo(json.dumps(entries, indent=2))
        return
    for line in target_rows(entries):
        typer.echo(line)


@app.command()
def schema(flavour: FlavourOpt = "llama.cpp") -> None:
    """Print the recipe JSON Schema (--flavour vllm: the vLLM recipe's)."""
    model = VllmRecipe if _vllm(flavour) else Recipe
    typer.echo(json.dumps(model.model_json_schema(), indent=2))


@app.command()
def plan(
    target: TargetOpt = None,
    recipe: RecipeOpt = None,
    variant: VariantOpt = None,
    llama_cpp_source: SourceOpt = None,
    as_json: JsonOpt = False,
    flavour: FlavourOpt = "llama.cpp",
) -> None:
    """Resolve a recipe into a build plan: bases, pinned source, flags, labels and the image tag."""
    if _vllm(flavour):
        vprep = prepare_vllm(_vllm_recipe(target, recipe), variant)
        if as_json:
            typer.echo(json.dumps(vprep.document(), indent=2, sort_keys=True))
            return
        v = vprep.plan
        for key, value in {"recipe": v.recipe, "target": f"{v.target}/{v.variant} (vLLM device {v.device})",
                           "image": vprep.tag, "base": v.base_ref, "python": v.python,
                           "vllm": v.vllm_version, "pins": " ".join(v.requirements),
                           "lock": f"{v.lock_file} ({len(v.lock_pins)} wheels)" if v.lock_file else
                           "none: render-only"}.items():
            typer.echo(f"{key:<10} {value}")
        return
    prep = prepare(recipe_file(target, recipe), variant, llama_cpp_source)
    doc = plan_document(prep.plan, prep.fingerprint)
    if as_json:
        typer.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    p = prep.plan
    lines = {
        "recipe": p.recipe,
        "target": f"{p.target}/{p.variant}",
        "image": prep.tag,
        "toolchain": p.toolchain_ref,
        "runtime": p.runtime_ref,
        "llama.cpp": f"{p.source.locator} ({p.source.identity})",
        "cmake": " ".join(f"-D{k}={v}" for k, v in p.cmake.items()),
        "binaries": " ".join(p.binaries),
    }
    for key, value in lines.items():
        typer.echo(f"{key:<10} {value}")


@app.command()
def render(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the build context.")],
    target: TargetOpt = None,
    recipe: RecipeOpt = None,
    variant: VariantOpt = None,
    llama_cpp_source: SourceOpt = None,
    with_source: Annotated[
        bool, typer.Option(help="Also place the llama.cpp tree and the recipe's SDKs, ready to build.")
    ] = False,
    flavour: FlavourOpt = "llama.cpp",
) -> None:
    """Write the build context (Containerfile, scripts, plan.json) without building anything."""
    if _vllm(flavour):
        vprep = prepare_vllm(_vllm_recipe(target, recipe), variant)
        changed = write_vllm_context(out, vprep)
        typer.echo(f"rendered {vprep.plan.target}/vllm-{vprep.plan.variant} into {out} "
                   f"({len(changed)} file(s) changed); image tag {vprep.tag}")
        return
    prep = prepare(recipe_file(target, recipe), variant, llama_cpp_source)
    changed = write_context(out, prep.plan, prep.files, prep.fingerprint)
    if with_source:
        stage_source(prep.tree.path, out)
        stage_sdks(prep.plan, out)
        stage_apt_files(prep.plan, out)
    typer.echo(f"rendered {prep.plan.target}/{prep.plan.variant} into {out} "
               f"({len(changed)} file(s) changed); image tag {prep.tag}")


def _print_build(result: BuildResult, as_json: bool) -> None:
    doc = {"image": result.ref, "digest": result.digest, "size": result.size, "built": result.built,
           "seconds": round(result.seconds, 1), "log": str(result.log) if result.log else None}
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    state = f"built in {result.seconds:.0f} s" if result.built else "up to date, nothing to build"
    typer.echo(f"image   {result.ref} ({state})")
    typer.echo(f"digest  {result.digest}")
    typer.echo(f"size    {result.size / 1e6:.1f} MB")
    if result.log:
        typer.echo(f"log     {result.log}")


@app.command("build")
def build_cmd(
    target: TargetOpt = None,
    recipe: RecipeOpt = None,
    variant: VariantOpt = None,
    engine: EngineOpt = "auto",
    llama_cpp_source: SourceOpt = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Rebuild even if the image exists.")] = False,
    lock_path: LockOpt = lockfile.LOCK_FILE,
    as_json: JsonOpt = False,
    flavour: FlavourOpt = "llama.cpp",
) -> None:
    """Render, build and smoke-test an image; print its reference and digest.

    The tag is a hash of everything that determines the image, so an unchanged recipe builds nothing.
    The full build log is saved; its path is printed.
    """
    if _vllm(flavour):
        vprep = prepare_vllm(_vllm_recipe(target, recipe), variant, lock_path)
        require_lock(vprep.plan)
        chosen = get_engine(engine)
        err.print(f"building {vprep.tag} with {chosen.name}")
        _print_build(build_vllm(vprep, chosen, no_cache=no_cache), as_json)
        return
    path = recipe_file(target, recipe)
    prep = prepare(path, variant, llama_cpp_source, lock_path)
    refuse_placeholders(prep.plan)
    # The lock pins the shipped recipes; a recipe file of your own or a local llama.cpp tree is development.
    if llama_cpp_source is None and path.resolve().parent == RECIPES_DIR.resolve():
        lockfile.require(load_recipe(path), prep.plan.variant, strict=False, path=lock_path)
    chosen = get_engine(engine)
    err.print(f"building {prep.tag} with {chosen.name} (context {context_dir(prep.plan)})")
    _print_build(build(prep, chosen, no_cache=no_cache), as_json)


@app.command()
def publish(
    registry: Annotated[str, typer.Option("--registry", "-r", metavar="HOST/REPO",
                                          help="Where to publish, e.g. ghcr.io/OWNER/builder.")],
    target: TargetOpt = None,
    recipe: RecipeOpt = None,
    variant: VariantOpt = None,
    engine: EngineOpt = "auto",
    sbom: Annotated[bool, typer.Option(help="Attach an SPDX SBOM to the pushed image.")] = True,
    lock_path: LockOpt = lockfile.LOCK_FILE,
    as_json: JsonOpt = False,
) -> None:
    """Build if needed, push by digest, verify the registry's digest, then tag; skip if already published.

    Tags: an immutable content tag (target-variant-llama<version>-<content hash>) and a floating one
    (target-variant). Credentials come only from podman's auth.json or docker's config.json
    (podman login / docker login). The inputs must agree with builder.lock.
    """
    repo = Repository.parse(registry)
    path = recipe_file(target, recipe)
    prep = prepare(path, variant, lock=lock_path)
    lockfile.require(load_recipe(path), prep.plan.variant, strict=True, path=lock_path)
    chosen = get_engine(engine)
    result = publish_image(prep, chosen, repo, sbom=sbom)
    doc = {"repository": result.repository, "digest": result.digest, "reference": result.reference,
           "tags": list(result.tags), "pushed": result.pushed, "built": result.built, "sbom": result.sbom,
           "seconds": round(result.seconds, 1)}
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    state = "published" if result.pushed else "already published, nothing built or pushed"
    typer.echo(f"{state}: {result.reference}")
    for tag in result.tags:
        typer.echo(f"tag     {result.repository}:{tag}")
    if result.sbom:
        typer.echo(f"sbom    {result.sbom}")


@app.command()
def lock(
    check: Annotated[bool, typer.Option("--check", help="Exit 1 when recipes and lock disagree.")] = False,
    lock_path: LockOpt = lockfile.LOCK_FILE,
    recipes: Annotated[Path, typer.Option("--recipes", help="Folder of recipes.")] = RECIPES_DIR,
    target: TargetOpt = None,
    recipe: RecipeOpt = None,
    variant: VariantOpt = None,
    flavour: FlavourOpt = "llama.cpp",
    refresh: Annotated[bool, typer.Option(
        "--refresh", help="Resolve every bootstrapped base again (move to the archive's current versions).")] = False,
) -> None:
    """Record every pinned input of every image (bases, llama.cpp source, vendor pins) in builder.lock.

    Bootstrapped bases get their full package set (exact versions, suites, .deb sha256s), resolved from
    the archive's indexes for bases that are new or changed; --refresh resolves all of them again.
    With --check, change nothing: print one line per disagreement and exit 1 if there is any.
    With --flavour vllm --target T: resolve that vLLM recipe's requirements for the image's Python and
    write its lock beside it (exact versions + sha256, installed with pip's --require-hashes).
    """
    if _vllm(flavour):
        path, pinned = lock_variant(_vllm_recipe(target, recipe), variant)
        typer.echo(f"locked {len(pinned.pins)} packages into {display_path(path)}")
        return
    if check:
        lines = lockfile.check(lock_path, recipes)
        for line in lines:
            typer.echo(line)
        if lines:
            raise typer.Exit(1)
        typer.echo(f"{lock_path.name}: matches the recipes")
        return
    written = lockfile.write(lock_path, recipes, refresh=refresh)
    packages = sum(len(base["resolved"]) for base in written["bases"].values())
    typer.echo(f"wrote {lock_path} ({len(written['images'])} image(s), {len(written['bases'])} bootstrapped "
               f"base(s), {packages} packages)")


@app.command()
def pin(
    target: TargetOpt = None,
    recipe: RecipeOpt = None,
    variant: Annotated[str | None, typer.Option("--variant", help="Only this variant (default: all).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Read and print the values; write nothing.")] = False,
) -> None:
    """Fill the recipe's placeholder pins (all zeros) with values read from their sources.

    An image's digest comes from its registry, a signing key's or .deb's sha256 from its download. Run it
    where those sites are reachable, review the diff, then `builder lock`. Nothing is written unless every
    value was read; comments and layout of the recipe stay as they are.
    """
    path = recipe_file(target, recipe)
    values = pin_recipe(path, variant, dry_run)
    if not values:
        typer.echo(f"{display_path(path)}: no placeholder pins")
        return
    for placeholder, value in values.items():
        typer.echo(f"{placeholder.field}: {placeholder.source} -> sha256:{value}")
    if dry_run:
        typer.echo(f"{len(values)} value(s) read; --dry-run: {display_path(path)} unchanged")
        return
    typer.echo(f"wrote {len(values)} pin(s) into {display_path(path)}")
    if path.resolve().parent == RECIPES_DIR.resolve():
        typer.echo(f"next: review the diff, then {lockfile.HINT.removeprefix('run ')}")


@app.command()
def matrix(
    recipes: Annotated[Path, typer.Option("--recipes", help="Folder of recipes.")] = RECIPES_DIR,
) -> None:
    """Print the CI matrix as JSON: `include`, the images with every input pinned; `render_only`, the others."""
    typer.echo(json.dumps(ci_matrix(recipes), separators=(",", ":")))


@app.command()
def sbom(
    target: TargetOpt = None,
    recipe: RecipeOpt = None,
    variant: VariantOpt = None,
    engine: EngineOpt = "auto",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write here instead of stdout.")] = None,
    flavour: FlavourOpt = "llama.cpp",
) -> None:
    """Write the SPDX 2.3 SBOM of the built image: its OS (from its os-release) and packages, its Python
    packages, llama.cpp or vLLM, SDK wheels and vendor .debs."""
    chosen = get_engine(engine)
    if _vllm(flavour):
        vprep = prepare_vllm(_vllm_recipe(target, recipe), variant)
        ref = image_for_run_vllm(chosen, vprep)
        info = chosen.inspect(ref)
        assert info is not None
        data = sbom_bytes(make_vllm_sbom(vprep.plan, ref, info.id, read_contents(chosen, ref)))
    else:
        prep = prepare(recipe_file(target, recipe), variant)
        ref = image_for_run(chosen, prep)
        info = chosen.inspect(ref)
        assert info is not None
        data = sbom_bytes(make_sbom(prep.plan, ref, info.id, read_contents(chosen, ref)))
    if out is None:
        sys.stdout.write(data.decode())
    else:
        out.write_bytes(data)
        err.print(f"wrote {out}")


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "allow_interspersed_args": False}
)
def run(
    role: Annotated[str, typer.Argument(help="rpc-worker, server, bench, shell or smoke; vLLM: serve, ray-head, "
                                             "ray-worker, shell or smoke.")],
    args: Annotated[list[str] | None, typer.Argument(help="Arguments for the role.")] = None,
    target: TargetOpt = None,
    recipe: RecipeOpt = None,
    variant: VariantOpt = None,
    engine: EngineOpt = "auto",
    image: Annotated[str | None, typer.Option(help="Run this image reference instead.")] = None,
    name: Annotated[str | None, typer.Option(help="Container name.")] = None,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Run in the background.")] = False,
    print_only: Annotated[bool, typer.Option("--print", help="Print the engine command, run nothing.")] = False,
    env: Annotated[list[str] | None, typer.Option("--env", help="KEY=VALUE for the container (repeatable).")] = None,
    flavour: FlavourOpt = "llama.cpp",
    shm_size: Annotated[str, typer.Option(
        "--shm-size", help="vLLM: size of /dev/shm (e.g. 16g), or `host` to share the host's IPC namespace.")
    ] = DEFAULT_SHM,
    driver_dir: Annotated[list[Path] | None, typer.Option(
        "--driver-dir", help="A folder to take the variant's host driver libraries from before the host's own "
        "library folders (e.g. Intel's NPU driver unpacked with dpkg-deb -x).")] = None,
) -> None:
    """Run an image in a role on the host network (model files given with --model are mounted).

    Options go before ROLE; everything after ROLE is passed to the role.
    Example: builder run --target cpu rpc-worker --host 10.0.0.5 --port 50052
    vLLM images (--flavour vllm) get a 16 GB /dev/shm (--shm-size); a host model folder given as
    `serve PATH` is mounted read-only under /models.
    """
    is_vllm = _vllm(flavour)
    driver_dirs = tuple(driver_dir or ())
    for folder in driver_dirs:
        if not folder.is_dir():
            raise RecipeError(f"--driver-dir {folder}: no such folder", "pass the folder that holds the driver's "
                              "libraries, e.g. usr/lib/x86_64-linux-gnu of the unpacked .debs")
    roles = VLLM_ROLES if is_vllm else ROLES
    if role not in roles:
        raise RecipeError(f"unknown role {role!r}", f"roles: {', '.join(roles)}")
    chosen = get_engine(engine)
    host = Host()
    extra_flags: tuple[str, ...] = ()
    if is_vllm:
        shm_flags = vllm_shm_flags(shm_size)
        args, volumes = mount_served_model(role, list(args or []))
        extra_flags = (*shm_flags, *(flag for volume in volumes for flag in ("--volume", volume)))
    if image is None and is_vllm:
        vprep = prepare_vllm(_vllm_recipe(target, recipe), variant)
        image = image_for_run_vllm(chosen, vprep)
        entry, variant_entry = select(vprep.plan.target, vprep.plan.variant)
        host = variant_entry.host
    elif image is None:
        prep = prepare(recipe_file(target, recipe), variant)
        image = image_for_run(chosen, prep)
        entry, variant_entry = select(prep.plan.target, prep.plan.variant)
        host = variant_entry.host
        _warn_missing(host, entry.name, driver_dirs)
    elif target is not None:
        # Another image of the target (--image): it still gets the variant's run contract.
        entry, variant_entry = select(target, variant, variant_from_cli=variant is not None)
        host = variant_entry.host
        _warn_missing(host, entry.name, driver_dirs)
    for item in env or []:
        # KEY alone passes builder's own value through (kept out of the command line, e.g. a secret)
        if "=" not in item and item not in os.environ:
            raise RecipeError(f"--env {item!r}: expected KEY=VALUE, or KEY set in this environment")
    env_flags = tuple(flag for item in env or [] for flag in ("--env", item))
    argv = container_argv(chosen, image, role, list(args or []), name=name, detach=detach,
                          run_flags=(*chosen.device_flags(host, driver_dirs), *env_flags, *extra_flags))
    if print_only:
        typer.echo(" ".join(argv))
        return
    logging.getLogger("builder").debug("$ %s", " ".join(argv))
    sys.stdout.flush()
    os.execvp(argv[0], argv)


def _warn_missing(host: Host, target: str, driver_dirs: tuple[Path, ...] = ()) -> None:
    """One warning per part of the run contract this host lacks (the container starts without it)."""
    missing = [d for d in host.devices if not Path(d).exists()]
    if missing:
        err.print(f"warning: {', '.join(missing)} not on this host; see `builder doctor --target {target}`")
    if host.driver:
        _, absent = driver_volumes(host.driver, driver_dirs)
        if absent:
            err.print(f"warning: {host.driver.name} ({', '.join(absent)}) not found on this host, so the "
                      f"container cannot use the device; see `builder doctor --target {target}`")


@app.command()
def doctor(
    target: Annotated[str, typer.Option("--target", "-t", help="Target to check the host for.")] = "cpu",
    variant: VariantOpt = None,
    model: Annotated[Path | None, typer.Option(help="A model file: is there memory for it?")] = None,
    root: Annotated[Path, typer.Option(help="Read /proc, /sys and /dev under this folder.")] = Path("/"),
) -> None:
    """Check that this host can run a target's image: one PASS/FAIL line per check, with the fix.

    Checks devices and access to them, kernel version and modules, Strix Halo unified-memory kernel
    parameters, CDI for NVIDIA, and free memory against a model's size. Exit code 1 when a check fails.
    """
    entry, chosen = select(target, variant, variant_from_cli=variant is not None)
    checks = diagnose(entry, chosen, root=root, model=model)
    typer.echo(f"doctor: {entry.name}/{chosen.name} on {root}")
    for check in checks:
        typer.echo(check.line())
    failed = sum(1 for c in checks if c.required and not c.ok)
    warned = sum(1 for c in checks if not c.required and not c.ok)
    typer.echo(f"doctor: {sum(c.ok for c in checks)} ok, {failed} failing, {warned} warning(s)")
    if failed:
        raise typer.Exit(1)


toolbox_app = typer.Typer(
    help="An image as an interactive container with your home folder: Toolbx, distrobox or plain podman.",
    no_args_is_help=True,
)
app.add_typer(toolbox_app, name="toolbox")

ToolOpt = Annotated[str, typer.Option("--tool", help=f"{', '.join(TOOL_CHOICES)} (auto: toolbox, then distrobox, "
                                      "then podman).")]
BoxNameOpt = Annotated[str | None, typer.Option("--name", help="Container name (default builder-TARGET-VARIANT).")]
PrintOpt = Annotated[bool, typer.Option("--print", help="Print the commands, run nothing.")]


def _box(tool: str, target: str | None, recipe: Path | None, variant: str | None, name: str | None,
         image: str | None = None, need_image: bool = False) -> Box:
    box = _resolve_box(pick_tool(tool), target, recipe, variant, name, image, need_image)
    if tool == "auto" and not need_image and shutil.which("podman"):
        # enter and rm go through the tool that made the container, whatever is installed now.
        made_by = tool_of(box.name)
        if made_by is not None and made_by is not box.tool:
            box = Box(made_by, box.name, box.image, box.host)
    return box


def _resolve_box(chosen: Tool, target: str | None, recipe: Path | None, variant: str | None, name: str | None,
                 image: str | None, need_image: bool) -> Box:
    if target is None and recipe is None:
        if name is None or (need_image and image is None):
            raise RecipeError("no target chosen", "pass --target NAME, or --name (and --image for create)")
        return Box(chosen, name, image or "")
    # The run contract comes from the target table; the recipe is read only when its image is needed.
    entry, variant_entry = select(load_recipe(recipe).target if recipe else str(target), variant,
                                  variant_from_cli=variant is not None)
    box = Box(chosen, name or f"builder-{entry.name}-{variant_entry.name}", image or "", variant_entry.host)
    if need_image and image is None:
        prep = prepare(recipe_file(target, recipe), variant_entry.name)
        box = Box(chosen, box.name, image_for_run(box.engine, prep), box.host)
    _warn_missing(box.host, entry.name)
    return box


def _require_box(box: Box, hint: str) -> None:
    """The tool works and the container is there (what enter and rm need before running anything)."""
    check_tool(box.tool)
    if not exists(box):
        raise RecipeError(f"no container {box.name}", hint)


def _steps(box: Box, steps: list[list[str]], print_only: bool) -> None:
    env = box.tool_env()
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
) -> None:
    """Create a toolbox container from a target's image, with the variant's devices, groups and environment.

    Toolbx and distrobox share /dev and run privileged; plain podman gets the same flags as `builder run`.
    """
    box = _box(tool, target, recipe, variant, name, image, need_image=True)
    if not print_only:
        check_tool(box.tool)
        if exists(box):
            raise RecipeError(f"container {box.name} already exists",
                              f"enter it with `builder toolbox enter --name {box.name}`, or remove it first "
                              f"with `builder toolbox rm --name {box.name} --tool {box.tool}`")
    _steps(box, box.create(), print_only)


@toolbox_app.command(
    "enter", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "allow_interspersed_args": False}
)
def toolbox_enter(
    command: Annotated[list[str] | None, typer.Argument(help="A command to run instead of a login shell.")] = None,
    target: TargetOpt = None,
    recipe: RecipeOpt = None,
    variant: VariantOpt = None,
    name: BoxNameOpt = None,
    tool: ToolOpt = "auto",
    print_only: PrintOpt = False,
) -> None:
    """Enter a toolbox container: a login shell, or the command after `--`.

    Example: builder toolbox enter --target cpu -- llama-cli --version
    """
    box = _box(tool, target, recipe, variant, name)
    if not print_only:
        create = f"builder toolbox create --target {target}" if target else "builder toolbox create"
        _require_box(box, f"create it first: {create}")
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    _steps(box, box.enter(list(command or []), tty), print_only)


@toolbox_app.command("rm")
def toolbox_rm(
    target: TargetOpt = None,
    recipe: RecipeOpt = None,
    variant: VariantOpt = None,
    name: BoxNameOpt = None,
    tool: ToolOpt = "auto",
    print_only: PrintOpt = False,
) -> None:
    """Remove a toolbox container (stopping it first); the image stays."""
    box = _box(tool, target, recipe, variant, name)
    if not print_only:
        _require_box(box, "`podman ps --all` lists the containers")
    _steps(box, box.remove(), print_only)


def _report(exc: BuilderError) -> None:
    err.print(f"error: {exc.message}", markup=False)
    if isinstance(exc, CommandError) and exc.tail:
        err.print("last lines of output:", markup=False)
        for line in exc.tail.splitlines():
            err.print(f"  | {line}", markup=False)
    if exc.hint:
        err.print(f"hint: {exc.hint}", markup=False)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if not request_stop(signum):
        return  # clean-up is running: let it finish (it is bounded; SIGKILL still stops at once)
    raise Stopped(signum)


def main() -> None:
    # SIGTERM (systemd, CI cancelling a job, `kill`) is handled like Ctrl-C: temp files, scratch images and
    # running commands are cleaned up on the way out, then exit 128 + signal (130, 143).
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        try:
            cleanup.sweep()  # what runs killed outright left behind
        except (BuilderError, OSError) as exc:
            logging.getLogger("builder").debug("sweeping left-overs failed: %s", exc)
        app(prog_name="builder")
    except BuilderError as exc:
        if _debug:
            traceback.print_exc()
        _report(exc)
        sys.exit(exc.exit_code)
    except Stopped as exc:
        err.print("interrupted" if exc.signum == signal.SIGINT else "terminated", markup=False)
        sys.exit(128 + exc.signum)
    finally:
        cleanup.release()
