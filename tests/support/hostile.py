"""Helpers of the hostile-input suites: files an attacker writes, and what a refusal must look like."""

import json
import subprocess
from pathlib import Path

import yaml

from conftest import ROOT

CPU = yaml.safe_load((ROOT / "recipes" / "cpu.yaml").read_text())
VLLM_CPU = yaml.safe_load((ROOT / "recipes" / "vllm" / "cpu.yaml").read_text())
DIGEST = "sha256:" + "ab" * 32


def changed(base: dict[str, object], path: str, value: object) -> dict[str, object]:
    """A deep copy of `base` with the value at a dotted path replaced (missing mappings are made)."""
    data: dict[str, object] = json.loads(json.dumps(base))
    node = data
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})  # type: ignore[assignment]
    node[keys[-1]] = value
    return data


def write_yaml(path: Path, data: object) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, allow_unicode=True))
    return path


def fake_llama_tree(folder: Path) -> Path:
    """The smallest tree builder accepts as llama.cpp (rendering reads nothing else from it)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "CMakeLists.txt").write_text("project(llama.cpp)\n")
    return folder


def refused(proc: subprocess.CompletedProcess[str], *needles: str, absent: tuple[Path, ...] = ()) -> str:
    """One error line naming file, field and problem (and at most a hint), exit 2, no traceback,
    and none of the `absent` paths (an output folder, a payload's marker file) exists."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines and lines[0].startswith("error: "), proc.stderr
    assert all(line.startswith("hint: ") for line in lines[1:]) and len(lines) <= 2, proc.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    for path in absent:
        assert not path.exists(), f"{path} was written"
    return lines[0]
