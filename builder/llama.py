"""The llama.cpp flavour: recipes/<target>.yaml -> BuildPlan -> context (images/Containerfile.j2) -> image.

The source is resolved before planning (its identity and date are part of the plan); the tree, the SDKs
and vendor apt files enter the context in the fetch stage, and the build talks to builder's compiler
cache on 127.0.0.1.
"""

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from builder import lock as lockfile
from builder.bootstrap import LockedBases
from builder.ccache_store import CcacheStore
from builder.errors import RecipeError
from builder.fetch import stage_apt_files, stage_sdks, stage_source
from builder.flavour import BuildArgs, Flavour, Plan, Prepared
from builder.models import BaseSpec, BuildPlan, Recipe, placeholders_of
from builder.paths import cache_subdir
from builder.plan import make_plan
from builder.recipes import RECIPES_DIR, display_path, load_recipe, recipe_path_for
from builder.render import fingerprint, render_files
from builder.sbom import make_sbom
from builder.source import SourceTree, resolve, resolve_override


def plan_of(prep: Prepared) -> BuildPlan:
    assert isinstance(prep.plan, BuildPlan), "a llama.cpp image"
    return prep.plan


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


@contextmanager
def _compiler_cache() -> Iterator[BuildArgs]:
    with CcacheStore(cache_subdir("ccache")) as store:
        yield BuildArgs({}, store.build_args())


class LlamaCpp(Flavour):
    name = "llama.cpp"
    tag_prefix = ""
    serves = "llama"
    roles = ("rpc-worker", "server", "bench", "shell", "smoke", "help")
    recipe_model = Recipe

    def recipe_path(self, target: str) -> Path:
        return recipe_path_for(target)

    def recipe_target(self, path: Path) -> str:
        return load_recipe(path).target

    def built_variants(self, recipes_dir: Path) -> list[tuple[str, str]]:
        return [(recipe.target, variant) for _, recipe, variant in lockfile.built_images(recipes_dir)]

    def plan(self, path: Path, variant: str | None, source_override: str | None, locked: LockedBases,
             epoch: int | None) -> tuple[BuildPlan, SourceTree]:
        recipe = load_recipe(path)
        assert recipe.llama_cpp is not None
        tree = resolve_override(source_override) if source_override else resolve(recipe.llama_cpp.source)
        plan = make_plan(recipe, display_path(path), tree.info, variant=variant, source_date_epoch=epoch,
                         locked=locked)
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
        refuse_placeholders(plan)
        # The lock pins the shipped recipes; a recipe file of your own or a local llama.cpp tree is development.
        shipped = prep.source_override is None and prep.recipe_path.resolve().parent == RECIPES_DIR.resolve()
        if strict or shipped:
            lockfile.require(load_recipe(prep.recipe_path), plan.variant, strict=strict, path=lock)

    def bases(self, prep: Prepared) -> list[BaseSpec]:
        plan = plan_of(prep)
        return [plan.toolchain, plan.runtime]

    def fetch(self, prep: Prepared, context: Path) -> AbstractContextManager[BuildArgs]:
        plan = plan_of(prep)
        assert prep.tree is not None
        stage_source(prep.tree.path, context)
        stage_sdks(plan, context)
        stage_apt_files(plan, context)
        return _compiler_cache()

    def version(self, prep: Prepared) -> str:
        return plan_of(prep).source.version

    def sbom(self, prep: Prepared, image: str, digest: str, contents: Any) -> dict[str, Any]:
        return make_sbom(plan_of(prep), image, digest, contents)


LLAMA_CPP = LlamaCpp()
