"""Load recipe YAML into a validated Recipe; every failure becomes one line naming the file and field."""

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from builder import PROJECT_ROOT
from builder.errors import RecipeError
from builder.models import Recipe
from builder.targets import TARGETS, Target, Variant, known_targets, why_not

RECIPES_DIR = PROJECT_ROOT / "recipes"

_FRIENDLY = {
    "extra_forbidden": "unknown key (see `builder schema` for the allowed keys)",
    "missing": "required key is missing",
    "union_tag_not_found": "needs a 'kind' key",
}


def display_path(path: Path) -> str:
    """Relative to the working folder when inside it, else as given."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def _field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def format_validation_error(where: str, err: ValidationError) -> str:
    errors = err.errors()
    first = errors[0]
    message = _FRIENDLY.get(first["type"], first["msg"])
    if first["type"] == "union_tag_invalid":
        message = f"unknown kind {first['ctx']['tag']!r}, expected one of {first['ctx']['expected_tags']}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {_field_path(tuple(first['loc']))}: {message}{more}"


def recipe_path_for(target: str) -> Path:
    path = RECIPES_DIR / f"{target}.yaml"
    if path.is_file():
        return path
    if target in TARGETS:
        raise RecipeError(f"target {target!r} has no recipe yet: {display_path(path)} is missing",
                          f"targets with recipes: {', '.join(sorted(p.stem for p in RECIPES_DIR.glob('*.yaml')))}")
    raise RecipeError(f"unknown target {target!r}", f"known targets: {known_targets()}")


def load_recipe(path: Path) -> Recipe:
    where = display_path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        hint = "pass --target NAME or an existing --recipe PATH"
        raise RecipeError(f"{where}: recipe file not found", hint) from None
    except OSError as exc:
        raise RecipeError(f"{where}: cannot read: {exc.strerror}") from None
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RecipeError(f"{where}:{line}: {problem}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: (top level): expected a mapping of keys, got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(where, exc)) from None
    select(recipe.target, recipe.variant, where)
    return recipe


def select(target: str, variant: str | None, where: str = "", variant_from_cli: bool = False) -> tuple[Target, Variant]:
    """The table entries for a target and variant; unknown names list the valid ones."""
    prefix = f"{where}: " if where else ""
    if target not in TARGETS:
        raise RecipeError(f"{prefix}target: unknown target {target!r}", f"known targets: {known_targets()}")
    entry = TARGETS[target]
    name = variant or entry.default_variant
    if name not in entry.variants:
        field = "--variant" if variant_from_cli else f"{prefix}variant"
        raise RecipeError(f"{field}: {target} has no variant {name!r}", why_not(entry, name))
    return entry, entry.variants[name]
