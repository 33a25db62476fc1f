"""The cpu vLLM image serves tokens: a tiny random-weight llama model in Hugging Face format, made by the test,
answers over vLLM's OpenAI API on 127.0.0.1 with the text transformers computes on the same weights.

How the server starts: as a netbooted node starts it. The node's units (images/netboot/node.sh, run in the image
by tests/support/nodeharness.py with a stand-in for systemctl) follow the plan `builder pxe publish` makes for a
one-node replicate vLLM service: they fetch the plan and the model's squashfs from `pxe serve`'s HTTP server on
loopback, check both against their sha256, export the node's env and start the image's entrypoint with the
plan's `vllm serve` line (builder/cluster/vllm_service.py, the same as `cluster up --local`'s). One stand-in: a
rootless container cannot loop-mount the squashfs, so the model folder is bind-mounted where the plan mounts it
and the `mount` the unit calls checks that it is there (tests/qemu/test_netboot_vllm_qemu.py mounts it for real).

Where transformers runs: in the cpu vLLM image itself (tests/support/tinyhf.py, in its own container without a
network, before the server starts). The image carries torch, transformers, tokenizers and safetensors at the
versions vLLM was locked with, so the test's virtual environment stays small and CI installs no second torch.
The two sides share only torch's basic operators: the reference is transformers' LlamaForCausalLM (eager
attention, the whole sequence through the model at every step), the server is vLLM's own llama model with
its CPU attention kernels, paged KV cache, scheduler, sampler and incremental detokenizer.

The criterion: equal token ids and equal text for every one of MAX_TOKENS greedy tokens, for a raw prompt,
for a chat prompt (the tokenizer has a chat template) and for both streamed. It is sound because the model
is float32 on both sides (`--dtype float32`: no bf16 rounding) and the reference checks that at every step
the best logit leads the second-best by more than MIN_RELATIVE_GAP of the largest logit, a hundred times
what float32 rounding in a 2-layer, 128-wide model can move (about 1e-5 relative): any other order of
summation picks the same token, so a mismatch is a real defect, not noise. The weights are wide noise
(std 0.5) so greedy decoding does not collapse into one repeated token; the text must use several distinct
tokens and run the full length (no end-of-sequence token).

`--enforce-eager`: vLLM's default compiles the model with torch.compile (g++) at startup, which took 253 s
to the first answer on this machine against 133 s eager, with the same text (measured by hand, see
docs/benchmarks.md); CI runs the eager path.
"""

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from nodeharness import node_command, node_volumes

from builder.cluster.hfmodel import folder_hash
from builder.cluster.plans import load_for_netboot, models, node_plan
from builder.engines import ENGINES
from builder.netboot.plan import serialize
from builder.netboot.publish import add_blob, add_blob_bytes
from builder.netboot.serve import http_server
from conftest import free_port
from containers import wait_healthy
from vllm_fixtures import MAX_TOKENS, MESSAGES, PROMPT

pytestmark = pytest.mark.engine

MIN_DISTINCT = 8
MIN_RELATIVE_GAP = 1e-3
SERVED_NAME = "tiny-llama"
GREEDY = {"max_tokens": MAX_TOKENS, "temperature": 0}
STARTUP_SECONDS = 900
# vLLM's CPU backend on a small shared machine: a 256-token context, a 1 GiB KV cache, few sequences.
SERVE_ARGS = ["--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4", "--enforce-eager"]
# busybox's applets the node's scripts use, for an image without busybox: wget (Python's urllib, no proxy) and
# the stand-in for the loop mount (see the module's docstring)
BUSYBOX = """#!/bin/bash
case "$1" in
    wget) exec python3 -c 'import sys, urllib.request as u
open(sys.argv[1], "wb").write(u.build_opener(u.ProxyHandler({})).open(sys.argv[2], timeout=60).read())' "$4" "$5" ;;
    mount) for last; do :; done; [ -f "$last/config.json" ] ;;
    *) exit 1 ;;
esac
"""

@pytest.fixture(scope="module")
def server(cpu_image: str, tiny_hf: tuple[Path, dict[str, Any]],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The tiny model served by the node's plan executor in the cpu vLLM image on 127.0.0.1 (see the module's
    docstring); yields its base URL once /health answers and the executor said so."""
    work = tmp_path_factory.mktemp("vllm-serve")
    port, http = free_port(), free_port()
    folder = tiny_hf[0]
    cluster = work / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({
        "control": {"address": "127.0.0.1", "http_port": http},
        "nodes": [{"name": "ci", "mac": "52:54:00:12:34:56", "target": "cpu", "address": "127.0.0.1",
                   "memory": "2GiB", "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}}],
        "services": [{"name": SERVED_NAME, "engine": "vllm", "model": str(folder), "port": port,
                      "sha256": folder_hash(folder, "tiny_hf"), "nodes": ["ci"], "args": SERVE_ARGS}]}))
    loaded = load_for_netboot(cluster)
    root = work / "pxe-root"
    (root / "current").mkdir(parents=True)
    model = add_blob(root, models(loaded, print)[SERVED_NAME])
    base = f"http://127.0.0.1:{http}"
    plan = add_blob_bytes(root, serialize(node_plan(loaded, "ci", base, {SERVED_NAME: model})).encode())
    files = http_server(root, "127.0.0.1", http)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    name = f"vllm-plan-{port}"
    log = work / "node.log"
    engine = ENGINES["podman"]()
    with log.open("wb") as out:
        proc = subprocess.Popen([
            *engine.run_argv(), "--rm", "--network", "host", "--shm-size", "1g", "--name", name,
            *node_volumes(work, BUSYBOX), "--volume", f"{folder}:/models/{SERVED_NAME}:ro", cpu_image,
            "shell", "-c", node_command(f"{base}/blobs/sha256/{plan}", plan)], stdout=out, stderr=subprocess.STDOUT)
    try:
        started = time.monotonic()
        wait_healthy(port, proc, log, seconds=STARTUP_SECONDS)
        print(f"vllm serve answered /health after {time.monotonic() - started:.0f} s")
        for _ in range(20):  # the executor polls every half second
            if "ready on" in log.read_text(errors="replace"):
                break
            time.sleep(0.5)
        text = log.read_text(errors="replace")
        assert f"builder-node: node plan verified: sha256 {plan}" in text, text[-3000:]
        assert f"builder-node: model verified: sha256 {model}" in text and "environment: VLLM_CPU_KVCACHE_SPACE" in text
        assert f"builder-node: ci server {SERVED_NAME} ready on 127.0.0.1:{port}" in text, text[-3000:]
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run([*engine.command(), "rm", "--force", name], capture_output=True)
        proc.wait(timeout=60)
        files.shutdown()
        files.server_close()


def _post(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = requests.post(f"{url}{path}", json={"model": SERVED_NAME, **body}, timeout=300)
    assert resp.status_code == 200, resp.text[:2000]
    doc: dict[str, Any] = resp.json()
    return doc


def _stream(url: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The server-sent events of a streamed request, each `data:` line parsed, up to `[DONE]`."""
    events: list[dict[str, Any]] = []
    with requests.post(f"{url}{path}", json={"model": SERVED_NAME, "stream": True, **body},
                       stream=True, timeout=300) as resp:
        assert resp.status_code == 200, resp.text[:2000]
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines(decode_unicode=True):
            if not line:
                continue
            assert line.startswith("data: "), line
            if line == "data: [DONE]":
                return events
            events.append(json.loads(line[len("data: "):]))
    pytest.fail(f"the stream ended without [DONE] after {len(events)} events")


def test_reference_is_a_fair_test(tiny_hf: tuple[Path, dict[str, Any]]) -> None:
    """transformers' side: full length, several distinct tokens, and wide logit gaps (see the docstring)."""
    folder, ref = tiny_hf
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in folder.iterdir()}
    assert ref["versions"]["torch"] == "2.13.0+cpu"
    for key in ("completion", "chat"):
        assert len(ref[key]["ids"]) == MAX_TOKENS, ref[key]
        assert len(set(ref[key]["ids"])) >= MIN_DISTINCT, ref[key]
        assert ref[key]["min_gap"] > MIN_RELATIVE_GAP * ref[key]["max_logit"], ref[key]


def test_models_lists_the_served_name(server: str) -> None:
    models = requests.get(f"{server}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == [SERVED_NAME]
    assert models["data"][0]["max_model_len"] == 256


def test_completion_is_transformers_greedy_text(server: str, tiny_hf: tuple[Path, dict[str, Any]]) -> None:
    ref = tiny_hf[1]["completion"]
    assert _post(server, "/tokenize", {"prompt": PROMPT})["tokens"] == ref["prompt_ids"]
    doc = _post(server, "/v1/completions", {"prompt": PROMPT, **GREEDY, "return_token_ids": True})
    choice = doc["choices"][0]
    assert choice["token_ids"] == ref["ids"]
    assert choice["text"] == ref["text"]
    assert choice["finish_reason"] == "length"
    assert doc["usage"]["completion_tokens"] == MAX_TOKENS


def test_streamed_completion_is_the_same_text(server: str, tiny_hf: tuple[Path, dict[str, Any]]) -> None:
    """Server-sent events up to `data: [DONE]`. How many events carry the text is vLLM's choice: it merges the
    pieces a slow reader has not taken yet (a tiny model can finish before the first event is sent)."""
    events = _stream(server, "/v1/completions", {"prompt": PROMPT, **GREEDY})
    assert "".join(e["choices"][0]["text"] for e in events) == tiny_hf[1]["completion"]["text"]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_completion_is_transformers_greedy_text(server: str, tiny_hf: tuple[Path, dict[str, Any]]) -> None:
    """The chat template is applied as transformers applies it (same prompt ids), then the same greedy text."""
    ref = tiny_hf[1]["chat"]
    doc = _post(server, "/v1/chat/completions", {"messages": MESSAGES, **GREEDY, "return_token_ids": True})
    assert doc["prompt_token_ids"] == ref["prompt_ids"]
    assert doc["choices"][0]["token_ids"] == ref["ids"]
    assert doc["choices"][0]["message"]["content"] == ref["text"]
    assert doc["choices"][0]["finish_reason"] == "length"


def test_streamed_chat_completion_is_the_same_text(server: str, tiny_hf: tuple[Path, dict[str, Any]]) -> None:
    events = _stream(server, "/v1/chat/completions", {"messages": MESSAGES, **GREEDY})
    pieces = [e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]]
    assert "".join(pieces) == tiny_hf[1]["chat"]["text"]
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
