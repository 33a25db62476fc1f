"""The cpu vLLM image and the tiny Hugging Face model with transformers' greedy reference: made once per test
run and shared by every module that serves with vLLM (the serve tests, the pipeline, the vLLM netboot)."""

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from builder.engines import ENGINES
from conftest import require_engine, run_cli

MAX_TOKENS = 24
PROMPT = "once upon a time the quick brown fox"
MESSAGES = [{"role": "user", "content": "tell me a story about the sea."}]


@pytest.fixture(scope="session")
def cpu_image() -> str:
    """The cpu vLLM image (`builder build --flavour vllm --target cpu`; a no-op once built)."""
    require_engine("podman")
    proc = run_cli("build", "--flavour", "vllm", "--target", "cpu", "--engine", "podman", "--json", timeout=5400)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return str(json.loads(proc.stdout)["image"])


@pytest.fixture(scope="session")
def tiny_hf(cpu_image: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The model folder and transformers' greedy continuations on it, both made in the image."""
    work = tmp_path_factory.mktemp("tinyhf")
    shutil.copy(Path(__file__).with_name("tinyhf.py"), work / "tinyhf.py")
    (work / "request.json").write_text(json.dumps({"max_tokens": MAX_TOKENS, "prompt": PROMPT,
                                                   "messages": MESSAGES}))
    proc = subprocess.run([*ENGINES["podman"]().run_argv(), "--rm", "--network", "none",
                           "--volume", f"{work}:/work", cpu_image, "shell", "-c",
                           "python3 /work/tinyhf.py /work/tiny-llama /work/request.json /work/reference.json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work / "tiny-llama", json.loads((work / "reference.json").read_text())
