"""What every `builder` verb shares: one error line, global options anywhere, deprecated spellings, path checks.

`BuilderGroup` is the app's command class, so `typer.testing.CliRunner` runs the app exactly as `main()` does:
a BuilderError or a usage mistake becomes `error: …` (and an optional `hint: …`) on stderr and its exit code.
"""

import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from builder.core.errors import BuilderError, CommandError, RecipeError
from builder.recipe.load import use_recipes

# Spellings that still work but print one line saying so; they go at this version.
REMOVED_AT = "0.3.0"
# The app's own options (its callback's): accepted before or after the verb.
GLOBAL_OPTIONS = ("--debug", "--version")

err = Console(stderr=True, highlight=False, soft_wrap=True)
# click's base of usage errors, from whichever click typer brings (newer typer vendors its own)
_ClickException: type[Exception] = typer.BadParameter.__mro__[2]


class State:
    debug = False


def report(exc: BuilderError) -> None:
    """The one line (and the hint) a BuilderError prints."""
    err.print(f"error: {exc.message}", markup=False)
    if isinstance(exc, CommandError) and exc.tail:
        err.print("last lines of output:", markup=False)
        for line in exc.tail.splitlines():
            err.print(f"  | {line}", markup=False)
    if exc.hint:
        err.print(f"hint: {exc.hint}", markup=False)


def deprecated(old: str, new: str) -> None:
    """One line for a spelling kept for a while."""
    err.print(f"warning: {old} is deprecated and will be removed in {REMOVED_AT}; use {new}", markup=False)


def _usage_hint(exc: Exception) -> str:
    ctx = getattr(exc, "ctx", None)
    path = ctx.command_path if ctx is not None else "builder"
    message = str(getattr(exc, "message", "")) or ""
    if ctx is not None and ctx.parent is None and "No such option" in message:
        return ("a verb's options go after the verb (builder VERB --option); only "
                f"{' and '.join(GLOBAL_OPTIONS)} go anywhere")
    return f"`{path} --help` lists what it takes"


def _takes_value(command: Any, token: str) -> bool:
    for param in getattr(command, "params", []):
        if token in getattr(param, "opts", ()) and not getattr(param, "is_flag", False) \
                and not getattr(param, "count", False):
            return True
    return False


def _interspersed(command: Any) -> bool:
    settings = getattr(command, "context_settings", None) or {}
    return bool(settings.get("allow_interspersed_args", getattr(command, "allow_interspersed_args", True)))


def hoist_globals(group: Any, args: Sequence[str]) -> list[str]:
    """Move the app's own options given after a verb to the front, where click looks for them.

    Nothing after `--`, and nothing after the first argument of a verb that passes the rest on (`run ROLE …`),
    is touched: those words belong to the role or the command.
    """
    front: list[str] = []
    rest: list[str] = []
    command, at_group, i = group, True, 0  # at_group: the next word may name a verb
    while i < len(args):
        token = args[i]
        if token == "--":
            rest.extend(args[i:])
            break
        if token in GLOBAL_OPTIONS and command is not group:
            front.append(token)
        elif token.startswith("-") and token != "-":
            rest.append(token)
            if "=" not in token and _takes_value(command, token) and i + 1 < len(args):
                rest.append(args[i + 1])
                i += 1
        else:
            rest.append(token)
            sub = command.commands.get(token) if at_group and hasattr(command, "commands") else None
            if sub is not None:
                command, at_group = sub, hasattr(sub, "commands")
            elif not _interspersed(command):
                rest.extend(args[i + 1:])
                break
        i += 1
    return front + rest


class BuilderGroup(TyperGroup):
    """The `builder` group: errors as one line and an exit code, global options accepted after the verb."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, windows_expand_args: bool = True, **extra: Any) -> Any:
        words = hoist_globals(self, list(sys.argv[1:] if args is None else args))
        State.debug = False  # the callback sets it; an in-process caller may run the app many times
        use_recipes(None)  # so does --recipes, on the verbs that read recipes
        try:
            code = super().main(words, "builder", complete_var, standalone_mode=False, **extra)
        except BuilderError as exc:
            if State.debug:
                traceback.print_exc()
            report(exc)
            sys.exit(exc.exit_code)
        except _ClickException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # the help was printed
                sys.exit(getattr(exc, "exit_code", 2))
            err.print(f"error: {getattr(exc, 'format_message', exc.__str__)()}", markup=False)
            err.print(f"hint: {_usage_hint(exc)}", markup=False)
            sys.exit(2)
        except typer.Abort:
            err.print("aborted", markup=False)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def cluster_file(given: Path | None, old: Path | None, verb: str) -> Path:
    """The cluster file: the FILE argument, or the deprecated --inventory FILE."""
    if old is not None:
        if given is not None:
            raise RecipeError(f"{verb}: the cluster file is given twice (FILE and --inventory)", f"{verb} FILE")
        deprecated("--inventory FILE", f"`{verb} FILE`")
        return old
    if given is None:
        raise RecipeError(f"{verb}: no cluster file given", f"{verb} cluster.yaml")
    return given


def check_output(path: Path, what: str, folder: bool) -> None:
    """Refuse an output path that cannot be written, before any work: one line, exit 2."""
    if path.exists():
        if folder and not path.is_dir():
            raise RecipeError(f"{what} {path}: is a file, not a folder", "give a folder (it is created if missing)")
        if not folder and path.is_dir():
            raise RecipeError(f"{what} {path}: is a folder, not a file", "give a file name")
        return
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise RecipeError(f"{what} {path}: {parent} is a file, so nothing can be written under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RecipeError(f"{what} {path}: {parent} is not writable")


def check_input(path: Path, what: str, folder: bool | None = None) -> None:
    """An input path that is not there (or not the kind wanted): one line, exit 2."""
    if not path.exists():
        raise RecipeError(f"{what} {path}: no such {'folder' if folder else 'file'}")
    if folder is True and not path.is_dir():
        raise RecipeError(f"{what} {path}: is a file, not a folder")
    if folder is False and path.is_dir():
        raise RecipeError(f"{what} {path}: is a folder, not a file")
