"""The stages every image goes through, whatever its flavour.

load recipe -> plan -> render (pure) -> [policy] -> fetch inputs -> bases -> build -> smoke -> promote.
A flavour (builder/llama.py, builder/vllm.py) supplies what differs; publish, sbom, pxe build, toolbox
and run start from `prepare` and `build` here.
"""

import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from builder.flavours import lock as lockfile
from builder.fetch.bootstrap import ensure_base
from builder.core.cleanup import forget_image, record_image
from builder.engines import Engine
from builder.core.errors import CommandError, RecipeError, raise_if_stopped
from builder.build.flavour import Flavour, Prepared
from builder.flavours.llama import LLAMA_CPP
from builder.core.locks import locked
from builder.core.paths import cache_subdir
from builder.plan.make import LABEL_PREFIX
from builder.core.run import run
from builder.flavours.vllm import VLLM

FLAVOURS: dict[str, Flavour] = {f.name: f for f in (LLAMA_CPP, VLLM)}


@dataclass(frozen=True)
class BuildResult:
    ref: str
    digest: str
    size: int
    built: bool
    seconds: float
    log: Path | None


def flavour_named(name: str) -> Flavour:
    if name not in FLAVOURS:
        raise RecipeError(f"--flavour: unknown flavour {name!r}", f"flavours: {', '.join(FLAVOURS)}")
    return FLAVOURS[name]


def recipe_file(target: str | None, recipe: Path | None, flavour: Flavour = LLAMA_CPP) -> Path:
    if recipe is not None:
        return recipe
    if target:
        return flavour.recipe_path(target)
    raise RecipeError("no recipe chosen", "pass --target NAME (see `builder targets`) or --recipe PATH")


def source_date_epoch() -> int | None:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None:
        return None
    if not value.isdigit():
        raise RecipeError(f"SOURCE_DATE_EPOCH={value!r} is not a number of seconds")
    return int(value)


def prepare(path: Path, variant: str | None = None, source_override: str | None = None,
            lock: Path = lockfile.LOCK_FILE, flavour: Flavour = LLAMA_CPP) -> Prepared:
    """Load, plan and render one image (nothing is built; only a llama.cpp source may be fetched)."""
    locked_bases = lockfile.locked_bases(lock)
    plan, tree = flavour.plan(path, variant, source_override, locked_bases, source_date_epoch())
    files, fingerprint = flavour.render(plan)
    return Prepared(flavour, plan, files, fingerprint, locked_bases, path, lock, tree, source_override)


def smoke_test(engine: Engine, ref: str) -> str:
    """Run the image's smoke role (no network); returns its report."""
    return run([*engine.run_argv(), "--rm", "--network", "none", "--", ref, "smoke"], timeout=300).stdout


def scratch_tag(repository_tag: str) -> str:
    """A tag of this run alone for an image that is not smoke-tested yet: REPO:scratch-<tag>-<random>."""
    repository, _, tag = repository_tag.rpartition(":")
    return f"{repository}:scratch-{tag}-{secrets.token_hex(4)}"


def build_and_promote(engine: Engine, tag: str, floating: str, build_into: Callable[[str], None],
                      log: Path) -> None:
    """Build into a scratch tag, smoke-test it, and only then name it `tag` and `floating`.

    The content tag is what makes the next build skip and `publish` push, so it must only ever name an
    image that passed its smoke test: whatever stops this run (an error, Ctrl-C, SIGTERM, a kill) before
    that leaves at most the scratch tag, which this run or the next one removes.
    """
    scratch = record_image(engine.name, scratch_tag(tag))
    try:
        build_into(scratch)
        try:
            smoke_test(engine, scratch)
        except CommandError as exc:
            raise CommandError(f"smoke test of {tag} failed", hint=f"build log: {log}", tail=exc.tail) from None
        raise_if_stopped()  # a stop during the smoke test must never end in a content tag
        engine.tag(scratch, tag)
        engine.tag(scratch, floating)
    finally:
        engine.remove(scratch)  # only a name once promoted; the image itself when not
        if engine.inspect(scratch) is None:
            forget_image(engine.name, scratch)  # else it stays claimed: removed again on the way out


def build(prep: Prepared, engine: Engine, *, no_cache: bool = False) -> BuildResult:
    """Build the image unless one with the same content tag exists; smoke-test it; tag it.

    The flavour's policy runs first (placeholder pins, lock agreement, render-only variants), so every
    caller of the library gets it."""
    prep.flavour.check(prep, prep.lock, strict=False)
    # One build per context folder at a time: a second one would rewrite and prune files under the first.
    context = prep.context
    with locked(context.with_name(f"{context.name}.lock"), f"building {prep.name}"):
        return _build(prep, engine, no_cache=no_cache)


def _build(prep: Prepared, engine: Engine, *, no_cache: bool) -> BuildResult:
    started = time.monotonic()
    existing = None if no_cache else engine.inspect(prep.tag)
    if existing is not None:
        engine.tag(prep.tag, prep.floating)
        return BuildResult(prep.tag, existing.id, existing.size, False, time.monotonic() - started, None)

    # The context and its inputs first: a bad SDK pin or an unreachable vendor repository fails here,
    # before minutes of bootstrapping or pulling.
    context = prep.context
    prep.write(context)
    service = prep.flavour.fetch(prep, context)
    for base in prep.flavour.bases(prep):
        ensure_base(engine, base, prep.locked)
    name = prep.name.replace("/", "-")
    log = cache_subdir("logs") / f"{name}-{engine.name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    labels = {f"{LABEL_PREFIX}.fingerprint": prep.fingerprint}

    def build_into(ref: str) -> None:
        with service as args:
            engine.build(context, ref, build_args=args.build_args, env_args=args.env_args, labels=labels, log=log,
                         no_cache=no_cache)

    build_and_promote(engine, prep.tag, prep.floating, build_into, log)
    info = engine.inspect(prep.tag)
    assert info is not None
    return BuildResult(prep.tag, info.id, info.size, True, time.monotonic() - started, log)


def image_for_run(engine: Engine, prep: Prepared) -> str:
    """The image `builder run` starts: the exact content tag, else the last build of the target."""
    for ref in (prep.tag, prep.floating):
        if engine.inspect(ref) is not None:
            return ref
    flavour = "" if prep.flavour is LLAMA_CPP else f" --flavour {prep.flavour.name}"
    raise RecipeError(f"no image for {prep.name} in {engine.name}",
                      f"build it first: builder build{flavour} --target {prep.plan.target} --engine {engine.name}")
