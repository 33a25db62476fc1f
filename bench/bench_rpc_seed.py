#!/usr/bin/env python3
"""Measure what pre-seeding an RPC worker's tensor cache saves: bytes the head sends and time to the first token.

  python bench/bench_rpc_seed.py [--rate 1gbit] [--layers 3] [--out bench/results-rpc-seed.json]

A split of the cpu image (one head, one RPC worker) whose two sides live in two network namespaces this script
makes, joined by a veth pair shaped with `tc qdisc … tbf` in both directions (--rate). The model is generated
(random f16 weights, about 1 GB: token embeddings and output 250 MiB each, 16-32 MiB attention and feed-forward
matrices), and loaded three times, each time by a freshly started head:

  a. cold: the worker's tensor cache (ggml-rpc-server -c, on a host folder: `builder run --rpc-cache`) is empty;
  b. rpc-server's own cache: a new worker container on the cache the cold load left;
  c. seeded: a new, empty cache filled by `builder run … rpc-seed MODEL` (timed on its own), then a new worker.

For each: bytes on the head's end of the veth (its tx counter, from the head's start to the first token), and
seconds from starting the head to its first token (/health answering, then a one-token completion); then the
greedy text of a longer completion, which must be equal in all three. Everything runs in the namespaces and
on their own addresses; the namespaces, containers, the model and the caches are removed at the end.
"""

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import requests

from builder.flavours.prepare import prepare
from builder.recipe.load import recipe_path_for

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "support"))
from netns import Namespace, network_namespace  # noqa: E402 - the tests' namespace helper

from tinymodel import make_tiny_model  # noqa: E402 - the tests' random llama writer

HEAD_IP, WORKER_IP = "10.231.0.1", "10.231.0.2"  # only on the veth pair between the two namespaces made here
HEAD_IF, WORKER_IF = "seedh0", "seedw0"
RPC_PORT, HTTP_PORT = 50052, 8080
PROMPT = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "seed": 42}
LIMIT = 600  # seconds any one wait may take


def run(*argv: str, timeout: float = 120) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def builder(*args: str, timeout: float = LIMIT) -> str:
    return run(sys.executable, "-m", "builder", *args, timeout=timeout)


@contextmanager
def linked(rate: str) -> Iterator[tuple[Namespace, Namespace]]:
    """Two namespaces joined by a veth pair (created inside them, never in this machine's own), each end shaped."""
    with network_namespace() as head, network_namespace() as worker:
        run(*head.enter, "ip", "link", "add", HEAD_IF, "type", "veth", "peer", "name", WORKER_IF, "netns",
            str(worker.pid))
        for ns, dev, ip in ((head, HEAD_IF, HEAD_IP), (worker, WORKER_IF, WORKER_IP)):
            run(*ns.enter, "ip", "addr", "add", f"{ip}/30", "dev", dev)
            run(*ns.enter, "ip", "link", "set", dev, "up")
            run(*ns.enter, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "1mb",
                "latency", "100ms")
        yield head, worker


def tx_bytes(ns: Namespace) -> int:
    stats = json.loads(run(*ns.enter, "ip", "-j", "-s", "link", "show", "dev", HEAD_IF))
    return int(stats[0]["stats64"]["tx"]["bytes"])


def start(ns: Namespace, logs: Path, name: str, *args: str) -> subprocess.Popen[bytes]:
    log = open(logs / f"{name}.log", "wb")
    return subprocess.Popen([*ns.enter, sys.executable, "-m", "builder", "run", "--target", "cpu", "--engine",
                             "podman", "--name", name, *args], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def stop(name: str, proc: subprocess.Popen[bytes]) -> None:
    subprocess.run(["podman", "rm", "--force", "--time", "2", name], capture_output=True, timeout=120)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_listening(ns: Namespace, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + LIMIT
    with ns.inside():
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                sys.exit(f"worker exited:\n{log.read_text(errors='replace')[-3000:]}")
            try:
                with socket.create_connection((WORKER_IP, RPC_PORT), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
    sys.exit(f"worker not listening after {LIMIT} s")


def first_token(ns: Namespace, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll the head until it answers, then ask for one token."""
    url = f"http://{HEAD_IP}:{HTTP_PORT}"
    deadline = time.monotonic() + LIMIT
    with ns.inside():
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                sys.exit(f"head exited:\n{log.read_text(errors='replace')[-3000:]}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        else:
            sys.exit(f"head not healthy after {LIMIT} s")
        resp = requests.post(f"{url}/v1/completions", json={**PROMPT, "max_tokens": 1}, timeout=LIMIT)
        resp.raise_for_status()


def text(ns: Namespace) -> str:
    with ns.inside():
        resp = requests.post(f"http://{HEAD_IP}:{HTTP_PORT}/v1/completions", json=PROMPT, timeout=LIMIT)
        resp.raise_for_status()
        return str(resp.json()["choices"][0]["text"])


def load(head: Namespace, worker: Namespace, logs: Path, label: str, model: Path, cache: Path) -> dict[str, object]:
    """A worker on `cache`, then a head started, timed to its first token, its veth bytes counted."""
    w_name, h_name = f"bench-seed-{label}-worker", f"bench-seed-{label}-head"
    w = start(worker, logs, w_name, "--rpc-cache", str(cache), "rpc-worker", "--host", WORKER_IP, "--port",
              str(RPC_PORT))
    try:
        wait_listening(worker, w, logs / f"{w_name}.log")
        before = tx_bytes(head)
        started = time.monotonic()
        h = start(head, logs, h_name, "server", "-m", str(model), "--host", HEAD_IP, "--port", str(HTTP_PORT),
                  "--rpc", f"{WORKER_IP}:{RPC_PORT}", "-ngl", "99", "-c", "256", "-t", "2")
        try:
            first_token(head, h, logs / f"{h_name}.log")
            seconds = time.monotonic() - started
            sent = tx_bytes(head) - before
            greedy = text(head)
        finally:
            stop(h_name, h)
    finally:
        stop(w_name, w)
    files = sorted(cache.iterdir())
    return {"case": label, "bytes_sent": sent, "first_token_s": round(seconds, 2), "text": greedy,
            "cache_files": len(files), "cache_bytes": sum(f.stat().st_size for f in files)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", default="1gbit", help="tbf rate of each direction of the veth pair")
    parser.add_argument("--layers", type=int, default=3, help="layers of the generated model (176 MiB each)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results-rpc-seed.json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run it as root: it makes network namespaces and a veth pair")
    image = json.loads(builder("build", "--target", "cpu", "--engine", "podman", "--json", timeout=5400))["image"]
    vocab = prepare(recipe_path_for("cpu")).tree.path / "models" / "ggml-vocab-llama-spm.gguf"
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-rpc-seed-", dir="/var/tmp")))
        logs = Path(tempfile.gettempdir()) / "bench-rpc-seed-logs"  # kept for a look after a failed run
        shutil.rmtree(logs, ignore_errors=True)
        logs.mkdir()
        started = time.monotonic()
        model = make_tiny_model(vocab, work / "big.gguf", n_layer=args.layers, n_embd=4096, n_head=32, n_ff=2048,
                                std=0.06)
        generated = time.monotonic() - started
        print(f"model: {model.stat().st_size} bytes, generated in {generated:.1f} s", flush=True)
        head, worker = stack.enter_context(linked(args.rate))
        rows = [load(head, worker, logs, "cold", model, work / "cache-a")]
        print(rows[-1] | {"text": ""}, flush=True)
        rows.append(load(head, worker, logs, "rpc-server-cache", model, work / "cache-a"))
        print(rows[-1] | {"text": ""}, flush=True)
        started = time.monotonic()
        seeded = json.loads(builder("run", "--target", "cpu", "--engine", "podman", "--rpc-cache",
                                    str(work / "cache-c"), "rpc-seed", str(model)))
        seed_seconds = time.monotonic() - started
        rows.append(load(head, worker, logs, "seeded", model, work / "cache-c") | {
            "seed_s": round(seed_seconds, 2), "seed": seeded})
        print(rows[-1] | {"text": ""}, flush=True)
        model_bytes = model.stat().st_size
    texts = {row["text"] for row in rows}
    cold = int(str(rows[0]["bytes_sent"]))
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load": os.getloadavg()},
        "image": image, "rate": args.rate, "model_bytes": model_bytes, "layers": args.layers,
        "rows": rows, "texts_equal": len(texts) == 1,
        "seeded_share_of_cold_bytes": round(int(str(rows[2]["bytes_sent"])) / cold, 5),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    return 0 if len(texts) == 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
