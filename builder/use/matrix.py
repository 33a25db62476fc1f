"""`builder matrix`: the images CI builds, and apart from them the render-only ones it can only render.

An image enters the build matrix only when every input is pinned, so that `builder build` accepts it: a
llama.cpp variant with no placeholder pin (all zeros) and a vLLM variant with its wheel lock. The others wait
for someone who can reach their vendor's registry or index (`builder pin`, `builder lock --flavour vllm`);
CI renders them in a static-check job, so they stay valid without failing every run.
"""

from pathlib import Path

from builder.flavours.lock import built_images
from builder.flavours.vllm import load_vllm_recipe, lock_path
from builder.recipe.load import RECIPES_DIR, display_path
from builder.recipe.models import VLLM_BASE_FIELDS, placeholders_of

Job = dict[str, str]


def jobs(recipes_dir: Path = RECIPES_DIR) -> tuple[list[Job], list[Job]]:
    """(images with every input pinned, render-only images with `why` they cannot be built)."""
    build: list[Job] = []
    render_only: list[Job] = []
    for path, recipe, variant in built_images(recipes_dir):
        section = recipe.variants[variant]
        job = {"flavour": "llama.cpp", "target": recipe.target, "variant": variant}
        pins = placeholders_of(f"variants.{variant}", section.base.toolchain, section.base.runtime, section.sdks)
        if pins:
            render_only.append({**job, "why": f"{display_path(path)}: {pins[0].field}: placeholder pin"})
        else:
            build.append(job)
    for path in sorted((recipes_dir / "vllm").glob("*.yaml")):
        vrecipe = load_vllm_recipe(path)
        for variant, vsection in vrecipe.variants.items():
            job = {"flavour": "vllm", "target": vrecipe.target, "variant": variant}
            pins = placeholders_of(f"variants.{variant}", vsection.toolchain, vsection.base, {}, VLLM_BASE_FIELDS)
            lock = lock_path(path, variant, vsection)
            if pins:
                render_only.append({**job, "why": f"{display_path(path)}: {pins[0].field}: placeholder pin"})
            elif not lock.is_file():
                render_only.append({**job, "why": f"{display_path(lock)}: no wheel lock"})
            else:
                build.append(job)
    return build, render_only


def matrix(recipes_dir: Path = RECIPES_DIR, flavour: str | None = None) -> dict[str, list[Job]]:
    """`include`: GitHub's matrix of the images to build; `render_only`: the others, for a static-check job;
    only `flavour`'s images when one is given."""
    build, render_only = jobs(recipes_dir)
    if flavour is not None:
        build, render_only = ([j for j in group if j["flavour"] == flavour] for group in (build, render_only))
    return {"include": build, "render_only": render_only}
