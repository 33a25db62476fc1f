"""Every verb, found by walking the app (a new verb is covered without naming it here), given a wrong path:
one `error:` line (and at most a hint), exit 2, no traceback, nothing half-written."""

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.main import get_command
from typer.testing import CliRunner

from builder.cli.conventions import GLOBAL_OPTIONS
from builder.cli.main import app
from conftest import ROOT, run_cli

RECIPE = ROOT / "recipes" / "cpu.yaml"
# What each parameter is, by its name. A new parameter that takes a path must be named here.
CLUSTER_FILES = {"inventory", "file", "cluster_file"}
RECIPE_FILES = {"recipe"}
INPUT_FILES = {"model"}
INPUT_FOLDERS = {"folder", "driver_dir", "pulled", "recipes"}
OUTPUT_FOLDERS = {"out", "dest"}
OUTPUT_FILES = {("sbom", "out")}  # (verb, parameter): an output that is a file, not a folder
# Paths that are read or written depending on the verb: `root` is written by pxe publish, read by the others.
ROOT_WRITTEN = {("pxe", "publish")}
NOT_PATHS_HERE = {"lock_path"}  # the lock: builder.lock of the project unless given; tests/unit/test_lock.py
# Values for required parameters that are not under test (never reached: the wrong path stops the verb first).
FILLERS = {"registry": "127.0.0.1:9/x", "role": "server", "reference": "127.0.0.1:9/x:t", "target": "cpu",
           "form": "kube", "old": "previous", "new": "current", "node": "n1"}


def leaves(command: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    subs = getattr(command, "commands", None)
    if subs is None:
        return [(path, command)]
    return [leaf for name, sub in sorted(subs.items()) for leaf in leaves(sub, (*path, name))]


VERBS = leaves(get_command(app))


def kind(words: tuple[str, ...], name: str) -> str | None:
    if name in CLUSTER_FILES:
        return "cluster"
    if name in RECIPE_FILES:
        return "recipe"
    if name in INPUT_FILES:
        return "input-file"
    if name in INPUT_FOLDERS or (name == "root" and words not in ROOT_WRITTEN):
        return "input-folder"
    if (words[-1], name) in OUTPUT_FILES:
        return "output-file"
    if name in OUTPUT_FOLDERS or name == "root":
        return "output-folder"
    return None


def argv(words: tuple[str, ...], command: Any, param: Any, value: str, tmp: Path) -> list[str]:
    """The verb with `value` for `param`, the required rest filled in: options first, then arguments."""
    options: list[str] = ["--print"] if any(p.name == "print_only" for p in command.params) else []
    positional: list[str] = []
    for p in command.params:
        if p is param:
            given = value
        elif p.name in CLUSTER_FILES and p.param_type_name == "argument":
            given = str(tmp / "cluster.yaml")  # not there: the path under test is checked first
        elif p.required:
            given = str(tmp / "new-out") if p.name in OUTPUT_FOLDERS else FILLERS[p.name]
        else:
            continue
        if p.param_type_name == "argument":
            positional.append(given)
        else:
            options += [p.opts[0], given]
    return [*words, *options, *positional]


def cases(tmp: Path) -> list[tuple[str, list[str]]]:
    """(what, argv) for every verb and every path parameter it takes."""
    found = []
    a_file = tmp / "a-file"
    cluster = tmp / "real-cluster.yaml"
    for words, command in VERBS:
        for param in command.params:
            what = kind(words, param.name)
            if what is None or param.hidden:
                type_text = str(getattr(param, "type_descriptor", getattr(param, "type", ""))).lower()
                assert param.name in NOT_PATHS_HERE or param.hidden or "path" not in type_text, \
                    f"builder {' '.join(words)}: name {param.name} in one of the tables above"
                continue
            tries = {"input-file": [tmp / "missing.gguf", tmp], "input-folder": [tmp / "missing", a_file],
                     "output-folder": [a_file, a_file / "under-a-file"],
                     "output-file": [tmp, a_file / "under-a-file"],
                     "cluster": [tmp / "missing.yaml", RECIPE], "recipe": [tmp / "missing.yaml", cluster]}[what]
            for value in tries:
                found.append((f"{' '.join(words)} {param.name}={value.name}", argv(words, command, param, str(value),
                                                                                     tmp)))
    return found


def setup(tmp: Path) -> None:
    (tmp / "a-file").write_text("not a folder\n")
    (tmp / "real-cluster.yaml").write_text(yaml.safe_dump({
        "control": {"address": "10.0.2.2"},
        "nodes": [{"name": "n1", "mac": "52:54:00:12:34:56", "target": "cpu", "role": "rpc-worker"}]}))


def test_every_verb_refuses_every_wrong_path_in_one_line(tmp_path: Path) -> None:
    setup(tmp_path)
    found = cases(tmp_path)
    assert len(found) > 40  # the walk found the verbs
    wrong = []
    for what, args in found:
        before = sorted(p.name for p in tmp_path.iterdir())
        result = CliRunner().invoke(app, args)
        lines = result.stderr.splitlines()
        ok = result.exit_code == 2 and lines and lines[0].startswith("error: ") and "Traceback" not in result.output \
            and len(lines) <= 2 and (len(lines) == 1 or lines[1].startswith("hint: ")) and \
            sorted(p.name for p in tmp_path.iterdir()) == before
        # the wrong kind of file is named as such wherever the file is what the line is about
        for name, says in (("cpu.yaml", "not a cluster file"), ("real-cluster.yaml", "not a recipe")):
            if ok and what.endswith(f"={name}") and name in lines[0]:
                ok = says in lines[0]
        if not ok:
            wrong.append(f"{what}: builder {' '.join(args)} -> exit {result.exit_code}: {result.stderr[-300:]!r}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("args", [
    ("plan", "--recipe", "{tmp}/missing.yaml"),
    ("cluster", "status", str(RECIPE)),
    ("render", "--target", "cpu", "--out", "{tmp}/a-file"),
    ("pxe", "publish", "{tmp}/real-cluster.yaml", "--root", "{tmp}/a-file/under"),
    ("doctor", "--model", "{tmp}"),
])
def test_a_handful_as_real_processes(tmp_path: Path, args: tuple[str, ...]) -> None:
    setup(tmp_path)
    proc = run_cli(*(a.format(tmp=tmp_path) for a in args))
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and lines[0].startswith("error: ") and len(lines) <= 2, proc.stderr
    assert "Traceback" not in proc.stderr


def node(name: str, mac: str, address: str) -> dict[str, str]:
    return {"name": name, "mac": mac, "target": "cpu", "address": address}


@pytest.mark.parametrize(("second", "field"), [
    (node("a", "52:54:00:00:00:02", "10.0.0.12"), "nodes[1].name: 'a' is already nodes[0]"),
    (node("b", "52:54:00:00:00:01", "10.0.0.12"), "nodes[1].mac: 52:54:00:00:00:01 is already nodes[0]"),
    (node("b", "52:54:00:00:00:02", "10.0.0.11"), "nodes[1].address: 10.0.0.11 is already nodes[0]"),
])
def test_duplicate_identities_are_refused_in_both_forms(tmp_path: Path, second: dict[str, str], field: str) -> None:
    first = node("a", "52:54:00:00:00:01", "10.0.0.11")
    services = {"control": {"address": "10.0.0.1"}, "nodes": [first, second],
                "services": [{"name": "m", "model": "m.gguf", "sha256": "0" * 64, "nodes": ["a"]}]}
    netboot = {"control": {"address": "10.0.0.1"}, "nodes": [{**first, "role": "rpc-worker"},
                                                             {**second, "role": "rpc-worker"}]}
    path = tmp_path / "cluster.yaml"
    for data, args in ((services, ["cluster", "status", str(path)]),
                       (netboot, ["pxe", "publish", str(path), "--root", str(tmp_path / "root")])):
        path.write_text(yaml.safe_dump(data))
        result = CliRunner().invoke(app, args)
        lines = result.stderr.splitlines()
        assert result.exit_code == 2 and lines[0].startswith("error: ") and field in lines[0], (args, result.stderr)


@pytest.mark.parametrize(("args", "suggestion"), [
    (("plan", "--target", "strixhalo"), "did you mean 'strix-halo'?"),
    (("plan", "--target", "strix-halo", "--variant", "vulcan"), "did you mean 'vulkan'?"),
    (("run", "--print", "--image", "localhost/x:y", "sevrer"), "did you mean 'server'?"),
    (("plan", "--flavour", "vlm", "--target", "cpu"), "did you mean 'vllm'?"),
])
def test_unknown_names_get_the_closest_known_one(args: tuple[str, ...], suggestion: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 2 and suggestion in result.stderr.splitlines()[0], result.stderr


@pytest.mark.parametrize(("kind", "data"), [
    ("recipe", {**yaml.safe_load(RECIPE.read_text()), "bogus": 1}),
    ("vllm", {**yaml.safe_load((ROOT / "recipes" / "vllm" / "cpu.yaml").read_text()), "bogus": 1}),
    ("services", {"control": {"address": "10.0.0.1"}, "nodes": [node("a", "52:54:00:00:00:01", "10.0.0.11")],
                  "services": [{"name": "m", "model": "m.gguf", "sha256": "0" * 64, "nodes": ["a"]}], "bogus": 1}),
    ("netboot", {"control": {"address": "10.0.0.1"}, "bogus": 1,
                 "nodes": [{**node("a", "52:54:00:00:00:01", "10.0.0.11"), "role": "rpc-worker"}]}),
])
def test_an_unknown_key_points_to_the_schema_command_of_that_file(tmp_path: Path, kind: str,
                                                                   data: dict[str, object]) -> None:
    path = tmp_path / "file.yaml"
    path.write_text(yaml.safe_dump(data))
    verb = {"recipe": ["plan", "--recipe", str(path)], "vllm": ["plan", "--flavour", "vllm", "--recipe", str(path)],
            "services": ["cluster", "status", str(path)], "netboot": ["cluster", "firewall", str(path), "--node", "a"]}
    result = CliRunner().invoke(app, verb[kind])
    line = result.stderr.splitlines()[0]
    assert result.exit_code == 2 and "bogus: unknown key (see `builder " in line, result.stderr
    pointed = line.split("(see `", 1)[1].split("`", 1)[0].split()[1:]
    schema = CliRunner().invoke(app, pointed)
    assert schema.exit_code == 0, (pointed, schema.stderr)
    assert "bogus" not in json.loads(schema.stdout)["properties"]  # the schema of that kind of file
    assert set(data) - {"bogus"} <= set(json.loads(schema.stdout)["properties"]), pointed


def pointers(text: str) -> list[str]:
    """Every `builder …` in backquotes: what messages, help and the README tell people to run."""
    return re.findall(r"`(builder [^`\n]+)`", text)


def test_every_command_a_message_or_the_readme_points_to_exists_with_its_options() -> None:
    group = get_command(app)
    wrong = []
    sources = [*sorted((ROOT / "builder").rglob("*.py")), ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
               *sorted((ROOT / "docs" / "quickstarts").glob("*.md"))]
    for source in sources:
        for pointer in pointers(source.read_text()):
            commands, words = [group], pointer.replace("\\|", "|").split()[1:]
            for word in words:
                if any(getattr(c, "commands", None) is None for c in commands) or word[0] in "-…." or \
                        word.isupper() or "." in word:
                    break
                if any(w not in c.commands for c in commands for w in word.split("|")):
                    wrong.append(f"{source.name}: `{pointer}`: no verb {word!r}")
                    break
                commands = [c.commands[w] for c in commands for w in word.split("|")]
            for command in commands:
                known = {o for p in command.params for o in (*p.opts, *getattr(p, "secondary_opts", ()))}
                known |= {"--help", *(GLOBAL_OPTIONS if getattr(command, "commands", None) is None else ())}
                for word in words:
                    if word == "--" or (command.name == "run" and word.isupper()):
                        break  # what follows goes to the role or the command
                    option = word.strip("[]").split("=", 1)[0]
                    if re.fullmatch(r"--?[a-z][a-z0-9-]*", option) and option not in known:
                        wrong.append(f"{source.name}: `{pointer}`: builder {command.name} has no {option}")
    assert not wrong, "\n".join(sorted(set(wrong)))
