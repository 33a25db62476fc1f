"""Load recipe YAML into a validated Recipe; every failure becomes one line naming the file and field."""

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from builder import PROJECT_ROOT
from builder.core.errors import RecipeError
from builder.recipe.models import LlamaCpp, Recipe
from builder.recipe.targets import TARGETS, Target, Variant, did_you_mean, known_targets, why_not

M = TypeVar("M", bound=BaseModel)
S = TypeVar("S")
RECIPES_DIR = PROJECT_ROOT / "recipes"
# The one llama.cpp pin every shipped recipe builds: nodes with different builds fail the RPC handshake.
SHARED_PIN = RECIPES_DIR / "llama-cpp.yaml"
# --recipes DIR / $BUILDER_RECIPES: the user's own recipes folder, for this run (set by the CLI).
_recipes_folder: list[Path] = []


def use_recipes(folder: Path | None) -> None:
    """Read recipes from `folder` (NAME.yaml, vllm/NAME.yaml, llama-cpp.yaml) instead of the shipped ones."""
    _recipes_folder[:] = [folder] if folder is not None else []


def recipes_dir() -> Path:
    """The recipes folder of this run: --recipes DIR, else the shipped recipes/."""
    return _recipes_folder[0] if _recipes_folder else RECIPES_DIR


def shared_pin() -> Path:
    """llama-cpp.yaml of the recipes folder of this run, else the shipped one."""
    own = recipes_dir() / SHARED_PIN.name
    return own if own.is_file() else SHARED_PIN

_FRIENDLY = {
    "extra_forbidden": "unknown key (see `{schema}` for the allowed keys)",
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
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            out += " (key)"  # pydantic's marker: the key of a mapping is wrong, not its value
        elif not re.fullmatch(r"[A-Za-z0-9_.:/@+-]{1,80}", part):
            out += f"[{part[:40]!r}]"  # a key from the file: shown quoted, so it cannot break the line
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def format_validation_error(where: str, err: ValidationError, schema: str = "builder schema") -> str:
    """One line; `schema`: the command that prints the file's schema (recipes, vLLM recipes, cluster files)."""
    errors = err.errors()
    first = errors[0]
    message = _FRIENDLY.get(first["type"], first["msg"]).replace("{schema}", schema)
    if first["type"] == "union_tag_invalid":
        message = f"unknown kind {first['ctx']['tag']!r}, expected one of {first['ctx']['expected_tags']}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {_field_path(tuple(first['loc']))}: {message}{more}"


def recipe_path_for(target: str, folder: Path | None = None, kind: str = "") -> Path:
    """FOLDER (default recipes/)/<target>.yaml; `kind` names the flavour's recipes in messages ("vLLM ")."""
    folder = folder or recipes_dir()
    if target not in TARGETS:
        raise RecipeError(f"unknown target {target!r}{did_you_mean(target, TARGETS)}",
                          f"known targets: {known_targets()}")
    path = folder / f"{target}.yaml"
    if not path.is_file():
        with_recipes = sorted(t for t in TARGETS if (folder / f"{t}.yaml").is_file())
        raise RecipeError(f"target {target!r} has no {kind}recipe yet: {display_path(path)} is missing",
                          f"targets with {kind}recipes: {', '.join(with_recipes)}")
    return path


def load_yaml(path: Path, what: str = "recipe", hint: str = "pass --target NAME or an existing --recipe PATH"
              ) -> dict[str, Any]:
    """A YAML mapping from `path`; any problem is one RecipeError line naming the file (and line)."""
    where = display_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{where}: {what} file not found", hint) from None
    except UnicodeDecodeError:
        raise RecipeError(f"{where}: not a text file (invalid UTF-8)") from None
    except OSError as exc:
        raise RecipeError(f"{where}: cannot read: {exc.strerror}") from None
    try:
        data: Any = yaml.safe_load(text)
    except RecursionError:
        raise RecipeError(f"{where}: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RecipeError(f"{where}:{line}: {problem}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: (top level): expected a mapping of keys, got {type(data).__name__}")
    if what == "cluster" and "nodes" not in data and {"target", "variants"} <= data.keys():
        raise RecipeError(f"{where}: this is a recipe (target:, variants:), not a cluster file",
                          "a cluster file has nodes: (docs/clusters.md); a recipe goes to --recipe or --recipes")
    if what == "recipe" and "nodes" in data and "target" not in data:
        raise RecipeError(f"{where}: this is a cluster file (nodes:), not a recipe",
                          "give it to `builder cluster …` or `builder pxe publish`; a recipe has target: and variants:")
    return data


def validated(model: type[M], path: Path, data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        schema = str(getattr(model, "SCHEMA_COMMAND", "builder schema"))
        raise RecipeError(format_validation_error(display_path(path), exc, schema)) from None


def load_recipe(path: Path, pin: Path | None = None) -> Recipe:
    """A validated recipe; without its own llama_cpp block it gets the shared pin."""
    recipe = validated(Recipe, path, load_yaml(path))
    where = display_path(path)
    select(recipe.target, None, where)
    for name in recipe.variants:
        entry = TARGETS[recipe.target]
        if name not in entry.variants:
            raise RecipeError(f"{where}: variants.{name}: {entry.name} has no variant {name!r}", why_not(entry, name))
    if recipe.llama_cpp is None:
        pin = pin or shared_pin()
        recipe = recipe.model_copy(update={"llama_cpp": validated(LlamaCpp, pin, load_yaml(pin))})
    return recipe


def choose_variant(target: str, sections: Mapping[str, S], variant: str | None, where: str
                   ) -> tuple[Target, Variant, S]:
    """The variant to build: --variant, else the target's default; it must be in the table and the recipe."""
    entry, chosen = select(target, variant, where, variant_from_cli=variant is not None)
    if chosen.name not in sections:
        raise RecipeError(f"{where}: variants: no {chosen.name!r} section in this recipe yet",
                          f"this recipe builds: {', '.join(sections)} (pass --variant)")
    return entry, chosen, sections[chosen.name]


def select(target: str, variant: str | None, where: str = "", variant_from_cli: bool = False) -> tuple[Target, Variant]:
    """The table entries for a target and variant; unknown names list the valid ones."""
    prefix = f"{where}: " if where else ""
    if target not in TARGETS:
        raise RecipeError(f"{prefix}target: unknown target {target!r}{did_you_mean(target, TARGETS)}",
                          f"known targets: {known_targets()}")
    entry = TARGETS[target]
    name = variant or entry.default_variant
    if name not in entry.variants:
        field = "--variant" if variant_from_cli else f"{prefix}variant"
        raise RecipeError(f"{field}: {target} has no variant {name!r}{did_you_mean(name, entry.variants)}",
                          why_not(entry, name))
    return entry, entry.variants[name]


def builds_rpc_rdma(target: str, variant: str) -> bool:
    """Whether the recipes folder of this run builds the llama.cpp image of target/variant with `rpc_rdma`."""
    section = load_recipe(recipe_path_for(target), shared_pin()).variants.get(variant)
    return section is not None and section.rpc_rdma

