"""Orchestrates one image: resolve the recipe and source, render, build, smoke-test, tag."""

import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from builder import lock as lockfile
from builder.bootstrap import LockedBases, ensure_base
from builder.ccache_store import CcacheStore
from builder.cleanup import forget_image, record_image
from builder.engines import Engine
from builder.errors import CommandError, RecipeError, raise_if_stopped
from builder.locks import locked
from builder.models import BuildPlan, placeholders_of
from builder.paths import cache_subdir
from builder.plan import LABEL_PREFIX, make_plan
from builder.recipes import display_path, load_recipe, recipe_path_for
from builder.render import (
    fingerprint,
    floating_tag,
    image_tag,
    render_files,
    stage_apt_files,
    stage_sdks,
    stage_source,
    write_context,
)
from builder.run import run
from builder.source import SourceTree, resolve, resolve_override


@dataclass(frozen=True)
class Prepared:
    """A plan with its rendered files and fingerprint, and the source tree it needs."""

    plan: BuildPlan
    tree: SourceTree
    files: dict[str, bytes]
    fingerprint: str
    locked: LockedBases  # builder.lock's package sets of bootstrapped bases

    @property
    def tag(self) -> str:
        return image_tag(self.plan, self.fingerprint)


@dataclass(frozen=True)
class BuildResult:
    ref: str
    digest: str
    size: int
    built: bool
    seconds: float
    log: Path | None


def recipe_file(target: str | None, recipe: Path | None) -> Path:
    if recipe is not None:
        return recipe
    if target:
        return recipe_path_for(target)
    raise RecipeError("no recipe chosen", "pass --target NAME (see `builder targets`) or --recipe PATH")


def _source_date_epoch() -> int | None:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None:
        return None
    if not value.isdigit():
        raise RecipeError(f"SOURCE_DATE_EPOCH={value!r} is not a number of seconds")
    return int(value)


def prepare(path: Path, variant: str | None = None, source_override: str | None = None,
            lock: Path = lockfile.LOCK_FILE) -> Prepared:
    recipe = load_recipe(path)
    assert recipe.llama_cpp is not None
    locked = lockfile.locked_bases(lock)
    tree = resolve_override(source_override) if source_override else resolve(recipe.llama_cpp.source)
    plan = make_plan(recipe, display_path(path), tree.info, variant=variant,
                     source_date_epoch=_source_date_epoch(), locked=locked)
    files = render_files(plan)
    return Prepared(plan, tree, files, fingerprint(plan, files), locked)


def context_dir(plan: BuildPlan) -> Path:
    return cache_subdir("contexts") / f"{plan.target}-{plan.variant}"


def placeholder_pins(plan: BuildPlan) -> list[str]:
    """Recipe fields that still hold the all-zeros placeholder instead of a checked digest or sha256."""
    return [p.field for p in placeholders_of(f"variants.{plan.variant}", plan.toolchain, plan.runtime, plan.sdks)]


def refuse_placeholders(plan: BuildPlan) -> None:
    found = placeholder_pins(plan)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise RecipeError(f"{plan.recipe}: {found[0]}{more}: placeholder pin (all zeros), never checked; "
                          "refusing to build",
                          f"where the registry and vendor sites are reachable, `builder pin --target {plan.target}` "
                          "reads the real values into the recipe (then run `builder lock`)")


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


def build(prep: Prepared, engine: Engine, *, no_cache: bool = False, ccache: bool = True) -> BuildResult:
    """Build the image unless one with the same content tag exists; smoke-test it; tag it."""
    # One build per context folder at a time: a second one would rewrite and prune files under the first.
    context = context_dir(prep.plan)
    with locked(context.with_name(f"{context.name}.lock"), f"building {prep.plan.target}/{prep.plan.variant}"):
        return _build(prep, engine, no_cache=no_cache, ccache=ccache)


def _build(prep: Prepared, engine: Engine, *, no_cache: bool, ccache: bool) -> BuildResult:
    started = time.monotonic()
    plan, tag = prep.plan, prep.tag
    existing = None if no_cache else engine.inspect(tag)
    if existing is not None:
        engine.tag(tag, floating_tag(plan))
        return BuildResult(tag, existing.id, existing.size, False, time.monotonic() - started, None)

    refuse_placeholders(plan)
    # The context first: a bad SDK pin or an unreachable vendor repository fails here, before minutes of
    # bootstrapping or pulling.
    context = context_dir(plan)
    write_context(context, plan, prep.files, prep.fingerprint)
    stage_source(prep.tree.path, context)
    stage_sdks(plan, context)
    stage_apt_files(plan, context)
    ensure_base(engine, plan.toolchain, prep.locked)
    ensure_base(engine, plan.runtime, prep.locked)
    log = cache_subdir("logs") / f"{plan.target}-{plan.variant}-{engine.name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    labels = {f"{LABEL_PREFIX}.fingerprint": prep.fingerprint}

    def build_into(ref: str) -> None:
        if ccache:
            with CcacheStore(cache_subdir("ccache")) as store:
                engine.build(context, ref, build_args={}, env_args=store.build_args(), labels=labels, log=log,
                             no_cache=no_cache)
        else:
            engine.build(context, ref, build_args={}, labels=labels, log=log, no_cache=no_cache)

    build_and_promote(engine, tag, floating_tag(plan), build_into, log)
    info = engine.inspect(tag)
    assert info is not None
    return BuildResult(tag, info.id, info.size, True, time.monotonic() - started, log)


def image_for_run(engine: Engine, prep: Prepared) -> str:
    """The image `builder run` starts: the exact content tag, else the last build of the target."""
    for ref in (prep.tag, floating_tag(prep.plan)):
        if engine.inspect(ref) is not None:
            return ref
    raise RecipeError(
        f"no image for {prep.plan.target}/{prep.plan.variant} in {engine.name}",
        f"build it first: builder build --target {prep.plan.target} --engine {engine.name}",
    )
