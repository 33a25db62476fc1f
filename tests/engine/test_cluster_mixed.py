"""A heterogeneous split: one head with RPC workers from different images, behind the gateway.

Node a (cpu image) runs llama-server; node b (cpu image) and node c (strix-halo/vulkan image, on Mesa's
lavapipe, a real Vulkan device that runs on the CPU) run ggml-rpc-server. It works only because every image
carries the same pinned llama.cpp, so the RPC protocol agrees. Node a also serves the same model alone, as
the single-node reference. ggml-vulkan skips CPU-type devices unless told otherwise: node c's `env` sets
GGML_VK_VISIBLE_DEVICES=0 (on a board with a GPU the node would leave it out).
Everything listens on 127.0.0.0/8; every request loop is bounded.
"""

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from builder.core.digests import sha256_file
from conftest import free_port, local_cluster, require_engine, require_tool, run_cli
from tinymodel import make_tiny_model

pytestmark = pytest.mark.engine

ENGINE = "podman"
PROMPT = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "seed": 42}
UP_TIMEOUT = 3600  # builds the cpu and vulkan images first when this machine has none


@dataclass(frozen=True)
class Mixed:
    path: Path
    gateway: str
    key: str
    rpc: int

    def complete(self, model: str) -> requests.Response:
        return requests.post(f"{self.gateway}/completions", json={**PROMPT, "model": model},
                             headers={"Authorization": f"Bearer {self.key}"}, timeout=180)

    def log(self, only: str) -> str:
        proc = run_cli("cluster", "logs", "--local", str(self.path), only, "-n", "5000", timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout


@pytest.fixture(scope="module")
def mixed(cpu_prepared: Any, tmp_path_factory: pytest.TempPathFactory,
            llama_cpu_image: str) -> Iterator[Mixed]:
    require_engine(ENGINE)
    require_tool("haproxy", "haproxy")
    folder = tmp_path_factory.mktemp("mixed")
    vocab = cpu_prepared.tree.path / "models" / "ggml-vocab-llama-spm.gguf"
    model = make_tiny_model(vocab, folder / "tiny.gguf")
    digest = sha256_file(model)
    rpc = free_port()
    gateway_port = free_port()
    data = {
        "gateway": {"port": gateway_port, "metrics_port": free_port()},
        "nodes": [
            {"name": "a", "mac": "52:54:00:00:02:01", "target": "cpu", "memory": "1GiB"},
            {"name": "b", "mac": "52:54:00:00:02:02", "target": "cpu", "memory": "1GiB"},
            {"name": "c", "mac": "52:54:00:00:02:03", "target": "strix-halo", "variant": "vulkan",
             "memory": "1GiB", "env": {"GGML_VK_VISIBLE_DEVICES": "0"}},
        ],
        "services": [
            {"name": "alone", "model": "tiny.gguf", "sha256": digest, "nodes": ["a"], "port": free_port(),
             "context": 256, "args": ["-t", "1"]},
            {"name": "mixed", "model": "tiny.gguf", "sha256": digest, "topology": "split", "head": "a",
             "workers": ["b", "c"], "port": free_port(), "rpc_port": rpc, "context": 256,
             "args": ["-t", "1", "-lv", "4"]},
        ],
    }
    with local_cluster(folder, data, ENGINE, UP_TIMEOUT) as (path, _, key):
        yield Mixed(path, f"http://127.0.0.1:{gateway_port}/v1", key, rpc)


def test_workers_of_different_images_give_the_single_node_text(mixed: Mixed) -> None:
    single = mixed.complete("alone")
    split = mixed.complete("mixed")
    assert single.status_code == 200 and split.status_code == 200, (single.text, split.text)
    text = split.json()["choices"][0]["text"]
    assert text == single.json()["choices"][0]["text"]
    assert len(set(text.split())) > 3


def test_the_heads_log_shows_a_buffer_on_each_worker(mixed: Mixed) -> None:
    assert mixed.complete("mixed").status_code == 200
    head = mixed.log("a-mixed-server")
    for address in ("127.0.0.12", "127.0.0.13"):
        # every RPC server numbers its own devices, so both buffers read RPC0[ADDRESS:PORT]
        sizes = re.findall(rf"RPC\d\[{address}:{mixed.rpc}\] model buffer size = +([0-9.]+) MiB", head)
        assert sizes and float(sizes[0]) > 0, (address, head[-4000:])
    status = json.loads(run_cli("cluster", "status", "--local", str(mixed.path), "--json").stdout)
    processes = next(s for s in status["services"] if s["name"] == "mixed")["processes"]
    assert {p["node"]: p["health"] for p in processes} == {"a": "UP", "b": "UP", "c": "UP"}


def test_the_vulkan_worker_computes_on_its_vulkan_device(mixed: Mixed) -> None:
    worker = mixed.log("c-mixed-rpc")
    assert re.search(r"^Devices:\n +Vulkan0: llvmpipe", worker, re.M), worker[-3000:]
    assert "Vulkan0" not in mixed.log("b-mixed-rpc")
