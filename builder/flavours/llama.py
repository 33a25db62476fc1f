"""The llama.cpp flavour: recipes/<target>.yaml -> BuildPlan -> context (images/Containerfile.j2) -> image.

The source is resolved before planning (its identity and date are part of the plan). The fetch stage puts
the tree, the SDKs and vendor apt files (each checked against its pin on the way into the cache) into the
context as hard links, so re-staging is cheap and mtimes survive; the build talks to builder's compiler
cache on 127.0.0.1.
"""

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from builder.core.errors import RecipeError
from builder.core.paths import cache_subdir
from builder.fetch.ccache import CcacheStore
from builder.fetch.provenance import llama_commit, rpc_protocol
from builder.fetch.sdk import SDK_DIR, missing_ship_patterns, unpacked
from builder.fetch.source import SourceTree, fetch_file, iter_tree, resolve, resolve_override
from builder.flavours import lock as lockfile
from builder.pipeline.flavour import BuildArgs, Flavour, Plan, Prepared
from builder.plan.bases import LockedBases
from builder.plan.make import make_plan
from builder.publish.sbom import make_sbom
from builder.recipe.load import RECIPES_DIR, display_path, load_recipe, recipe_path_for
from builder.recipe.models import BaseSpec, BuildPlan, ImageBase, Recipe, refuse_placeholders
from builder.render.context import APT_DIR, SOURCE_DIR, fingerprint, render_files, write_if_changed


def plan_of(prep: Prepared) -> BuildPlan:
    assert isinstance(prep.plan, BuildPlan), "a llama.cpp image"
    return prep.plan


@contextmanager
def _compiler_cache() -> Iterator[BuildArgs]:
    with CcacheStore(cache_subdir("ccache")) as store:
        yield BuildArgs({}, store.build_args())


class LlamaCpp(Flavour):
    name = "llama.cpp"
    tag_prefix = ""
    serves = "llama"
    roles = ("rpc-worker", "rpc-seed", "server", "bench", "shell", "smoke", "check-device", "qualify", "help")
    recipe_model = Recipe

    def recipe_path(self, target: str) -> Path:
        return recipe_path_for(target)

    def plan(self, path: Path, variant: str | None, source_override: str | None, locked: LockedBases,
             epoch: int | None) -> tuple[BuildPlan, SourceTree]:
        recipe = load_recipe(path)
        assert recipe.llama_cpp is not None
        tree = resolve_override(source_override) if source_override else resolve(recipe.llama_cpp.source)
        plan = make_plan(recipe, display_path(path), tree.info, variant=variant, source_date_epoch=epoch,
                         locked=locked, provenance={"commit": llama_commit(tree.info, tree.path),
                                                    "rpc_protocol": rpc_protocol(tree.path)})
        return plan, tree

    def render(self, plan: Plan) -> tuple[dict[str, bytes], str]:
        assert isinstance(plan, BuildPlan)
        files = render_files(plan)
        return files, fingerprint(plan, files)

    def summary(self, prep: Prepared) -> dict[str, str]:
        plan = plan_of(prep)
        return {"toolchain": plan.toolchain_ref, "runtime": plan.runtime_ref,
                "llama.cpp": f"{plan.source.locator} ({plan.source.identity})",
                "cmake": " ".join(f"-D{k}={v}" for k, v in plan.cmake.items()), "binaries": " ".join(plan.binaries)}

    def check(self, prep: Prepared, lock: Path, *, strict: bool) -> None:
        plan = plan_of(prep)
        refuse_placeholders(plan.recipe, plan.target, plan.variant, plan.toolchain, plan.runtime, plan.sdks)
        # The lock pins the shipped recipes; a recipe file of your own or a local llama.cpp tree is development.
        shipped = prep.source_override is None and prep.recipe_path.resolve().parent == RECIPES_DIR.resolve()
        if strict or shipped:
            lockfile.require(load_recipe(prep.recipe_path), plan.variant, strict=strict, path=lock)

    def bases(self, prep: Prepared) -> list[BaseSpec]:
        return [plan_of(prep).toolchain, plan_of(prep).runtime]

    def fetch(self, prep: Prepared, context: Path) -> AbstractContextManager[BuildArgs]:
        plan = plan_of(prep)
        assert prep.tree is not None
        stage_source(prep.tree.path, context)
        stage_sdks(plan, context)
        stage_apt_files(plan, context)
        return _compiler_cache()

    def prefetch(self, prep: Prepared) -> None:
        """The SDK wheels (unpacked once) and vendor .debs and keys, into the cache; the source came with plan."""
        plan = plan_of(prep)
        for spec in plan.sdks.values():
            unpacked(spec)
        for base in (plan.toolchain, plan.runtime):
            for repo in base.repositories if isinstance(base, ImageBase) else []:
                fetch_file(repo.key_url, repo.key_sha256)
            for deb in base.debs if isinstance(base, ImageBase) else []:
                fetch_file(deb.url, deb.sha256)

    def sbom(self, prep: Prepared, image: str, digest: str, contents: Any) -> dict[str, Any]:
        return make_sbom(plan_of(prep), image, digest, contents)


LLAMA_CPP = LlamaCpp()


def stage_source(tree: Path, out: Path) -> None:
    """Mirror the llama.cpp tree (minus pruned folders) into out/llama.cpp with hard links."""
    _mirror(tree, out / SOURCE_DIR, set(iter_tree(tree)), iter_tree)


def _all_files(root: Path) -> list[Path]:
    return [p.relative_to(root) for p in root.rglob("*") if p.is_file() or p.is_symlink()]


def stage_sdks(plan: BuildPlan, out: Path) -> None:
    """Unpack (once, into the cache) every SDK of the plan and mirror it into out/sdk/<name>."""
    for name, spec in plan.sdks.items():
        tree = unpacked(spec)
        missing = missing_ship_patterns(spec, tree)
        if missing:
            raise RecipeError(f"{plan.recipe}: sdks.{name}.ship: {', '.join(missing)} match nothing in {spec.file}",
                              "list the files the runtime needs as they are named inside the wheel")
        _mirror(tree, out / SDK_DIR / name, set(_all_files(tree)), _all_files)
    if (out / SDK_DIR).is_dir():
        for stale in (out / SDK_DIR).iterdir():
            if stale.name not in plan.sdks:
                shutil.rmtree(stale)


def stage_apt_files(plan: BuildPlan, out: Path) -> None:
    """Fetch (once, checked by sha256) vendor repository keys and .deb files into apt/<stage>/."""
    for stage, base in (("toolchain", plan.toolchain), ("runtime", plan.runtime)):
        for repo in base.repositories if isinstance(base, ImageBase) else []:
            key = fetch_file(repo.key_url, repo.key_sha256)
            write_if_changed(out / APT_DIR / stage / "keyrings" / f"{repo.name}.asc", key.read_bytes(), 0o644)
        for deb in base.debs if isinstance(base, ImageBase) else []:
            name = unquote(deb.url.rsplit("/", 1)[-1])
            data = fetch_file(deb.url, deb.sha256).read_bytes()
            write_if_changed(out / APT_DIR / stage / "debs" / name, data, 0o644)


def _mirror(tree: Path, dest: Path, wanted: set[Path], listing: Callable[[Path], list[Path]]) -> None:
    """Make dest hold exactly `wanted` (paths relative to tree), hard-linked where possible."""
    for rel in wanted:
        src, dst = tree / rel, dest / rel
        if dst.exists() and os.path.samefile(src, dst):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    if dest.is_dir():
        for rel in set(listing(dest)) - wanted:
            (dest / rel).unlink()
