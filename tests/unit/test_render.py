"""Planning and rendering: golden contexts, content-addressed tags, minimal rewrites, source staging."""

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

import goldens
from builder.flavours.llama import stage_source
from builder.pipeline.build import Prepared
from builder.plan.make import make_plan
from builder.recipe.load import load_recipe, recipe_path_for
from builder.recipe.models import SourceInfo
from builder.render.context import fingerprint, render_files
from conftest import ROOT, run_cli_inproc

GOLDEN = goldens.GOLDEN


@pytest.mark.usefixtures("goldens_written")
def test_every_shipped_image_has_a_golden_context_and_every_shared_file_is_used() -> None:
    wanted = {image.folder for image in goldens.images()}
    assert GOLDEN / "cpu" / "cpu" in wanted and GOLDEN / "cpu" / "vllm-cpu" in wanted
    assert goldens.folders() == wanted, "run pytest --update-golden after adding or removing a variant"
    used = {line.split(" ")[1] for folder in wanted for line in (folder / goldens.MANIFEST).read_text().splitlines()}
    on_disk = {p.relative_to(ROOT).as_posix() for p in goldens.SHARED.rglob("*") if p.is_file()}
    assert on_disk and on_disk <= used and "images/scripts/entrypoint.sh" in used


@pytest.mark.parametrize("image", goldens.images("llama.cpp"), ids=lambda i: f"{i.target}/{i.variant}")
@pytest.mark.usefixtures("goldens_written")
def test_golden_context(image: goldens.Image, cpu_prepared: Prepared, tmp_path: Path) -> None:
    """The whole rendered context (Containerfile, scripts, plan.json) equals its golden (tests/support/goldens.py)."""
    rendered = image.render(tmp_path / "ctx")
    expected = goldens.expected(image.folder)
    assert sorted(rendered) == sorted(expected)
    for name in expected:
        assert rendered[name] == expected[name], f"{name} differs from golden (run pytest --update-golden)"


def test_plan_json_names_image_tag_and_pinned_inputs(cpu_prepared: Prepared) -> None:
    proc = run_cli_inproc("plan", "--target", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["image"] == cpu_prepared.tag
    assert doc["image"].startswith("localhost/builder/cpu:cpu-")
    assert doc["source"]["identity"] == "sha256:832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
    for flag in ("GGML_RPC", "GGML_BACKEND_DL", "GGML_CPU_ALL_VARIANTS"):
        assert doc["cmake"][flag] == "ON"
    assert doc["cmake"]["GGML_NATIVE"] == "OFF" and doc["cmake"]["LLAMA_CURL"] == "OFF"
    assert doc["binaries"] == ["llama-server", "ggml-rpc-server", "llama-cli", "llama-bench"]


def _plan_with(source_identity: str = "sha256:" + "a" * 64, cmake: dict[str, str] | None = None,
               epoch: int | None = None) -> tuple[str, str]:
    recipe = load_recipe(recipe_path_for("cpu"))
    if cmake:
        recipe = recipe.model_copy(update={"llama_cpp": recipe.llama_cpp.model_copy(update={"cmake": cmake})})
    source = SourceInfo(locator="x", identity=source_identity, version="1", epoch=1_700_000_000)
    plan = make_plan(recipe, "recipes/cpu.yaml", source, source_date_epoch=epoch)
    files = render_files(plan)
    return fingerprint(plan, files), files["Containerfile"].decode()


def test_tag_is_stable_and_follows_every_input() -> None:
    base, _ = _plan_with()
    assert _plan_with()[0] == base
    assert _plan_with(source_identity="sha256:" + "b" * 64)[0] != base
    assert _plan_with(cmake={"GGML_AVX512": "OFF"})[0] != base
    assert _plan_with(epoch=0)[0] != base


def test_source_date_epoch_sets_created_label() -> None:
    _, containerfile = _plan_with(epoch=1_600_000_000)
    assert '"org.opencontainers.image.created"="2020-09-13T12:26:40Z"' in containerfile
    _, containerfile = _plan_with()
    assert '"org.opencontainers.image.created"="2023-11-14T22:13:20Z"' in containerfile


def test_recipe_cmake_overrides_defaults() -> None:
    _, containerfile = _plan_with(cmake={"GGML_CPU_ALL_VARIANTS": "OFF", "GGML_BLAS": "ON"})
    assert "-DGGML_CPU_ALL_VARIANTS=OFF" in containerfile and "-DGGML_CPU_ALL_VARIANTS=ON" not in containerfile
    assert "-DGGML_BLAS=ON" in containerfile


def test_rerender_rewrites_only_changed_files(cpu_prepared: Prepared, tmp_path: Path) -> None:
    p = cpu_prepared
    assert len(p.write(tmp_path)) == len(p.files) + 1
    before = {f: os.stat(tmp_path / f).st_mtime_ns for f in p.files}
    assert p.write(tmp_path) == []
    changed = dict(p.files, **{"scripts/entrypoint.sh": p.files["scripts/entrypoint.sh"] + b"# edit\n"})
    assert replace(p, files=changed).write(tmp_path) == ["scripts/entrypoint.sh"]
    assert os.stat(tmp_path / "Containerfile").st_mtime_ns == before["Containerfile"]
    assert os.access(tmp_path / "scripts" / "entrypoint.sh", os.X_OK)


def test_stage_source_prunes_and_removes_stale_files(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "models").mkdir(parents=True)
    (tree / "models" / "big.gguf").write_bytes(b"x" * 1000)
    (tree / "src").mkdir()
    (tree / "src" / "a.cpp").write_text("int a;\n")
    (tree / "CMakeLists.txt").write_text("project(llama.cpp)\n")
    out = tmp_path / "ctx"
    stage_source(tree, out)
    assert (out / "llama.cpp" / "src" / "a.cpp").read_text() == "int a;\n"
    assert not (out / "llama.cpp" / "models").exists()
    (tree / "src" / "a.cpp").unlink()
    (tree / "src" / "b.cpp").write_text("int b;\n")
    stage_source(tree, out)
    assert not (out / "llama.cpp" / "src" / "a.cpp").exists()
    assert (out / "llama.cpp" / "src" / "b.cpp").exists()


def test_render_with_source_writes_a_buildable_context(tmp_path: Path) -> None:
    proc = run_cli_inproc("render", "--target", "cpu", "--out", str(tmp_path), "--with-source")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "llama.cpp" / "CMakeLists.txt").is_file()
    assert (tmp_path / "llama.cpp" / "tools" / "rpc" / "rpc-server.cpp").is_file()
    assert not (tmp_path / "llama.cpp" / "models").exists()
    containerfile = (tmp_path / "Containerfile").read_text()
    for line in containerfile.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            assert (tmp_path / line.split()[1]).exists(), line
