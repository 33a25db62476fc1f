"""The build stages every image goes through, whatever its flavour, from a prepared (planned, rendered) image.

[policy] -> fetch inputs -> bases -> build -> smoke -> promote. `builder.flavours.prepare` makes the
`Prepared` (load, plan, render); a flavour (builder/flavours/) supplies what differs; publish, sbom,
pxe build, toolbox and run start from `prepare` and `build`.
"""

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from builder.core.errors import CommandError, raise_if_stopped
from builder.core.locks import locked
from builder.core.paths import cache_subdir
from builder.core.run import run
from builder.engines import Engine
from builder.engines.cleanup import forget_image, record_image
from builder.fetch.bootstrap import ensure_base, prefetch_base
from builder.pipeline.flavour import Prepared
from builder.plan.make import LABEL_PREFIX


@dataclass(frozen=True)
class BuildResult:
    ref: str
    digest: str
    size: int
    built: bool
    seconds: float
    log: Path | None


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


def prefetch(prep: Prepared) -> int:
    """Every network-bound input of one image into the cache (checked by sha256), nothing built: the locked
    .debs of its bootstrapped bases (unless their rootfs is cached), SDK wheels, vendor files, vLLM wheels.
    The llama.cpp source came with `prepare`. Returns how many base packages were checked."""
    prep.flavour.check(prep, prep.lock, strict=False)
    count = sum(prefetch_base(base, prep.locked) for base in prep.flavour.bases(prep))
    prep.flavour.prefetch(prep)
    return count
