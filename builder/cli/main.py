"""The `builder` command: thin verbs over the pipeline, and the only place errors become exit codes."""

import dataclasses
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from builder import __version__
from builder.cli import rolling  # noqa: F401  (registers `cluster drain|enable|roll`)
from builder.cli.cluster import cluster_app
from builder.cli.common import (
    DEFAULT_FLAVOUR,
    EngineOpt,
    FlavourOpt,
    JsonOpt,
    LockOpt,
    RecipeOpt,
    RecipesOpt,
    SourceOpt,
    TargetOpt,
    VariantOpt,
    emit,
    prepared,
)
from builder.cli.conventions import BuilderGroup, State, check_input, check_output, err
from builder.cli.model import model_app
from builder.cli.pxe import pxe_app
from builder.cli.run import EXTRA_ARGS, run, toolbox_app
from builder.cluster.locking import lock_cluster
from builder.core.errors import BuilderError, RecipeError, Stopped, request_stop
from builder.engines import cleanup, get_engine
from builder.fetch.pin import pin_recipe
from builder.fetch.provenance import llama_commit, pin_line, rpc_protocol
from builder.flavours import lock as lockfile
from builder.flavours.prepare import flavour_named, recipe_file
from builder.flavours.vllm import lock_variant
from builder.netboot.kernels import fetch_kernel_tree, kernel_spec, pinned_kernel, pinned_version
from builder.pipeline.build import BuildResult, build, prefetch
from builder.publish.image import publish as publish_image
from builder.publish.sbom import read_contents, sbom_bytes
from builder.recipe.load import RECIPES_DIR, display_path, load_yaml, recipes_dir, select, shared_pin, validated
from builder.recipe.models import LlamaCpp, LockedBase
from builder.registry.client import Repository
from builder.use.doctor import diagnose
from builder.use.launch import image_for_run
from builder.use.listing import target_entries, target_rows
from builder.use.matrix import matrix as ci_matrix

app = typer.Typer(
    help="Build llama.cpp and vLLM inference images (RPC workers and servers) from recipes, for every accelerator."
         "\n\nGlobal options (--debug, --version) go before or after the verb; a verb's options go after it. "
         "Errors are one `error:` line on stderr (and a `hint:` line), under --json too; bad input exits 2.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=BuilderGroup,
)
# `builder --help` shows what an operator needs first, then the verbs that make and vouch for images.
OPERATE = "Run models: on this host, a cluster, netbooted nodes"
IMAGES = "Images: plan, build, publish and their supply chain"
app.command(context_settings=EXTRA_ARGS, rich_help_panel=OPERATE)(run)
app.add_typer(cluster_app, name="cluster", rich_help_panel=OPERATE)
app.add_typer(pxe_app, name="pxe", rich_help_panel=OPERATE)
app.add_typer(model_app, name="model", rich_help_panel=OPERATE)
app.add_typer(toolbox_app, name="toolbox", rich_help_panel=OPERATE)


def _print_version(wanted: bool) -> None:
    if wanted:  # eager: before click asks for a command
        typer.echo(f"builder {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Log every command and show tracebacks.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                          callback=_print_version)] = False,
) -> None:
    State.debug = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(message)s")
    logging.getLogger("builder.progress").setLevel(logging.INFO)  # what the library says it is waiting for


@app.command(rich_help_panel=OPERATE)
def targets(as_json: JsonOpt = False, recipes: RecipesOpt = None) -> None:
    """List every target/variant (the default marked *): what you can build, and how builder tests each.

    LLAMA.CPP and VLLM (--flavour vllm): `ready` to build, `needs pin` or `needs lock` (the command to run
    first is listed below the table), or `-` (no recipe of that flavour). TESTED BY BUILDER: how builder's own
    test suite checks the variant, on machines without GPUs, NPUs or vendor sites. Below the table: where a
    cluster file's vLLM services can run (netbooted nodes, or boxes by `builder cluster commands`).
    """
    entries = target_entries()
    if as_json:
        typer.echo(json.dumps(entries, indent=2))
        return
    for line in target_rows(entries):
        typer.echo(line)
    pin = shared_pin()
    typer.echo()
    typer.echo(pin_line(validated(LlamaCpp, pin, load_yaml(pin)).source, display_path(pin)))


@app.command(rich_help_panel=IMAGES)
def schema(flavour: FlavourOpt = DEFAULT_FLAVOUR) -> None:
    """Print the recipe JSON Schema (--flavour vllm: the vLLM recipe's)."""
    typer.echo(json.dumps(flavour_named(flavour).recipe_model.model_json_schema(), indent=2))


@app.command(rich_help_panel=IMAGES)
def plan(
    target: TargetOpt = None,
    recipe: RecipeOpt = None,
    variant: VariantOpt = None,
    llama_cpp_source: SourceOpt = None,
    as_json: JsonOpt = False,
    flavour: FlavourOpt = DEFAULT_FLAVOUR,
    recipes: RecipesOpt = None,
) -> None:
    """Resolve a recipe into a build plan: bases, pinned inputs, flags, labels and the image tag."""
    prep = prepared(flavour, target, recipe, variant, llama_cpp_source)
    facts: dict[str, str | None] = {}
    if prep.tree is not None:  # llama.cpp: what people look up, beside the llama-cpp-python version
        facts = {"llama_cpp_commit": llama_commit(prep.tree.info, prep.tree.path),
                 "ggml_rpc_protocol": rpc_protocol(prep.tree.path)}
    if as_json:
        typer.echo(json.dumps({**prep.document(), **facts}, indent=2, sort_keys=True))
        return
    for key, value in {"recipe": prep.plan.recipe, "target": prep.name, "image": prep.tag,
                       **prep.flavour.summary(prep)}.items():
        typer.echo(f"{key:<10} {value}")
    if facts:
        typer.echo(f"{'commit':<10} {facts['llama_cpp_commit'] or 'not recorded by this source'}")
        protocol = facts["ggml_rpc_protocol"]
        typer.echo(f"{'rpc':<10} " + (f"ggml RPC protocol {protocol} (every worker and server of a split model "
                                      "speaks the same one)" if protocol else "no ggml RPC header in this source"))


@app.command(rich_help_panel=IMAGES)
def render(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the build context.")],
    target: TargetOpt = None,
    recipe: RecipeOpt = None,
    variant: VariantOpt = None,
    llama_cpp_source: SourceOpt = None,
    with_source: Annotated[bool, typer.Option(
        help="Also fetch the pinned inputs (llama.cpp: the source tree, SDKs and vendor files into the context; "
             "vLLM: the locked wheels into the cache), ready to build.")] = False,
    flavour: FlavourOpt = DEFAULT_FLAVOUR,
    as_json: JsonOpt = False,
    recipes: RecipesOpt = None,
) -> None:
    """Write the build context (Containerfile, scripts, plan.json) without building anything."""
    check_output(out, "--out", folder=True)
    prep = prepared(flavour, target, recipe, variant, llama_cpp_source)
    changed = prep.write(out)
    if with_source:
        prep.flavour.fetch(prep, out)
    emit(as_json, {"target": prep.name, "context": str(out), "changed": changed, "image": prep.tag},
         [f"rendered {prep.name} into {out} ({len(changed)} file(s) changed); image tag {prep.tag}"])


def _print_build(result: BuildResult, as_json: bool) -> None:
    doc = {"image": result.ref, "digest": result.digest, "size": result.size, "built": result.built,
           "seconds": round(result.seconds, 1), "log": str(result.log) if result.log else None}
    state = f"built in {result.seconds:.0f} s" if result.built else "up to date, nothing to build"
    emit(as_json, doc, [f"image   {result.ref} ({state})", f"digest  {result.digest}",
                        f"size    {result.size / 1e6:.1f} MB", *([f"log     {result.log}"] if result.log else [])])


@app.command("build", rich_help_panel=IMAGES)
def build_cmd(
    target: TargetOpt = None,
    recipe: RecipeOpt = None,
    variant: VariantOpt = None,
    engine: EngineOpt = "auto",
    llama_cpp_source: SourceOpt = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Rebuild even if the image exists.")] = False,
    lock_path: LockOpt = lockfile.LOCK_FILE,
    as_json: JsonOpt = False,
    flavour: FlavourOpt = DEFAULT_FLAVOUR,
    recipes: RecipesOpt = None,
) -> None:
    """Render, build and smoke-test an image; print its reference and digest.

    The tag is a hash of everything that determines the image, so an unchanged recipe builds nothing.
    The full build log is saved; its path is printed.
    """
    prep = prepared(flavour, target, recipe, variant, llama_cpp_source, lock_path)
    prep.flavour.check(prep, lock_path, strict=False)  # before the engine is looked for
    chosen = get_engine(engine)
    err.print(f"building {prep.tag} with {chosen.name} (context {prep.context})")
    _print_build(build(prep, chosen, no_cache=no_cache), as_json)


@app.command("fetch", rich_help_panel=IMAGES)
def fetch_cmd(
    target: TargetOpt = None,
    recipe: RecipeOpt = None,
    variant: VariantOpt = None,
    lock_path: LockOpt = lockfile.LOCK_FILE,
    netboot: Annotated[bool, typer.Option("--netboot", help="Also the target's netboot kernel and firmware.")
                       ] = False,
    as_json: JsonOpt = False,
    flavour: FlavourOpt = DEFAULT_FLAVOUR,
    recipes: RecipesOpt = None,
) -> None:
    """Download an image's pinned inputs into the cache (each checked by sha256) and build nothing.

    The llama.cpp source, the locked Debian packages of its bases, SDK wheels and vendor files, vLLM wheels:
    a later `builder build` of that image needs no network for them. Run it before going offline, or beside
    another build to overlap downloads with compiling.
    """
    started = time.monotonic()
    prep = prepared(flavour, target, recipe, variant, None, lock_path)
    packages = prefetch(prep)
    kernel = None
    if netboot:
        spec = kernel_spec(prep.plan.target)
        where = display_path(lock_path)
        entry = pinned_kernel(prep.plan.target, spec, lockfile.netboot_entry(prep.plan.target, lock_path), where)
        kernel = fetch_kernel_tree(spec, entry, where)
    seconds = round(time.monotonic() - started, 1)
    if as_json:
        typer.echo(json.dumps({"image": prep.name, "base_packages": packages,
                               "netboot_kernel": str(kernel) if kernel else None, "seconds": seconds}))
    else:
        typer.echo(f"fetched {prep.name}: its inputs are in the cache ({packages} base packages checked"
                   f"{', and its netboot kernel' if kernel else ''}; {seconds} s)")


@app.command(rich_help_panel=IMAGES)
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
    flavour: FlavourOpt = DEFAULT_FLAVOUR,
    recipes: RecipesOpt = None,
) -> None:
    """Build if needed, push by digest, verify the registry's digest, then tag; skip if already published.

    Tags: an immutable content tag (target-variant-llama<version>-<content hash>; vLLM:
    target-vllm-variant-vllm<version>-<content hash>) and a floating one (target-variant). Credentials come
    only from podman's auth.json or docker's config.json (podman login / docker login). The inputs must
    agree with builder.lock (vLLM: the variant's wheel lock).
    """
    repo = Repository.parse(registry)
    prep = prepared(flavour, target, recipe, variant, lock=lock_path)
    prep.flavour.check(prep, lock_path, strict=True)  # before the engine is looked for
    result = publish_image(prep, get_engine(engine), repo, sbom=sbom)
    doc = {"repository": result.repository, "digest": result.digest, "reference": result.reference,
           "tags": list(result.tags), "pushed": result.pushed, "built": result.built, "sbom": result.sbom,
           "seconds": round(result.seconds, 1)}
    state = "published" if result.pushed else "already published, nothing built or pushed"
    emit(as_json, doc, [f"{state}: {result.reference}", *(f"tag     {result.repository}:{tag}" for tag in result.tags),
                        *([f"sbom    {result.sbom}"] if result.sbom else [])])


@app.command(rich_help_panel=IMAGES)
def lock(
    cluster_file: Annotated[Path | None, typer.Argument(
        metavar="CLUSTER", help="A cluster file (cluster.yaml): lock its hf:// models in cluster.lock beside it "
        "instead.")] = None,
    check: Annotated[bool, typer.Option("--check", help="Exit 1 when recipes and lock disagree.")] = False,
    lock_path: LockOpt = lockfile.LOCK_FILE,
    recipes: RecipesOpt = None,
    target: TargetOpt = None,
    recipe: RecipeOpt = None,
    variant: VariantOpt = None,
    flavour: FlavourOpt = DEFAULT_FLAVOUR,
    refresh: Annotated[bool, typer.Option(
        "--refresh", help="Resolve every bootstrapped base and netboot kernel again (move to the archive's current "
        "versions).")] = False,
    refresh_netboot: Annotated[bool, typer.Option(
        "--refresh-netboot", help="Resolve the netboot kernels and firmware again, and nothing else.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Record every pinned input of every image (bases, llama.cpp source, vendor pins) in builder.lock.

    Bootstrapped bases of both flavours get their full package set (exact versions, suites, .deb sha256s),
    resolved from the archive's indexes for bases that are new or changed; --refresh resolves all of them again.
    Each netboot target's kernel and firmware packages are pinned the same way (--refresh-netboot: only them).
    With --check, change nothing: print one line per disagreement (builder.lock, and stale vLLM wheel locks)
    and exit 1 if there is any.
    With --flavour vllm --target T: resolve that vLLM recipe's requirements for the image's Python and
    write its wheel lock beside it (exact versions + sha256, installed with pip's --require-hashes).
    With a cluster file: resolve each of its hf:// models on the hub (HF_ENDPOINT; your token from
    huggingface_hub) and record the commit and every file's size and sha256 in cluster.lock beside the file;
    --check changes nothing and exits 1 when the hub now disagrees with the lock.
    """
    if cluster_file is not None:
        _lock_cluster(cluster_file, check, as_json,
                      any((target, recipe, variant, recipes, refresh, refresh_netboot, lock_path != lockfile.LOCK_FILE,
                           flavour != DEFAULT_FLAVOUR)))
        return
    if flavour_named(flavour).name != "vllm" and (target or recipe or variant):
        raise RecipeError("builder lock: --target, --recipe and --variant choose a vLLM recipe's wheel lock",
                          "builder.lock covers every llama.cpp recipe: run `builder lock` alone, or add --flavour vllm")
    if flavour_named(flavour).name == "vllm" and not check:
        path, pinned = lock_variant(recipe_file(target, recipe, flavour_named(flavour)), variant)
        emit(as_json, {"lock": str(path), "packages": len(pinned.pins)},
             [f"locked {len(pinned.pins)} packages into {display_path(path)}"])
        return
    recipes = recipes or recipes_dir()
    if check:
        lines = lockfile.check(lock_path, recipes)
        if as_json:
            typer.echo(json.dumps({"lock": str(lock_path), "matches": not lines, "disagreements": lines}, indent=2))
        for line in [] if as_json else lines:
            typer.echo(line)
        if lines:
            raise typer.Exit(1)
        if not as_json:
            typer.echo(f"{lock_path.name}: matches the recipes")
        return
    written = lockfile.write(lock_path, recipes, refresh=refresh, refresh_netboot=refresh_netboot)
    packages = sum(len(base["resolved"]) for base in written["bases"].values())
    kernels = {target: pinned_version(LockedBase.model_validate(entry), "linux-image-amd64")
               for target, entry in written["netboot"].items()}
    emit(as_json, {"lock": str(lock_path), "images": len(written["images"]), "bases": len(written["bases"]),
                   "packages": packages, "netboot": kernels},
         [f"wrote {lock_path} ({len(written['images'])} image(s), {len(written['bases'])} bootstrapped base(s), "
          f"{packages} packages; netboot kernels: {', '.join(f'{t} {v}' for t, v in kernels.items())})"])


def _lock_cluster(path: Path, check: bool, as_json: bool, image_options: bool) -> None:
    if image_options:
        raise RecipeError("builder lock CLUSTER: the image options (--target, --lock, --refresh …) belong to "
                          "builder.lock", "run `builder lock CLUSTER` alone, or `builder lock` for the images")
    check_input(path, "cluster file", folder=False)
    result = lock_cluster(path, lambda line: err.print(line, markup=False), check=check)
    where = display_path(result.lock)
    if check:
        lines = [f"{where}: {name} is not locked as the hub resolves it now" for name in result.changed] \
            or [f"{where}: matches the hub for {len(result.models)} model(s)"]
    elif not result.models:
        lines = [f"{display_path(path)} names no hf:// model: nothing to lock"]
    else:
        lines = [f"locked {name} at {entry.commit} ({len(entry.files)} file(s), {entry.size} bytes)"
                 for name, entry in result.models.items()] + [f"wrote {where}"]
    emit(as_json, {"lock": str(result.lock), "matches": not result.changed if check else None,
                   "changed": list(result.changed),
                   "models": {name: entry.model_dump() for name, entry in result.models.items()}}, lines)
    if check and result.changed:
        raise typer.Exit(1)


@app.command(rich_help_panel=IMAGES)
def pin(
    target: TargetOpt = None,
    recipe: RecipeOpt = None,
    variant: Annotated[str | None, typer.Option("--variant", help="Only this variant (default: all).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Read and print the values; write nothing.")] = False,
    as_json: JsonOpt = False,
    recipes: RecipesOpt = None,
) -> None:
    """Fill the recipe's placeholder pins (all zeros) with values read from their sources.

    An image's digest comes from its registry, a signing key's or .deb's sha256 from its download. Run it
    where those sites are reachable, review the diff, then `builder lock`. Nothing is written unless every
    value was read; comments and layout of the recipe stay as they are.
    """
    path = recipe_file(target, recipe)
    values = pin_recipe(path, variant, dry_run)
    lines = [f"{placeholder.field}: {placeholder.source} -> sha256:{value}" for placeholder, value in values.items()]
    if not values:
        lines = [f"{display_path(path)}: no placeholder pins"]
    elif dry_run:
        lines.append(f"{len(values)} value(s) read; --dry-run: {display_path(path)} unchanged")
    else:
        lines.append(f"wrote {len(values)} pin(s) into {display_path(path)}")
        if path.resolve().parent == RECIPES_DIR.resolve():
            lines.append(f"next: review the diff, then {lockfile.HINT.removeprefix('run ')}")
    emit(as_json, {"recipe": display_path(path), "written": bool(values) and not dry_run,
                   "pins": [{"field": p.field, "source": p.source, "sha256": v} for p, v in values.items()]}, lines)


@app.command(rich_help_panel=IMAGES)
def matrix(
    recipes: RecipesOpt = None,
    flavour: Annotated[str | None, typer.Option(
        "--flavour", help="Only this flavour's images (llama.cpp or vllm); default: both.")] = None,
) -> None:
    """Print the CI matrix as JSON: `include`, the images with every input pinned; `render_only`, the others."""
    if flavour is not None:
        flavour_named(flavour)
    typer.echo(json.dumps(ci_matrix(recipes or recipes_dir(), flavour), separators=(",", ":")))


@app.command(rich_help_panel=IMAGES)
def sbom(
    target: TargetOpt = None,
    recipe: RecipeOpt = None,
    variant: VariantOpt = None,
    engine: EngineOpt = "auto",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write here instead of stdout.")] = None,
    flavour: FlavourOpt = DEFAULT_FLAVOUR,
    recipes: RecipesOpt = None,
) -> None:
    """Write the SPDX 2.3 SBOM of the built image: its OS (from its os-release) and packages, its Python
    packages, llama.cpp or vLLM, SDK wheels and vendor .debs."""
    if out is not None:
        check_output(out, "--out", folder=False)
    chosen = get_engine(engine)
    prep = prepared(flavour, target, recipe, variant)
    ref = image_for_run(chosen, prep)
    info = chosen.inspect(ref)
    assert info is not None
    data = sbom_bytes(prep.flavour.sbom(prep, ref, info.id, read_contents(chosen, ref)))
    if out is None:
        sys.stdout.write(data.decode())
    else:
        out.write_bytes(data)
        err.print(f"wrote {out}")


@app.command(rich_help_panel=OPERATE)
def doctor(
    target: Annotated[str, typer.Option("--target", "-t", help="Target to check the host for.")] = "cpu",
    variant: VariantOpt = None,
    model: Annotated[Path | None, typer.Option(help="A model file: is there memory for it?")] = None,
    root: Annotated[Path, typer.Option(help="Read /proc, /sys and /dev under this folder.")] = Path("/"),
    as_json: JsonOpt = False,
) -> None:
    """Check that this host can run a target's image: one PASS/FAIL line per check, with the fix.

    Checks devices and access to them, kernel version and modules (and kernels known bad for the target),
    Strix Halo unified-memory kernel parameters, Intel GPU firmware and drivers, CDI for NVIDIA, and free memory
    against a model's size; names the netboot kernel builder.lock pins. Exit code 1 when a check fails.
    """
    check_input(root, "--root", folder=True)
    if model is not None:
        check_input(model, "--model", folder=False)
    entry, chosen = select(target, variant, variant_from_cli=variant is not None)
    checks = diagnose(entry, chosen, root=root, model=model)
    failed = sum(1 for c in checks if c.required and not c.ok)
    warned = sum(1 for c in checks if not c.required and not c.ok)
    emit(as_json, {"target": entry.name, "variant": chosen.name, "root": str(root), "ok": sum(c.ok for c in checks),
                   "failing": failed, "warnings": warned, "checks": [dataclasses.asdict(c) for c in checks]},
         [f"doctor: {entry.name}/{chosen.name} on {root}", *(check.line() for check in checks),
          f"doctor: {sum(c.ok for c in checks)} ok, {failed} failing, {warned} warning(s)"])
    if failed:
        raise typer.Exit(1)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if not request_stop(signum):
        return  # clean-up is running: let it finish (it is bounded; SIGKILL still stops at once)
    raise Stopped(signum)


def execute(argv: Sequence[str]) -> int:
    """`builder ARGV` without leaving the process: its exit code, after what a user sees on the way out
    (one error line and a hint for a BuilderError, "interrupted"/"terminated" for a stop). `main` is this
    plus the signal handlers; the tests call it directly for the cases that need no real process."""
    try:
        try:
            cleanup.sweep()  # what runs killed outright left behind
        except (BuilderError, OSError) as exc:
            logging.getLogger("builder").debug("sweeping left-overs failed: %s", exc)
        app(args=list(argv), prog_name="builder")  # BuilderGroup turns errors into one line and the exit code
    except SystemExit as exc:  # click ends every run with one, 0 included
        return _exit_code(exc.code)
    except Stopped as exc:
        err.print("interrupted" if exc.signum == signal.SIGINT else "terminated", markup=False)
        return 128 + exc.signum
    finally:
        cleanup.release()
    return 0


def _exit_code(code: object) -> int:
    """What the interpreter makes of `sys.exit(code)`: None is 0, a number itself, anything else printed and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def main() -> None:
    # SIGTERM (systemd, CI cancelling a job, `kill`) is handled like Ctrl-C: temp files, scratch images and
    # running commands are cleaned up on the way out, then exit 128 + signal (130, 143).
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    sys.exit(execute(sys.argv[1:]))
