"""One pipeline, two flavours: every verb takes --flavour, and the library applies the same policy the CLI does."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from builder.core.errors import LockError, RecipeError
from builder.engines import get_engine
from builder.flavours.prepare import FLAVOURS, prepare, recipe_file
from builder.pipeline.build import build
from builder.publish.image import publish
from builder.registry.client import Repository
from conftest import ROOT, run_cli_inproc

VERBS = [["plan"], ["render"], ["build"], ["publish"], ["sbom"], ["lock"], ["run"], ["schema"],
         ["pxe", "build"], ["toolbox", "create"], ["toolbox", "enter"], ["toolbox", "rm"]]


@pytest.mark.parametrize("verb", VERBS, ids=" ".join)
def test_every_verb_takes_the_flavour(verb: list[str]) -> None:
    proc = run_cli_inproc(*verb, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--flavour" in proc.stdout


def test_unknown_flavour_is_one_line_for_every_verb() -> None:
    for verb in (["build", "--target", "cpu"], ["publish", "--target", "cpu", "--registry", "127.0.0.1:9/x"],
                 ["toolbox", "create", "--target", "cpu", "--print"]):
        proc = run_cli_inproc(*verb, "--flavour", "sglang")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.splitlines()[0] == "error: --flavour: unknown flavour 'sglang'"


def test_the_registry_tags_of_a_vllm_image_name_vllm_and_its_version() -> None:
    vllm = prepare(recipe_file("cpu", None, FLAVOURS["vllm"]), flavour=FLAVOURS["vllm"])
    assert vllm.tag.startswith("localhost/builder/cpu:vllm-cpu-") and vllm.name == "cpu/vllm-cpu"
    assert vllm.flavour.publish_tags(vllm) == ("cpu-vllm-cpu", f"cpu-vllm-cpu-vllm0.32.0-{vllm.fingerprint[:16]}")
    llama = prepare(recipe_file("cpu", None))
    assert llama.flavour.publish_tags(llama) == ("cpu-cpu", f"cpu-cpu-llama0.3.36-{llama.fingerprint[:16]}")


def test_library_publish_refuses_a_render_only_vllm_variant_before_any_network() -> None:
    """The policy is in the library: a caller of publish() gets it without the CLI (the port is closed)."""
    prep = prepare(recipe_file("strix-halo", None, FLAVOURS["vllm"]), flavour=FLAVOURS["vllm"])
    with pytest.raises(RecipeError, match="has no wheel lock yet"):
        publish(prep, get_engine("podman"), Repository.parse("127.0.0.1:9/x"))


def test_library_build_refuses_placeholder_pins_and_a_disagreeing_lock(tmp_path: Path) -> None:
    placeholder = prepare(recipe_file("intel-arc", None), "sycl")
    with pytest.raises(RecipeError, match="placeholder pin"):
        build(placeholder, get_engine("podman"))
    lock = json.loads((ROOT / "builder.lock").read_text())
    lock["images"]["cpu/cpu"]["cmake"] = {"GGML_AVX512": "ON"}
    disagreeing = tmp_path / "builder.lock"
    disagreeing.write_text(json.dumps(lock))
    with pytest.raises(LockError, match=r"cpu/cpu: cmake"):
        build(prepare(recipe_file("cpu", None), lock=disagreeing), get_engine("podman"))


def test_publish_of_a_vllm_image_needs_its_bases_locked(tmp_path: Path) -> None:
    empty = tmp_path / "empty.lock"
    empty.write_text(json.dumps({"version": 1, "images": {}}))
    proc = run_cli_inproc("publish", "--flavour", "vllm", "--target", "cpu", "--registry", "127.0.0.1:9/x",
                          "--lock", str(empty))
    assert proc.returncode == 2, proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("error: ") and "cpu/vllm-cpu: bases." in first and "no locked package set" in first


def test_toolbox_of_a_vllm_image_is_named_apart_and_uses_the_vllm_image() -> None:
    listed = subprocess.run(["podman", "image", "exists", "localhost/builder/cpu:vllm-cpu"], capture_output=True)
    proc = run_cli_inproc("toolbox", "create", "--flavour", "vllm", "--target", "cpu", "--tool", "toolbox", "--print")
    if listed.returncode != 0:
        assert proc.returncode == 2 and "builder build --flavour vllm --target cpu" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    assert "--image localhost/builder/cpu:vllm-cpu" in proc.stdout
    assert proc.stdout.split()[-1] == "builder-cpu-vllm-cpu"
    enter = run_cli_inproc("toolbox", "enter", "--flavour", "vllm", "--target", "cpu", "--tool", "toolbox", "--print")
    assert enter.stdout.split()[-1] == "builder-cpu-vllm-cpu"


def test_lock_check_finds_a_stale_vllm_wheel_lock(tmp_path: Path) -> None:
    recipes = tmp_path / "recipes"
    shutil.copytree(ROOT / "recipes", recipes)
    assert run_cli_inproc("lock", "--check", "--recipes", str(recipes)).returncode == 0
    vllm = recipes / "vllm" / "cpu.yaml"
    vllm.write_text(vllm.read_text().replace("ray==2.60.0", "ray==2.61.0"))
    proc = run_cli_inproc("lock", "--check", "--recipes", str(recipes))
    assert proc.returncode == 1
    assert "recipes/vllm/cpu-cpu.lock: stale lock: the recipe's python, requirements or index changed" in proc.stdout


def test_version_prints_without_a_command() -> None:
    from builder import __version__
    proc = run_cli_inproc("--version")
    assert proc.returncode == 0 and proc.stdout == f"builder {__version__}\n", proc.stderr


def test_library_build_refuses_a_vllm_variant_with_a_placeholder_base(tmp_path: Path) -> None:
    """The same placeholder rule as llama.cpp's (and `builder matrix`'s), named by the vLLM recipe's own field."""
    data = yaml.safe_load((ROOT / "recipes" / "vllm" / "cpu.yaml").read_text())
    data["variants"]["cpu"]["base"] = {"kind": "image", "ref": f"docker.io/library/debian@sha256:{'0' * 64}"}
    recipe = tmp_path / "vllm" / "cpu.yaml"
    recipe.parent.mkdir()
    recipe.write_text(yaml.safe_dump(data))
    shutil.copy(ROOT / "recipes" / "vllm" / "cpu-cpu.lock", recipe.parent)
    prep = prepare(recipe, flavour=FLAVOURS["vllm"])
    with pytest.raises(RecipeError, match=r"variants\.cpu\.base\.ref: placeholder pin"):
        build(prep, get_engine("podman"))
