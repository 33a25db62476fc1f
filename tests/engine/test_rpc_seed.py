"""RPC workers that fill their tensor cache from their own GGUF (llama-rpc-seed), against the real ggml-rpc-server.

This pins builder's copy of the cache format to the pinned llama.cpp: the files builder writes must be the ones
ggml-rpc-server writes itself after a cold load (names and bytes), and a worker given them must take the head's
hashes instead of its tensors. A llama.cpp whose cache format differs (hash, names, size threshold, folder) fails
here. The model is the tiny random one made wider (n_embd 192), so that its output layer (12 MB, placed on the
worker) and its token embeddings (kept on the head) pass ggml-rpc's 10 MiB threshold: 27 MB in all.
"""

import json
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import pytest

from builder.pipeline.flavour import Prepared
from conftest import free_port, run_cli
from containers import complete, container, wait_healthy
from tinymodel import make_tiny_model

pytestmark = pytest.mark.engine

THRESHOLD = 10 * 1024 * 1024  # ggml-rpc.cpp's HASH_THRESHOLD: tensors above it go by hash
FORMAT_HINT = "ggml-rpc-server's tensor cache format is not the one images/qualify/llama-rpc-seed.c writes: update it"
SAVED = re.compile(r"\[set_tensor\] saved to '/var/cache/llama\.cpp/rpc/([0-9a-f]{16})'")
HIT = re.compile(r"\[set_tensor_hash\] .* hash: ([0-9a-f]+)")


@dataclass(frozen=True)
class Load:
    text: str
    worker_log: str
    cache: Path

    def files(self) -> dict[str, bytes]:
        return {f.name: f.read_bytes() for f in sorted(self.cache.iterdir())}


@pytest.fixture(scope="module")
def wide_model(cpu_prepared: Prepared, tmp_path_factory: pytest.TempPathFactory) -> Path:
    vocab = cpu_prepared.tree.path / "models" / "ggml-vocab-llama-spm.gguf"
    return make_tiny_model(vocab, tmp_path_factory.mktemp("wide") / "wide.gguf", n_embd=192)


def _large_tensors(model: Path) -> list[str]:
    return [t.name for t in gguf.GGUFReader(model).tensors if int(t.n_bytes) > THRESHOLD]


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"worker exited early:\n{log.read_text(errors='replace')[-3000:]}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"worker on {port} not listening after {seconds} s:\n{log.read_text(errors='replace')[-3000:]}")


def split_load(logs: Path, label: str, model: Path, cache: Path, *worker_args: str) -> Load:
    """A head and one RPC worker (its tensor cache in `cache`, ggml-rpc's debug lines on) loading `model`."""
    worker, head = free_port(), free_port()
    tag = f"builder-test-seed-{label}-{worker}"
    worker_log = logs / f"{tag}-w.log"
    with container("podman", logs, f"{tag}-w", "rpc-worker", "--port", str(worker), *worker_args,
                   env=("GGML_RPC_DEBUG=1",), extra=("--rpc-cache", str(cache))) as w:
        _wait_listening(worker, w, worker_log)
        with container("podman", logs, f"{tag}-h", "server", "-m", str(model), "-c", "256", "-t", "2",
                       "--port", str(head), "--rpc", f"127.0.0.1:{worker}", "-ngl", "99") as h:
            wait_healthy(head, h, logs / f"{tag}-h.log")
            text = complete(head)
    return Load(text, worker_log.read_text(errors="replace"), cache)


@pytest.fixture(scope="module")
def cold(llama_cpu_image: str, wide_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Load:
    """A first load onto a worker with an empty cache: the head sends every tensor, the worker saves the large
    ones under its own names."""
    logs = tmp_path_factory.mktemp("cold")
    load = split_load(logs, "cold", wide_model, logs / "cache")
    assert len(set(load.text.split())) > 5, f"degenerate text: {load.text!r}"
    return load


def test_the_cache_rpc_server_writes_after_a_cold_load_equals_builders(
        cold: Load, wide_model: Path, tmp_path: Path) -> None:
    saved = SAVED.findall(cold.worker_log)
    assert saved, f"the cold worker saved no tensor in its cache: {FORMAT_HINT}\n{cold.worker_log[-2000:]}"
    # The placement of this split: every layer and the output on the worker; the token embeddings stay on the head.
    placed = tmp_path / "placed.txt"
    placed.write_text("".join(f"{name}\n" for name in _large_tensors(wide_model) if name != "token_embd.weight"))
    seeded = tmp_path / "seeded"
    proc = run_cli("run", "--target", "cpu", "--engine", "podman", "--rpc-cache", str(seeded), "rpc-seed",
                   str(wide_model), "--tensors", str(placed), "--list", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *listed, summary = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(t["tensor"], t["state"]) for t in listed] == [("output.weight", "written")]
    assert summary["written"] == 1 and summary["threshold_bytes"] == THRESHOLD
    builders = {f.name: f.read_bytes() for f in sorted(seeded.iterdir())}
    assert sorted(builders) == sorted(cold.files()) == sorted(saved), FORMAT_HINT
    assert builders == cold.files(), FORMAT_HINT

    again = run_cli("run", "--target", "cpu", "--engine", "podman", "--rpc-cache", str(seeded), "rpc-seed",
                    str(wide_model), "--tensors", str(placed), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout) | {"model": "", "cache": ""} == summary | {
        "model": "", "cache": "", "written": 0, "present": 1, "written_bytes": 0}


def test_a_worker_seeded_from_its_own_gguf_takes_hashes_and_answers_the_same(
        cold: Load, wide_model: Path, tmp_path: Path) -> None:
    seeded = split_load(tmp_path, "seeded", wide_model, tmp_path / "cache", "--seed", str(wide_model))
    report = re.search(r"rpc-worker: seeded /var/cache/llama\.cpp/rpc from /models/wide\.gguf: (\{.*\})",
                       seeded.worker_log)
    assert report, seeded.worker_log[-3000:]
    assert json.loads(report[1])["written"] == len(_large_tensors(wide_model))
    # Every tensor the cold worker had to be sent is now a cache hit, and none is sent (nor saved) again.
    hits = {h.rjust(16, "0") for h in HIT.findall(seeded.worker_log)}
    assert set(SAVED.findall(cold.worker_log)) <= hits, f"{FORMAT_HINT}\n{seeded.worker_log[-3000:]}"
    assert not SAVED.findall(seeded.worker_log), f"the head sent tensors builder had seeded: {FORMAT_HINT}"
    assert seeded.text == cold.text
