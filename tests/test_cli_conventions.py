"""One way to say each thing on the command line: the cluster file, short options, global options, --json."""

from pathlib import Path
from typing import Any

import yaml
from typer.main import get_command
from typer.testing import CliRunner

from builder.cli.conventions import GLOBAL_OPTIONS, REMOVED_AT, hoist_globals
from builder.cli.main import app
from conftest import run_cli

MAC = "52:54:00:12:34:56"


def invoke(*args: str) -> Any:
    """The app in this process, through the same command class main() runs (errors as lines, exit codes)."""
    return CliRunner().invoke(app, list(args))


def leaves(command: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every verb of the app, as (words, click command): new verbs are found without naming them here."""
    subs = getattr(command, "commands", None)
    if subs is None:
        return [(path, command)]
    return [leaf for name, sub in sorted(subs.items()) for leaf in leaves(sub, (*path, name))]


def cluster_yaml(folder: Path) -> Path:
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump({"control": {"address": "10.0.2.2"},
                                    "nodes": [{"name": "n1", "mac": MAC, "target": "cpu", "role": "rpc-worker"}]}))
    return path


def test_short_options_mean_one_thing_on_every_verb() -> None:
    meaning: dict[str, set[str]] = {}
    for _words, command in leaves(get_command(app)):
        for param in command.params:
            shorts = [o for o in param.opts if len(o) == 2 and not param.hidden]
            longs = [o for o in param.opts if o.startswith("--")]
            for short in shorts:
                meaning.setdefault(short, set()).update(longs)
    clashes = {short: longs for short, longs in meaning.items() if len(longs) > 1}
    assert not clashes, clashes


def test_cluster_file_is_the_first_argument_on_every_verb_that_reads_one() -> None:
    for words, command in leaves(get_command(app)):
        names = {p.name for p in command.params}
        if {"inventory", "file"} & names:
            first = next(p for p in command.params if p.param_type_name == "argument")
            assert first.name in ("inventory", "file") and first.metavar == "FILE", words


def test_pxe_publish_takes_the_file_as_argument_and_the_old_option_with_one_line(tmp_path: Path) -> None:
    path = cluster_yaml(tmp_path)
    new = invoke("pxe", "publish", str(path), "--root", str(tmp_path / "root"), "--artifacts", str(tmp_path / "no"))
    old = invoke("pxe", "publish", "--inventory", str(path), "--root", str(tmp_path / "root"),
                 "--artifacts", str(tmp_path / "no"))
    assert new.exit_code == old.exit_code == 2  # no pulled sets there: refused the same way
    assert not new.stderr.startswith("warning:")
    warning = old.stderr.splitlines()[0]
    assert warning.startswith("warning: --inventory") and REMOVED_AT in warning
    assert old.stderr.splitlines()[1:] == new.stderr.splitlines()
    both = invoke("pxe", "publish", str(path), "--inventory", str(path))
    assert both.exit_code == 2 and "given twice" in both.stderr


def test_global_options_work_after_the_verb() -> None:
    assert invoke("pxe", "list", "--version").stdout.startswith("builder ")
    debugged = invoke("plan", "--recipe", "/nonexistent/r.yaml", "--debug")
    assert debugged.exit_code == 2 and "Traceback" in debugged.stderr
    assert debugged.stderr.splitlines()[-2].startswith("error: ")
    plain = invoke("plan", "--recipe", "/nonexistent/r.yaml")
    assert "Traceback" not in plain.stderr


def test_words_after_run_role_and_double_dash_are_left_alone() -> None:
    group = get_command(app)
    assert hoist_globals(group, ["run", "--target", "cpu", "server", "--debug"]) == \
        ["run", "--target", "cpu", "server", "--debug"]
    assert hoist_globals(group, ["run", "--debug", "--target", "cpu", "server"]) == \
        ["--debug", "run", "--target", "cpu", "server"]
    assert hoist_globals(group, ["toolbox", "enter", "--target", "cpu", "--", "x", "--version"]) == \
        ["toolbox", "enter", "--target", "cpu", "--", "x", "--version"]
    assert hoist_globals(group, ["cluster", "logs", "f.yaml", "--debug", "-n", "5"]) == \
        ["--debug", "cluster", "logs", "f.yaml", "-n", "5"]


def test_an_option_before_the_verb_is_explained_in_one_line() -> None:
    result = invoke("--target", "cpu", "plan")
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert lines[0] == "error: No such option: --target" and "after the verb" in lines[1] and len(lines) == 2
    for word in GLOBAL_OPTIONS:
        assert word in lines[1]


def test_usage_mistakes_are_one_line_as_a_process_too() -> None:
    proc = run_cli("plan", "--no-such-option")
    assert proc.returncode == 2 and proc.stderr.splitlines()[0].startswith("error: "), proc.stderr
    assert len(proc.stderr.splitlines()) == 2 and "Traceback" not in proc.stderr
    proc = run_cli("cluster", "status", "--version")
    assert proc.returncode == 0 and proc.stdout.startswith("builder "), proc.stderr


def test_pxe_push_dir_short_option_is_deprecated(tmp_path: Path) -> None:
    result = invoke("pxe", "push", "-d", str(tmp_path / "missing"), "--registry", "127.0.0.1:9/x")
    lines = result.stderr.splitlines()
    assert result.exit_code == 2 and lines[0].startswith("warning: -d DIR") and lines[1].startswith("error: --dir")
