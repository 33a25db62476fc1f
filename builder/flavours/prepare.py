"""Choosing a flavour and its recipe, and preparing one image: load, plan and render (nothing is built)."""

import os
from pathlib import Path

from builder.core.errors import RecipeError
from builder.flavours import lock as lockfile
from builder.flavours.llama import LLAMA_CPP
from builder.flavours.vllm import VLLM
from builder.pipeline.flavour import Flavour, Prepared
from builder.recipe.targets import did_you_mean

FLAVOURS: dict[str, Flavour] = {f.name: f for f in (LLAMA_CPP, VLLM)}



def flavour_named(name: str) -> Flavour:
    if name not in FLAVOURS:
        raise RecipeError(f"--flavour: unknown flavour {name!r}{did_you_mean(name, FLAVOURS)}",
                          f"flavours: {', '.join(FLAVOURS)}")
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
