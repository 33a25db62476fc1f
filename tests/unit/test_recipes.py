"""Recipes: valid ones load; bad ones give one line naming file and field, exit 2, no traceback."""

import json
from pathlib import Path

import pytest
import yaml

from builder.core.errors import RecipeError
from builder.recipe import load as recipes
from builder.recipe.targets import STATES, TARGETS
from conftest import ROOT, run_cli_inproc

CPU = yaml.safe_load((ROOT / "recipes" / "cpu.yaml").read_text())


def write_recipe(tmp_path: Path, data: object, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def with_change(path: list[str], value: object) -> dict[str, object]:
    data = json.loads(json.dumps(CPU))
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


def assert_one_clear_error(proc, *needles: str) -> None:  # type: ignore[no-untyped-def]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("error: ")
    for needle in needles:
        assert needle in first, first
    assert proc.stdout == ""


PIN = {"source": {"kind": "pypi", "package": "llama-cpp-python", "version": "0.3.36", "sha256": "a" * 64,
                  "subdir": "vendor/llama.cpp"}}
CPU_SECTION = CPU["variants"]["cpu"]


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        ((["variants", "cpu", "flavour"], "x"), ["variants.cpu.flavour", "unknown key"]),
        ((["variants", "cpu", "base", "toolchain", "packages"], 5),
         ["variants.cpu.base.toolchain.bootstrap.packages", "valid list"]),
        ((["target"], "tpu"), ["target", "unknown target 'tpu'"]),
        ((["variants", "cuda"], CPU_SECTION), ["variants.cuda", "cpu has no variant 'cuda'"]),
        ((["variants"], {}), ["variants", "at least 1"]),
        ((["llama_cpp"], {"source": {**PIN["source"], "sha256": "abc"}}), ["llama_cpp.source.pypi.sha256"]),
        ((["variants", "cpu", "base", "runtime"], {"kind": "image", "ref": "debian:bookworm"}),
         ["variants.cpu.base.runtime.image.ref", "digest"]),
        ((["variants", "cpu", "base", "runtime"], {"kind": "tarball"}),
         ["variants.cpu.base.runtime", "unknown kind 'tarball'"]),
        ((["llama_cpp"], {"source": {**PIN["source"], "subdir": "../etc"}}),
         ["llama_cpp.source.pypi.subdir", "relative path"]),
    ],
)
def test_bad_recipe_is_one_line_naming_file_and_field(tmp_path: Path, change, needles) -> None:  # type: ignore[no-untyped-def]
    path = write_recipe(tmp_path, with_change(*change))
    proc = run_cli_inproc("plan", "--recipe", str(path))
    assert_one_clear_error(proc, "bad.yaml", *needles)


def test_unknown_target_lists_known_ones() -> None:
    proc = run_cli_inproc("plan", "--target", "tpu")
    assert_one_clear_error(proc, "unknown target 'tpu'")
    assert "hint: known targets: cpu, intel-arc, intel-npu, nvidia, strix-halo" in proc.stderr


def test_variant_missing_from_the_recipe_says_what_it_builds(tmp_path: Path) -> None:
    data = {"target": "strix-halo", "variants": {"vulkan": CPU_SECTION}}
    path = write_recipe(tmp_path, data)
    proc = run_cli_inproc("plan", "--recipe", str(path))
    assert_one_clear_error(proc, "bad.yaml: variants: no 'rocm' section in this recipe yet")
    assert "this recipe builds: vulkan (pass --variant)" in proc.stderr


def test_target_without_a_recipe_yet_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cpu.yaml").write_text("target: cpu\n")
    monkeypatch.setattr(recipes, "RECIPES_DIR", tmp_path)
    with pytest.raises(RecipeError, match="target 'nvidia' has no recipe yet: .*nvidia.yaml is missing") as caught:
        recipes.recipe_path_for("nvidia")
    assert caught.value.hint == "targets with recipes: cpu"


def test_every_target_has_a_recipe() -> None:
    assert sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml") if p.stem != "llama-cpp") == sorted(TARGETS)


@pytest.mark.parametrize("verb", [["plan"], ["render", "--out", "/nonexistent/never-written"], ["build"],
                                  ["run", "shell"], ["doctor"]], ids=lambda v: v[0])
def test_variant_of_another_target_says_whose_it_is(verb: list[str]) -> None:
    """cuda on strix-halo: every verb says where cuda belongs and what strix-halo offers, exit 2, nothing done."""
    options = ["--target", "strix-halo", "--variant", "cuda"]
    proc = run_cli_inproc(verb[0], *options, *verb[1:]) if verb[0] == "run" else run_cli_inproc(*verb, *options)
    assert_one_clear_error(proc, "--variant: strix-halo has no variant 'cuda'")
    assert "hint: cuda belongs to nvidia (NVIDIA GeForce RTX 3060" in proc.stderr
    assert "strix-halo offers: rocm, rocm-amd, vulkan" in proc.stderr
    assert not Path("/nonexistent/never-written").exists()


@pytest.mark.parametrize("verb", ["plan", "build", "doctor"])
def test_unknown_target_or_variant_lists_the_valid_ones_on_every_verb(verb: str) -> None:
    proc = run_cli_inproc(verb, "--target", "tpu")
    assert_one_clear_error(proc, "unknown target 'tpu'")
    assert "known targets: cpu, intel-arc, intel-npu, nvidia, strix-halo" in proc.stderr
    proc = run_cli_inproc(verb, "--target", "intel-npu", "--variant", "npu")
    assert_one_clear_error(proc, "intel-npu has no variant 'npu'")
    assert "intel-npu offers: openvino" in proc.stderr


def test_unknown_variant_on_command_line_lists_valid_ones() -> None:
    proc = run_cli_inproc("render", "--target", "cpu", "--variant", "rocm", "--out", "/nonexistent/never-written")
    assert_one_clear_error(proc, "--variant: cpu has no variant 'rocm'")
    assert "rocm belongs to strix-halo" in proc.stderr and "cpu offers: cpu" in proc.stderr
    assert not Path("/nonexistent/never-written").exists()


def test_missing_recipe_file(tmp_path: Path) -> None:
    proc = run_cli_inproc("plan", "--recipe", str(tmp_path / "nope.yaml"))
    assert_one_clear_error(proc, "nope.yaml", "not found")


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, "target: cpu\nbase: [unclosed\n")
    proc = run_cli_inproc("plan", "--recipe", str(path))
    assert_one_clear_error(proc, "bad.yaml", "line")


def test_recipe_must_be_a_mapping(tmp_path: Path) -> None:
    proc = run_cli_inproc("plan", "--recipe", str(write_recipe(tmp_path, "- just\n- a list\n")))
    assert_one_clear_error(proc, "bad.yaml", "expected a mapping")


def test_no_recipe_chosen() -> None:
    proc = run_cli_inproc("plan")
    assert_one_clear_error(proc, "no recipe chosen")


def test_schema_is_json_schema_that_forbids_unknown_keys() -> None:
    proc = run_cli_inproc("schema")
    assert proc.returncode == 0
    schema = json.loads(proc.stdout)
    assert set(schema["required"]) >= {"target", "variants"}
    assert schema["additionalProperties"] is False
    kinds = json.dumps(schema["$defs"])
    for kind in ("bootstrap", "image", "git", "archive", "pypi"):
        assert f'"const": "{kind}"' in kinds


def test_every_recipe_field_is_documented() -> None:
    """Each key of the recipe schema appears in the recipe reference (docs/recipes.md)."""
    readme = (ROOT / "docs" / "recipes.md").read_text()
    schema = json.loads(run_cli_inproc("schema").stdout)
    keys = set(schema["properties"])
    for definition in schema["$defs"].values():
        keys |= set(definition.get("properties", {}))
    missing = sorted(k for k in keys if f"`{k}`" not in readme)
    assert not missing, f"docs/recipes.md does not document recipe keys: {missing}"


def test_targets_lists_variants_and_what_the_recipes_build() -> None:
    proc = run_cli_inproc("targets")
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    rows = {tuple(line.split()[:2]): line.split()[2] for line in lines[1:lines.index("")]}
    assert {target for target, _ in rows} == {"cpu", "strix-halo", "intel-arc", "intel-npu", "nvidia"}
    assert rows[("cpu", "cpu*")] == rows[("strix-halo", "rocm*")] == rows[("strix-halo", "vulkan")] == "ready"
    assert rows[("intel-arc", "vulkan")] == rows[("intel-npu", "openvino*")] == "ready"
    assert rows[("nvidia", "cuda*")] == rows[("nvidia", "cuda-nvidia")] == "ready"
    # a vendor's placeholder pins: the one command to run first, on a machine that reaches the vendor's site
    assert rows[("intel-arc", "sycl*")] == rows[("strix-halo", "rocm-amd")] == "needs"
    assert "  intel-arc/sycl (llama.cpp): needs `builder pin --target intel-arc --variant sycl` first" in proc.stdout
    assert "amd-xdna: AMD's Ryzen AI NPU (XDNA)" in proc.stdout  # hardware no target serves, and why


def test_every_step_targets_asks_for_first_is_one_that_build_refuses_without() -> None:
    """Each image `builder targets` says needs a step first is refused by `builder build` in one line."""
    entries = json.loads(run_cli_inproc("targets", "--json").stdout)
    for entry in entries:
        for flavour, key in (("llama.cpp", "llama_cpp_status"), ("vllm", "vllm_status")):
            if entry[key] is None or entry[key] == "ready to build":
                continue
            proc = run_cli_inproc("build", "--flavour", flavour, "--target", entry["target"],
                                  "--variant", entry["variant"])
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, (entry, proc.stderr)


def readme_states() -> dict[tuple[str, str], tuple[str, str]]:
    """The targets table of docs/targets.md: (target, variant) -> (tested by builder, ran on)."""
    text = (ROOT / "docs" / "targets.md").read_text()
    table = text[text.index("| target | variant | built from | tested by builder | ran on |"):].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        target, variant = cells[0].strip("`"), cells[1].rstrip("*").strip("`")
        rows[(target, variant)] = (cells[3], "" if cells[4] == "-" else cells[4])
    return rows


def test_readme_targets_table_is_the_state_data() -> None:
    """Every target/variant has exactly one recorded state; docs/targets.md's table says the same, row for row."""
    table = readme_states()
    assert table == {key: (state.text(), state.ran_on) for key, state in STATES.items()}
    for text, _ in table.values():
        assert text.startswith(("CI builds it and runs it on ", "slow tests build it", "rendered and checked only: "))
        assert "here" not in text.split() and "our machines" not in text
    missing = [f"{t.name}/{v}" for t in TARGETS.values() for v in t.variants if (t.name, v) not in STATES]
    assert not missing, f"no state recorded in builder/recipe/targets.py STATES for {missing}"


def test_builder_targets_shows_the_same_state_as_the_readme() -> None:
    proc = run_cli_inproc("targets", "--json")
    assert proc.returncode == 0, proc.stderr
    shown = {(e["target"], e["variant"]): (e["tested_text"], e["ran_on"]) for e in json.loads(proc.stdout)}
    table = readme_states()
    assert shown == {key: table[key] for key in shown}
    assert len(shown) == sum(len(t.variants) for t in TARGETS.values())
    text = run_cli_inproc("targets").stdout.splitlines()
    assert text[0].split() == ["TARGET", "VARIANT", "LLAMA.CPP", "VLLM", "TESTED", "BY", "BUILDER"]
    sycl = next(line for line in text if line.split()[:2] == ["intel-arc", "sycl*"])
    assert sycl.endswith(table[("intel-arc", "sycl")][0])
