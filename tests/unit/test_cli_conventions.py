"""One way to say each thing on the command line: the cluster file, short options, global options, --json."""

import json
from pathlib import Path
from typing import Any

import yaml
from test_doctor import make_host
from test_netboot import fake_artifacts
from typer.main import get_command
from typer.testing import CliRunner

from builder.cli.conventions import GLOBAL_OPTIONS, REMOVED_AT, hoist_globals
from builder.cli.main import IMAGES, OPERATE, app
from conftest import ROOT, run_cli

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


# Verbs whose output is already a document, a stream or a long-running server: no --json.
NO_JSON = {("schema",): "prints a JSON Schema", ("cluster", "schema"): "prints a JSON Schema",
           ("matrix",): "prints JSON", ("sbom",): "prints an SPDX JSON document",
           ("cluster", "logs"): "streams logs", ("cluster", "firewall"): "prints nftables rules",
           ("pxe", "serve"): "serves until stopped",
           ("cluster", "roll"): "reports each step as it goes and may ask you to reboot a node; its exit status is "
                                "the result"}


def test_every_verb_that_reports_something_has_json_and_says_errors_are_not_json() -> None:
    for words, command in leaves(get_command(app)):
        options = {o: p for p in command.params for o in p.opts}
        if words in NO_JSON:
            continue
        assert "--json" in options, f"builder {' '.join(words)} has no --json (or add it to NO_JSON with why)"
        assert "error:" in (options["--json"].help or ""), words


def test_run_print_json_is_the_argv_and_json_alone_is_refused() -> None:
    printed = invoke("run", "--print", "--json", "--image", "localhost/x:y", "--engine", "podman", "server", "-c", "8")
    assert printed.exit_code == 0, printed.stderr
    argv = json.loads(printed.stdout)
    assert argv[0] == "podman" and argv[-4:] == ["localhost/x:y", "server", "-c", "8"]
    alone = invoke("run", "--json", "--image", "localhost/x:y", "server")
    assert alone.exit_code == 2 and alone.stderr.startswith("error: --json goes with --print")


def test_doctor_json_lists_every_check(tmp_path: Path) -> None:
    root = make_host(tmp_path / "host")
    result = invoke("doctor", "--json", "--root", str(root))
    doc = json.loads(result.stdout)
    assert doc["target"] == "cpu" and doc["checks"] and {"name", "ok", "detail", "fix", "required"} <= set(
        doc["checks"][0])
    assert result.exit_code == (1 if doc["failing"] else 0)
    missing = invoke("doctor", "--json", "--root", str(tmp_path / "nope"))
    assert missing.exit_code == 2 and missing.stdout == "" and missing.stderr.startswith("error: --root")


def test_pxe_publish_list_and_rollback_report_as_json(tmp_path: Path) -> None:
    path = cluster_yaml(tmp_path)
    sets, root = tmp_path / "sets", tmp_path / "pxe-root"
    sets.mkdir()
    fake_artifacts(tmp_path, "one")[0].rename(sets / "cpu-cpu")
    published = invoke("pxe", "publish", str(path), "--root", str(root), "--artifacts", str(sets), "--json")
    assert published.exit_code == 0, published.stderr
    doc = json.loads(published.stdout)
    assert doc["published"] is True and doc["nodes"][0]["mac"] == MAC
    assert doc["nodes"][0]["boots"] == "rpc-worker rpc-workers"  # the converted file's workers-only service
    listing = json.loads(invoke("pxe", "list", "--root", str(root), "--json").stdout)
    assert [g["id"] for g in listing] == [doc["generation"]] and listing[0]["current"] is True
    refused = invoke("pxe", "rollback", "--root", str(root), "--json")
    assert refused.exit_code == 2 and refused.stdout == "" and refused.stderr.startswith("error: ")
    missing = invoke("pxe", "list", "--root", str(tmp_path / "nope"), "--json")
    assert missing.exit_code == 2 and missing.stderr.startswith("error: --root")


def test_every_verb_that_reads_recipes_takes_recipes_dir_and_its_variable() -> None:
    for words, command in leaves(get_command(app)):
        names = {p.name for p in command.params}
        if {"target", "recipe", "inventory", "file"} & names and words != ("doctor",):  # doctor reads the table
            recipes = next((p for p in command.params if p.name == "recipes"), None)
            assert recipes is not None, f"builder {' '.join(words)} reads recipes but has no --recipes"
            assert recipes.envvar == "BUILDER_RECIPES", words


def test_targets_reads_the_recipes_folder_given_or_from_the_environment(tmp_path: Path) -> None:
    own = tmp_path / "recipes"
    own.mkdir()
    (own / "cpu.yaml").write_text((ROOT / "recipes" / "cpu.yaml").read_text())
    by_option = json.loads(invoke("targets", "--json", "--recipes", str(own)).stdout)
    assert {(e["target"], e["variant"]) for e in by_option if e["llama_cpp"]} == {("cpu", "cpu")}
    by_variable = CliRunner().invoke(app, ["targets", "--json"], env={"BUILDER_RECIPES": str(own)})
    assert json.loads(by_variable.stdout) == by_option
    shipped = json.loads(invoke("targets", "--json").stdout)  # nothing is left over from the last run
    assert len([e for e in shipped if e["llama_cpp"]]) > 1
    missing = invoke("plan", "--target", "cpu", "--recipes", str(tmp_path / "nope"))
    assert missing.exit_code == 2 and missing.stderr.startswith(f"error: --recipes {tmp_path / 'nope'}: no such")
    absent = invoke("plan", "--target", "nvidia", "--recipes", str(own))
    assert absent.exit_code == 2 and "nvidia.yaml is missing" in absent.stderr.splitlines()[0]


def test_top_level_help_shows_the_operators_verbs_first_and_every_verb_in_a_panel() -> None:
    group = get_command(app)
    panels = {name: getattr(sub, "rich_help_panel", None) for name, sub in group.commands.items()}
    assert set(panels.values()) == {OPERATE, IMAGES}, panels
    assert {n for n, p in panels.items() if p == OPERATE} >= {"run", "cluster", "pxe"}
    text = invoke("--help").stdout
    assert text.index(OPERATE[:30]) < text.index(IMAGES[:30])


def test_run_options_after_the_role_are_explained_in_one_line() -> None:
    result = invoke("run", "server", "--target", "cpu", "--port", "8080")
    lines = result.stderr.splitlines()
    assert result.exit_code == 2 and lines[0] == "error: --target comes after ROLE 'server', so it went to the " \
        "role, not to builder run" and lines[1].startswith("hint: put builder run's options before ROLE")
    printed = invoke("run", "--print", "--image", "localhost/x:y", "--engine", "podman", "server", "--name", "x")
    assert printed.exit_code == 0 and printed.stdout.rstrip().endswith("server --name x")  # an image: the role's
