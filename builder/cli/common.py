"""Options and helpers the `builder` verbs share (cli/main.py, cli/run.py, cli/pxe.py)."""

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import typer

from builder.cli.conventions import check_input
from builder.engines import ENGINE_CHOICES
from builder.flavours import lock as lockfile
from builder.flavours.llama import LLAMA_CPP
from builder.flavours.prepare import FLAVOURS, flavour_named, prepare, recipe_file
from builder.pipeline.flavour import Prepared
from builder.recipe.load import use_recipes

TargetOpt = Annotated[str | None, typer.Option("--target", "-t", help="Target name: picks recipes/NAME.yaml.")]
RecipeOpt = Annotated[Path | None, typer.Option("--recipe", help="Any recipe file instead of --target.")]
VariantOpt = Annotated[str | None, typer.Option("--variant", help="Variant of the target (default: its first).")]
SourceOpt = Annotated[
    str | None,
    typer.Option("--llama-cpp-source", metavar="PATH_OR_ARCHIVE",
                 help="A local llama.cpp tree or tar archive instead of the recipe's pinned source."),
]
EngineOpt = Annotated[
    str, typer.Option("--engine", "-e", help=f"Container engine: {', '.join(ENGINE_CHOICES)}.")
]
JSON_ERRORS = "errors are not JSON: one `error:` line on stderr"
JSON_HELP = f"Print JSON on stdout instead of text ({JSON_ERRORS})."
JsonOpt = Annotated[bool, typer.Option("--json", help=JSON_HELP)]
LockOpt = Annotated[Path, typer.Option("--lock", help="The lock file (default: builder.lock of the project).")]
FlavourOpt = Annotated[
    str, typer.Option("--flavour", help=f"What the image serves with: {', '.join(FLAVOURS)} (recipes/vllm/).")
]
DEFAULT_FLAVOUR = LLAMA_CPP.name


def _use_recipes(folder: Path | None) -> Path | None:
    if folder is not None:
        check_input(folder, "--recipes", folder=True)
    use_recipes(folder)
    return folder


RecipesOpt = Annotated[Path | None, typer.Option(
    "--recipes", metavar="DIR", envvar="BUILDER_RECIPES", callback=_use_recipes, show_default=False,
    help="Your own recipes folder (NAME.yaml, vllm/NAME.yaml, llama-cpp.yaml) instead of the shipped recipes/.")]


def emit(as_json: bool, document: object, lines: Iterable[str]) -> None:
    """What a verb prints: with --json the document (indented), else the lines."""
    if as_json:
        typer.echo(json.dumps(document, indent=2))
        return
    for line in lines:
        typer.echo(line)


def prepared(flavour: str, target: str | None, recipe: Path | None, variant: str | None,
             source: str | None = None, lock: Path = lockfile.LOCK_FILE) -> Prepared:
    """The image that --flavour, --target/--recipe and --variant name, planned and rendered."""
    chosen = flavour_named(flavour)
    return prepare(recipe_file(target, recipe, chosen), variant, source, lock, chosen)
