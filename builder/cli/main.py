"""The `builder` command: thin verbs over the pipeline, and the only place errors become exit codes."""

import json
import logging
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from builder import __version__
from builder.build.pipeline import BuildResult, build
from builder.cli.cluster import cluster_app
from builder.cli.common import (
    DEFAULT_FLAVOUR,
    EngineOpt,
    FlavourOpt,
    JsonOpt,
    LockOpt,
    RecipeOpt,
    SourceOpt,
    TargetOpt,
    VariantOpt,
    err,
    prepared,
)
from builder.cli.pxe import pxe_app
from builder.cli.run import EXTRA_ARGS, run, toolbox_app
from builder.core.errors import BuilderError, CommandError, Stopped, request_stop
from builder.engines import cleanup, get_engine
from builder.fetch.pin import pin_recipe
from builder.flavours import lock as lockfile
from builder.flavours.prepare import flavour_named, recipe_file
from builder.flavours.vllm import lock_variant
from builder.publish.image import publish as publish_image
from builder.publish.sbom import read_contents, sbom_bytes
from builder.recipe.load import RECIPES_DIR, display_path, select
from builder.registry.client import Repository
from builder.use.doctor import diagnose
from builder.use.launch import image_for_run
from builder.use.listing import target_entries, target_rows
from builder.use.matrix import matrix as ci_matrix

app = typer.Typer(
    help="Build llama.cpp and vLLM inference images (RPC workers and servers) from recipes, for every accelerator.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(pxe_app, name="pxe")
app.add_typer(cluster_app, name="cluster")
app.add_typer(toolbox_app, name="toolbox")
app.command(context_settings=EXTRA_ARGS)(run)
_debug = False


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
    global _debug
    _debug = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(message)s")
    logging.getLogger("builder.progress").setLevel(logging.INFO)  # what the library says it is waiting for


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
def schema(flavour: FlavourOpt = DEFAULT_FLAVOUR) -> None:
    """Print the recipe JSON Schema (--flavour vllm: the vLLM recipe's)."""
    typer.echo(json.dumps(flavour_named(flavour).recipe_model.model_json_schema(), indent=2))


@app.command()
def plan(
    target: TargetOpt = None,
    recipe: RecipeOpt = None,
    variant: VariantOpt = None,
    llama_cpp_source: SourceOpt = None,
    as_json: JsonOpt = False,
    flavour: FlavourOpt = DEFAULT_FLAVOUR,
) -> None:
    """Resolve a recipe into a build plan: bases, pinned inputs, flags, labels and the image tag."""
    prep = prepared(flavour, target, recipe, variant, llama_cpp_source)
    if as_json:
        typer.echo(json.dumps(prep.document(), indent=2, sort_keys=True))
        return
    for key, value in {"recipe": prep.plan.recipe, "target": prep.name, "image": prep.tag,
                       **prep.flavour.summary(prep)}.items():
        typer.echo(f"{key:<10} {value}")


@app.command()
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
) -> None:
    """Write the build context (Containerfile, scripts, plan.json) without building anything."""
    prep = prepared(flavour, target, recipe, variant, llama_cpp_source)
    changed = prep.write(out)
    if with_source:
        prep.flavour.fetch(prep, out)
    typer.echo(f"rendered {prep.name} into {out} ({len(changed)} file(s) changed); image tag {prep.tag}")


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
    flavour: FlavourOpt = DEFAULT_FLAVOUR,
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
    flavour: FlavourOpt = DEFAULT_FLAVOUR,
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
    flavour: FlavourOpt = DEFAULT_FLAVOUR,
    refresh: Annotated[bool, typer.Option(
        "--refresh", help="Resolve every bootstrapped base again (move to the archive's current versions).")] = False,
) -> None:
    """Record every pinned input of every image (bases, llama.cpp source, vendor pins) in builder.lock.

    Bootstrapped bases of both flavours get their full package set (exact versions, suites, .deb sha256s),
    resolved from the archive's indexes for bases that are new or changed; --refresh resolves all of them again.
    With --check, change nothing: print one line per disagreement (builder.lock, and stale vLLM wheel locks)
    and exit 1 if there is any.
    With --flavour vllm --target T: resolve that vLLM recipe's requirements for the image's Python and
    write its wheel lock beside it (exact versions + sha256, installed with pip's --require-hashes).
    """
    if flavour_named(flavour).name == "vllm" and not check:
        path, pinned = lock_variant(recipe_file(target, recipe, flavour_named(flavour)), variant)
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
    flavour: Annotated[str | None, typer.Option(
        "--flavour", help="Only this flavour's images (llama.cpp or vllm); default: both.")] = None,
) -> None:
    """Print the CI matrix as JSON: `include`, the images with every input pinned; `render_only`, the others."""
    if flavour is not None:
        flavour_named(flavour)
    typer.echo(json.dumps(ci_matrix(recipes, flavour), separators=(",", ":")))


@app.command()
def sbom(
    target: TargetOpt = None,
    recipe: RecipeOpt = None,
    variant: VariantOpt = None,
    engine: EngineOpt = "auto",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write here instead of stdout.")] = None,
    flavour: FlavourOpt = DEFAULT_FLAVOUR,
) -> None:
    """Write the SPDX 2.3 SBOM of the built image: its OS (from its os-release) and packages, its Python
    packages, llama.cpp or vLLM, SDK wheels and vendor .debs."""
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


def execute(argv: Sequence[str]) -> int:
    """`builder ARGV` without leaving the process: its exit code, after what a user sees on the way out
    (one error line and a hint for a BuilderError, "interrupted"/"terminated" for a stop). `main` is this
    plus the signal handlers; the tests call it directly for the cases that need no real process."""
    global _debug
    _debug = False
    try:
        try:
            cleanup.sweep()  # what runs killed outright left behind
        except (BuilderError, OSError) as exc:
            logging.getLogger("builder").debug("sweeping left-overs failed: %s", exc)
        app(args=list(argv), prog_name="builder")
    except SystemExit as exc:  # click ends every run with one, 0 included
        return _exit_code(exc.code)
    except BuilderError as exc:
        if _debug:
            traceback.print_exc()
        _report(exc)
        return exc.exit_code
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
