"""Ready means right, on the cpu image: its `qualify` role runs the tiny model the build generated and shipped,
greedily, and compares the token ids with the ones the build recorded; a record that does not match fails it.

The Vulkan images' device checks (degraded on lavapipe by default, ready when told to use it) are in
test_engines_vulkan.py, beside the fixture that builds them.
"""

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from builder.engines import ENGINES
from conftest import run_cli

pytestmark = pytest.mark.engine


def one_json_line(stdout: str) -> dict[str, Any]:
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout
    doc = json.loads(lines[0])
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def qualified(llama_cpu_image: str) -> dict[str, Any]:
    proc = run_cli("run", "--target", "cpu", "--engine", "podman", "qualify", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return one_json_line(proc.stdout)


def test_the_cpu_image_qualifies_with_the_ids_its_build_recorded(qualified: dict[str, Any]) -> None:
    assert qualified["state"] == "qualified"
    assert qualified["expected"] == "CPU" and qualified["device"] == "CPU" and qualified["recorded_on"] == "CPU"
    assert qualified["ids"] == qualified["recorded"]
    # The model is seeded so that no step is a near-tie and the run is no single repeated token.
    assert len(qualified["ids"]) == 16 and len(set(qualified["ids"])) >= 8
    assert qualified["min_gap"] >= 1.5


def test_a_record_with_other_ids_fails_qualification_with_both_lists(
        llama_cpu_image: str, qualified: dict[str, Any], tmp_path: Path) -> None:
    recorded = list(qualified["recorded"])
    recorded[3] = (recorded[3] + 1) % 64
    changed = tmp_path / "qualify.json"
    changed.write_text(json.dumps({"seed": 0, "ids": recorded, "min_gap": 9.0, "device": "CPU"}) + "\n")
    engine = ENGINES["podman"]()
    proc = subprocess.run([*engine.run_argv(), "--rm", "--network", "none",
                           "-v", f"{changed}:/usr/lib/builder/qualify.json:ro,Z", "--", llama_cpu_image, "qualify"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    doc = one_json_line(proc.stdout)
    assert doc["state"] == "unqualified"
    assert doc["recorded"] == recorded and doc["ids"] == qualified["ids"]
    assert "from step 3 on" in doc["why"]
