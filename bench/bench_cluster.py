#!/usr/bin/env python3
"""Measure the cluster gateway: its overhead at the same load, and failed requests while a replica is killed.

  python bench/bench_cluster.py [--engine podman] [--clients 4] [--requests 30] [--rounds 3]
                                [--out bench/results-cluster.json]

1. overhead: one service replicated on two nodes (`builder cluster up --local`); the same closed-loop load
   (--clients threads, each sending --requests completions of 16 tokens, greedy) goes straight to replica a,
   then through the gateway with replica b stopped, so both paths end on one server; alternating, --rounds
   times each; p50/p99 latency and requests/s of each round, medians over rounds;
2. replica killed under load: both replicas up, the same load through the gateway, replica b killed after
   a quarter of the requests; failed requests counted (the goal is 0);
3. throughput through the gateway with one replica and with two (only meaningful where each replica has its
   own cores: on a shared 2-core machine both replicas compete for the same cores).
Everything runs on 127.0.0.0/8 with a tiny random-weight model made here; every loop is bounded.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from tinymodel import make_tiny_model  # noqa: E402

PROMPT = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0, "seed": 42}


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def builder(*args: str, timeout: float = 900) -> str:
    proc = subprocess.run([sys.executable, "-m", "builder", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)
    if proc.returncode != 0:
        sys.exit(f"builder {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def load(url: str, headers: dict[str, str], clients: int, count: int,
         during: Callable[[int], None] | None = None) -> dict[str, float]:
    """A closed loop: `clients` threads each sending `count` requests; latencies and failures."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(count):
            started = time.monotonic()
            try:
                resp = requests.post(url, json=PROMPT, headers=headers, timeout=120)
                ok = resp.status_code == 200
            except requests.RequestException as exc:
                ok, resp = False, None
                failures.append(type(exc).__name__)
            with lock:
                if ok:
                    latencies.append(time.monotonic() - started)
                elif resp is not None:
                    failures.append(str(resp.status_code))
                if during is not None:
                    during(len(latencies) + len(failures))

    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    elapsed = time.monotonic() - started
    latencies.sort()
    return {"requests": len(latencies) + len(failures), "failed": len(failures),
            "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else 0.0,
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else 0.0,
            "req_per_s": len(latencies) / elapsed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="podman")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results-cluster.json")
    args = parser.parse_args()

    from builder.build import prepare
    from builder.engines import ENGINES
    from builder.recipes import recipe_path_for
    from builder.source import sha256_file

    folder = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    vocab = prepare(recipe_path_for("cpu")).tree.path / "models" / "ggml-vocab-llama-spm.gguf"
    model = make_tiny_model(vocab, folder / "tiny.gguf")
    port, gateway_port = free_port(), free_port()
    data = {"gateway": {"port": gateway_port, "metrics_port": free_port()},
            "nodes": [{"name": n, "mac": f"52:54:00:00:01:0{i}", "target": "cpu", "memory": "1GiB"}
                      for i, n in enumerate("ab")],
            "services": [{"name": "tiny", "model": "tiny.gguf", "sha256": sha256_file(model), "nodes": ["a", "b"],
                          "port": port, "context": 512, "args": ["-t", "1", "-np", str(args.clients)]}]}
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    engine = ENGINES[args.engine]().command()
    builder("cluster", "up", "--local", str(path), "--engine", args.engine)
    state = json.loads(builder("cluster", "status", "--local", str(path), "--json"))
    key = Path(state["gateway"]["key_file"]).read_text().strip()
    project = Path(state["gateway"]["key_file"]).parent.name
    replica_b = f"{project}-b-tiny-server"
    headers = {"Authorization": f"Bearer {key}"}
    direct = f"http://127.0.0.11:{port}/v1/completions"
    through = f"http://127.0.0.1:{gateway_port}/v1/completions"

    def wait_health(node: str, want: str) -> None:
        for _ in range(60):
            doc = json.loads(builder("cluster", "status", "--local", str(path), "--json"))
            if next(p["health"] for p in doc["services"][0]["processes"] if p["node"] == node) == want:
                return
            time.sleep(1)
        sys.exit(f"replica {node} not {want}")

    results: dict[str, object] = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                              "load_before": os.getloadavg()},
                                  "clients": args.clients, "requests_per_client": args.requests}
    try:
        both = load(through, headers, args.clients, args.requests)
        subprocess.run([*engine, "stop", replica_b], check=True, capture_output=True)
        wait_health("b", "DOWN")
        one = load(through, headers, args.clients, args.requests)
        rounds: dict[str, list[dict[str, float]]] = {"direct": [], "gateway": []}
        for _ in range(args.rounds):
            rounds["direct"].append(load(direct, {}, args.clients, args.requests))
            rounds["gateway"].append(load(through, headers, args.clients, args.requests))
        results["overhead"] = {
            name: {k: statistics.median(r[k] for r in runs) for k in ("p50_ms", "p99_ms", "req_per_s")}
            | {"failed": sum(r["failed"] for r in runs)} for name, runs in rounds.items()}
        results["scaling"] = {"one_replica": one, "two_replicas": both}

        builder("cluster", "up", "--local", str(path))
        wait_health("b", "UP")
        total = args.clients * args.requests
        killed = threading.Event()

        def kill_once(done: int) -> None:
            if done >= total // 4 and not killed.is_set():
                killed.set()
                subprocess.Popen([*engine, "kill", replica_b], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        results["replica_killed"] = load(through, headers, args.clients, args.requests, kill_once)
    finally:
        builder("cluster", "down", "--local", str(path))
    results["machine"]["load_after"] = os.getloadavg()  # type: ignore[index]
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
