"""A vLLM root netbooted under QEMU (TCG, no KVM; user-mode networking, 127.0.0.1 only): the cpu vLLM image's
netboot set (a root of about 1.6 GB compressed) is fetched onto the node's cache disk and opened through
dm-verity, so the root costs the node no RAM; the node of a `replicate` vLLM service (a services-form
cluster file) follows its plan: it fetches the model (the tiny random-weight Hugging Face model of
test_engines_vllm_serve.py, published as a squashfs by sha256) onto the same disk, starts the image's own
entrypoint with the plan's `vllm serve` line on its address and says it is ready once /health answers. One
completion from the host (through hostfwd) must be transformers' greedy text, token for token. The second
boot fetches no byte of the root or the model.

`-cpu max`: TCG emulates AVX2 but not AVX-512, so vLLM loads its _C_AVX2 kernels (the AVX-512 ones would die
of an illegal instruction). Slow: torch and vLLM start under emulation (docs/benchmarks.md has the times).
"""

import json
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from test_engines_vllm_serve import SERVED_NAME
from test_netboot_cache_qemu import root_bytes_sent
from test_netboot_qemu import MAC, published

from builder.cluster.hfmodel import folder_hash
from builder.netboot.plan import VllmLine, parse
from conftest import free_port, run_cli
from qemu import gpt_disk, node, wait_for
from vllm_fixtures import MAX_TOKENS, PROMPT

pytestmark = [pytest.mark.slow, pytest.mark.engine]
# Guest RAM: vLLM's three processes (API server, engine core, worker) with torch, and a 1 GiB KV cache.
# 3 GiB worked too, with 224 MiB left after ready (docs/benchmarks.md): 4 GiB leaves room on a loaded machine.
GUEST_MB = 4096
BOOT_SECONDS = 2700  # power-on to ready under TCG on 2 busy cores, bounded
READY = rf"builder-node: vnode1 server {SERVED_NAME} ready on 10\.0\.2\.15:8000"
ARGS = ["--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4", "--enforce-eager"]


@pytest.fixture(scope="module")
def vllm_set(cpu_image: str) -> dict[str, Any]:
    """`builder pxe build --flavour vllm --target cpu`: the image's netboot set (cached after the first)."""
    proc = run_cli("pxe", "build", "--target", "cpu", "--flavour", "vllm", "--engine", "podman", "--json",
                   timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest: dict[str, Any] = json.loads(proc.stdout)
    assert manifest["image"] == cpu_image
    return manifest


def test_vllm_root_boots_from_a_cache_disk_and_serves_transformers_greedy_text(
    tmp_path: Path, vllm_set: dict[str, Any], tiny_hf: tuple[Path, dict[str, Any]]
) -> None:
    folder, ref = tiny_hf
    squash, size = vllm_set["files"]["root.squashfs"]["sha256"], vllm_set["files"]["root.squashfs"]["size"]
    disk = tmp_path / "disk.img"
    gpt_disk(disk, size // 2**20 + 1024, "builder-cache")  # sparse: what the node writes is what it takes
    api, http = free_port(), free_port()
    # QEMU's user-mode network leases the guest 10.0.2.15: the address vLLM binds, as the file says
    nodes: list[dict[str, object]] = [{"name": "vnode1", "mac": MAC, "target": "cpu", "address": "10.0.2.15",
                                       "memory": "3GiB", "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}}]
    services = [{"name": SERVED_NAME, "engine": "vllm", "model": str(folder), "port": 8000, "args": ARGS,
                 "sha256": folder_hash(folder, "tiny_hf"), "nodes": ["vnode1"]}]
    log = tmp_path / "serve.log"
    with published(tmp_path, http, nodes, services=services, cache={"device": "PARTLABEL=builder-cache"}) as root:
        plan = parse(next((root / "current" / "nodes").glob("*.plan")).read_text())
        (line,) = (item for item in plan.lines if isinstance(item, VllmLine))
        model = line.model_sha256
        assert line.argv[:2] == ("serve", f"/models/{SERVED_NAME}") and "--enforce-eager" in line.argv
        for nth in (1, 2):
            console = tmp_path / f"console-{nth}.log"
            started = time.monotonic()
            with node(root / "tftp", MAC, console, forward=(api, 8000), disk=disk, memory_mb=GUEST_MB,
                      cpu="max") as vm:
                wait_for(console, READY, vm, BOOT_SECONDS)
                ready_s = time.monotonic() - started
                resp = requests.post(f"http://127.0.0.1:{api}/v1/completions", timeout=900, json={
                    "model": SERVED_NAME, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
                    "return_token_ids": True})
                memory = wait_for(console, r"builder-node: memory: MemAvailable (\d+) kB", vm, 60)
            assert resp.status_code == 200, resp.text[:2000]
            choice = resp.json()["choices"][0]
            assert choice["token_ids"] == ref["completion"]["ids"]
            assert choice["text"] == ref["completion"]["text"]
            text = console.read_text(errors="replace")
            assert "root opened through dm-verity" in text and "Illegal instruction" not in text
            assert "Failed to import from vllm._C" not in text  # the AVX2 kernels loaded
            if nth == 1:
                assert "cache device /dev/vda1 is empty: formatting it" in text
                assert f"root image verified: sha256 {squash}" in text
                assert f"builder-node: model verified: sha256 {model}" in text
            else:
                assert f"root image from the cache: sha256 {squash} (no download)" in text
                assert f"builder-node: model from the cache: sha256 {model} (no download)" in text
            # each blob was sent once, on the first boot
            assert root_bytes_sent(log, squash) == size
            assert root_bytes_sent(log, model) == (root / "blobs" / "sha256" / model).stat().st_size
            print(f"boot {nth}: ready after {ready_s:.0f} s, MemAvailable {int(memory.group(1)) // 1024} MiB "
                  f"of {GUEST_MB} MiB, root bytes sent so far {root_bytes_sent(log, squash)}")
