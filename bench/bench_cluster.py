#!/usr/bin/env python3
"""Measure the cluster gateway: its overhead at the same load, and failed requests while a replica is killed.

  python bench/bench_cluster.py [--engine podman] [--clients 4] [--requests 25] [--rounds 9]
                                [--tokens 16,128] [--out bench/results-cluster.json]

1. overhead: one service replicated on two nodes (`builder cluster up --local`); the same closed-loop load
   (--clients threads, each keeping its connection alive as the OpenAI SDK does, sending --requests greedy
   completions of --tokens tokens) goes straight to replica a and through the gateway with replica b stopped,
   so both paths end on one server. Short rounds in pairs, the order swapped every pair (direct, gateway,
   gateway, direct, …), so drifting load from other work hits both paths alike; throughput loss is the median
   of the pairs' ratios, latencies are pooled. HAProxy's and the server's CPU time per request come from
   /proc: on a machine whose cores are all busy, the gateway's CPU is what the server loses. Then the same
   load interleaved: every client alternates direct and gateway requests, so both see the same moment's
   load; the ratio of mean latencies, median over rounds;
2. replica killed under load: both replicas up, the same load through the gateway, replica b killed after
   a quarter of the requests; failed requests counted (the goal is 0);
3. throughput through the gateway with one replica and with two (only meaningful where each replica has its
   own cores: on a shared 2-core machine both replicas compete for the same cores).

  python bench/bench_cluster.py --baseline REV [--rounds 5] [--requests 100] [--tokens 16]

instead compares two gateways in front of the same one replica, in one invocation: A is HAProxy with the
config the gateway renderer of git revision REV writes (builder/cluster/gateway.py at REV, loaded from
`git show` into a module of its own and started the way REV started it), B the gateway `cluster up --local`
starts now; both run at once on their own ports. Rounds of the same load alternate A, B, B, A, …; each
round's HAProxy CPU time per request comes from /proc/PID/stat (user + system, every thread); the result is
the median per gateway and their ratio B / A.
Everything runs on 127.0.0.0/8 with a tiny random-weight model made here; every loop is bounded.
"""

import argparse
import importlib.util
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
from types import ModuleType

import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "support"))
sys.path.insert(0, str(ROOT / "tests"))

from tinymodel import make_tiny_model  # noqa: E402

PROMPT = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0, "seed": 42}
TICK = os.sysconf("SC_CLK_TCK")


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


def cpu_seconds(pid: int) -> float:
    """User and system time of a whole process (every thread) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def cpu_ns(pid: int) -> int:
    """Time on a CPU of every thread of a process so far, in ns (/proc/PID/task/*/schedstat): finer than
    /proc/PID/stat's clock ticks (10 ms), for threads that live as long as the process (HAProxy's)."""
    return sum(int((task / "schedstat").read_text().split()[0]) for task in Path(f"/proc/{pid}/task").iterdir())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else 0.0


def load(url: str, headers: dict[str, str], clients: int, count: int,
         during: Callable[[int], None] | None = None, tokens: int = 16,
         latencies: list[float] | None = None) -> dict[str, float]:
    """A closed loop: `clients` threads each sending `count` requests on one kept-alive connection."""
    latencies = [] if latencies is None else latencies
    mine: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    body = {**PROMPT, "max_tokens": tokens}

    def client() -> None:
        session = requests.Session()
        for _ in range(count):
            started = time.monotonic()
            try:
                resp = session.post(url, json=body, headers=headers, timeout=120)
                ok = resp.status_code == 200
            except requests.RequestException as exc:
                ok, resp = False, None
                failures.append(type(exc).__name__)
            with lock:
                if ok:
                    mine.append(time.monotonic() - started)
                elif resp is not None:
                    failures.append(str(resp.status_code))
                if during is not None:
                    during(len(mine) + len(failures))

    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    elapsed = time.monotonic() - started
    latencies += mine
    return {"requests": len(mine) + len(failures), "failed": len(failures),
            "p50_ms": 1000 * percentile(mine, 0.5), "p99_ms": 1000 * percentile(mine, 0.99),
            "req_per_s": len(mine) / elapsed}


def interleaved(direct: str, through: str, headers: dict[str, str], args: argparse.Namespace,
                tokens: int) -> dict[str, object]:
    """Every client alternates direct and gateway requests, so both paths see the same load at the same moment;
    the gateway's cost is the ratio of mean latencies (in a closed loop, throughput is clients / mean latency)."""
    count = 2 * max(6, round(args.requests * 16 / tokens))
    body = {**PROMPT, "max_tokens": tokens}
    pooled: dict[str, list[float]] = {"direct": [], "gateway": []}
    ratios = []
    for _ in range(args.rounds):
        rounds: dict[str, list[float]] = {"direct": [], "gateway": []}
        lock = threading.Lock()

        def client(first: int, rounds: dict[str, list[float]] = rounds, lock: threading.Lock = lock) -> None:
            session = requests.Session()
            for i in range(count):
                name = ("direct", "gateway")[(first + i) % 2]
                url, hdrs = (direct, {}) if name == "direct" else (through, headers)
                started = time.monotonic()
                resp = session.post(url, json=body, headers=hdrs, timeout=120)
                if resp.status_code == 200:
                    with lock:
                        rounds[name].append(time.monotonic() - started)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        ratios.append(statistics.mean(rounds["gateway"]) / statistics.mean(rounds["direct"]))
        for name in pooled:
            pooled[name] += rounds[name]
    return {"tokens": tokens, "requests_per_path": {n: len(v) for n, v in pooled.items()},
            "mean_latency_overhead_pct": 100 * (statistics.median(ratios) - 1),
            "round_ratios": [round(r, 3) for r in ratios],
            **{n: {"p50_ms": 1000 * percentile(v, 0.5), "p99_ms": 1000 * percentile(v, 0.99)}
               for n, v in pooled.items()}}


def overhead(direct: str, through: str, headers: dict[str, str], args: argparse.Namespace, tokens: int,
             pids: dict[str, int]) -> dict[str, object]:
    """Direct and gateway rounds in pairs (order swapped every pair); pooled latencies, median of pair ratios."""
    paths = {"direct": (direct, {}), "gateway": (through, headers)}
    # rounds of about the same length whatever the completion's length
    count = max(6, round(args.requests * 16 / tokens))
    latencies: dict[str, list[float]] = {"direct": [], "gateway": []}
    rates: dict[str, list[float]] = {"direct": [], "gateway": []}
    cpu = {(who, path): 0.0 for who in pids for path in paths}
    failed = 0
    for url, hdrs in paths.values():  # warm both paths (connections, caches)
        load(url, hdrs, args.clients, 2, tokens=tokens)
    for i in range(args.rounds):
        for name in (("direct", "gateway") if i % 2 == 0 else ("gateway", "direct")):
            url, hdrs = paths[name]
            before = {who: cpu_seconds(pid) for who, pid in pids.items()}
            result = load(url, hdrs, args.clients, count, tokens=tokens, latencies=latencies[name])
            for who, pid in pids.items():
                cpu[(who, name)] += cpu_seconds(pid) - before[who]
            rates[name].append(result["req_per_s"])
            failed += int(result["failed"])
    per_path = args.rounds * args.clients * count
    ratios = [g / d for d, g in zip(rates["direct"], rates["gateway"], strict=True)]
    out: dict[str, object] = {
        name: {"p50_ms": 1000 * percentile(latencies[name], 0.5), "p99_ms": 1000 * percentile(latencies[name], 0.99),
               "req_per_s": statistics.median(rates[name]), "requests": per_path}
        for name in paths}
    out.update(
        failed=failed, tokens=tokens,
        throughput_loss_pct=100 * (1 - statistics.median(ratios)),
        p50_added_ms=1000 * (percentile(latencies["gateway"], 0.5) - percentile(latencies["direct"], 0.5)),
        pair_ratios=[round(r, 3) for r in ratios],
        haproxy_cpu_ms_per_request=1000 * cpu[("haproxy", "gateway")] / per_path,
        # where every core is busy, the share of a request's CPU that the gateway takes from the server
        haproxy_cpu_share_pct=100 * cpu[("haproxy", "gateway")] / max(1e-9, cpu[("haproxy", "gateway")]
                                                                      + cpu[("server", "gateway")]),
        server_cpu_ms_per_request={name: 1000 * cpu[("server", name)] / per_path for name in paths})
    return out


def gateway_at(rev: str) -> ModuleType:
    """builder/cluster/gateway.py as it was at git revision `rev`, as a module of its own (its imports are
    today's builder modules: the model it reads has only grown)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:builder/cluster/gateway.py"], check=True,
                            capture_output=True, text=True, timeout=60).stdout
    spec = importlib.util.spec_from_loader(f"gateway_{rev}", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f"{rev}:builder/cluster/gateway.py", "exec"), module.__dict__)  # noqa: S102
    return module


def ab_gateways(rev: str, cluster: dict[str, object], folder: Path, now: tuple[str, dict[str, str], int],
                args: argparse.Namespace) -> dict[str, object]:
    """HAProxy's CPU per request with REV's gateway config (A) and today's (B), in front of the same replica,
    in alternating rounds (A B B A …) of the same closed-loop load."""
    from builder.cluster.model import load_cluster

    old = gateway_at(rev)
    data = json.loads(json.dumps(cluster))
    port = free_port()
    data["gateway"] = {"port": port, "metrics_port": free_port()}
    path = folder / "cluster-baseline.yaml"
    path.write_text(yaml.safe_dump(data))
    state = folder / "baseline-state"
    state.mkdir()
    loaded = load_cluster(path)
    config = old.write_gateway(loaded, state, "127.0.0.1", {"a": "127.0.0.11"})
    old.start_gateway(config, state / "haproxy.pid")
    try:
        pid = old.gateway_pid(state / "haproxy.pid")
        assert pid is not None
        key = (state / "api-key").read_text().strip()
        gateways = {"A": (f"http://127.0.0.1:{port}/v1/completions", {"Authorization": f"Bearer {key}"}, pid),
                    "B": now}
        tokens = int(args.tokens.split(",")[0])
        for url, headers, _ in gateways.values():  # both see the replica healthy, connections warm
            for _ in range(60):
                if load(url, headers, 1, 1, tokens=tokens)["failed"] == 0:
                    break
                time.sleep(1)
            load(url, headers, args.clients, 2, tokens=tokens)
        per_request: dict[str, list[float]] = {"A": [], "B": []}
        fine: dict[str, list[float]] = {"A": [], "B": []}
        latencies: dict[str, list[float]] = {"A": [], "B": []}
        failed = 0
        for i in range(args.rounds):
            for name in (("A", "B") if i % 2 == 0 else ("B", "A")):
                url, headers, gateway = gateways[name]
                before, before_ns = cpu_seconds(gateway), cpu_ns(gateway)
                result = load(url, headers, args.clients, args.requests, tokens=tokens, latencies=latencies[name])
                per_request[name].append(1000 * (cpu_seconds(gateway) - before) / result["requests"])
                fine[name].append((cpu_ns(gateway) - before_ns) / 1e6 / result["requests"])
                failed += int(result["failed"])
    finally:
        old.stop_gateway(state / "haproxy.pid")
    medians = {name: statistics.median(values) for name, values in per_request.items()}
    fine_medians = {name: statistics.median(values) for name, values in fine.items()}
    return {"baseline": rev, "tokens": tokens, "rounds_each": args.rounds,
            "requests_per_round": args.clients * args.requests, "failed": failed,
            "haproxy_cpu_ms_per_request": {name: [round(v, 3) for v in values] for name, values in per_request.items()},
            "median_ms": {name: round(v, 3) for name, v in medians.items()},
            "ratio_b_over_a": round(medians["B"] / medians["A"], 3),
            # the same from schedstat, in ns: no 10 ms clock-tick steps
            "schedstat_ms_per_request": {name: [round(v, 4) for v in values] for name, values in fine.items()},
            "schedstat_median_ms": {name: round(v, 4) for name, v in fine_medians.items()},
            "schedstat_ratio_b_over_a": round(fine_medians["B"] / fine_medians["A"], 3),
            "p50_ms": {name: round(1000 * percentile(v, 0.5), 1) for name, v in latencies.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="podman")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=25,
                        help="per client and round at 16 tokens (fewer for longer completions)")
    parser.add_argument("--rounds", type=int, default=9, help="pairs of direct and gateway rounds")
    parser.add_argument("--tokens", default="16,128", help="completion lengths to measure the overhead at")
    parser.add_argument("--out", type=Path, default=None,
                        help="default bench/results-cluster.json (with --baseline: bench/results-gateway-ab.json)")
    parser.add_argument("--baseline", metavar="REV", help="only compare HAProxy's CPU per request with the gateway "
                        "config of git revision REV (A) and today's (B), in alternating rounds")
    args = parser.parse_args()
    out = args.out or ROOT / "bench" / ("results-gateway-ab.json" if args.baseline else "results-cluster.json")

    from builder.cluster.gateway import gateway_pid
    from builder.core.digests import sha256_file
    from builder.engines import ENGINES
    from builder.flavours.prepare import prepare
    from builder.recipe.load import recipe_path_for

    folder = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    vocab = prepare(recipe_path_for("cpu")).tree.path / "models" / "ggml-vocab-llama-spm.gguf"
    model = make_tiny_model(vocab, folder / "tiny.gguf")
    port, gateway_port = free_port(), free_port()
    data = {"gateway": {"port": gateway_port, "metrics_port": free_port()},
            "nodes": [{"name": n, "mac": f"52:54:00:00:01:0{i}", "target": "cpu", "memory": "1GiB"}
                      for i, n in enumerate("a" if args.baseline else "ab")],
            "services": [{"name": "tiny", "model": "tiny.gguf", "sha256": sha256_file(model),
                          "nodes": ["a"] if args.baseline else ["a", "b"],
                          "port": port,
                          # every slot holds the prompt and the longest completion
                          "context": args.clients * (max(int(t) for t in args.tokens.split(",")) + 32),
                          "args": ["-t", "1", "-np", str(args.clients)]}]}
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
        if args.baseline:
            haproxy = gateway_pid(Path(state["gateway"]["key_file"]).parent / "haproxy.pid")
            assert haproxy is not None
            results["gateway_ab"] = ab_gateways(args.baseline, data, folder, (through, headers, haproxy), args)
            return finish(results, out)
        both = load(through, headers, args.clients, args.requests)
        subprocess.run([*engine, "stop", replica_b], check=True, capture_output=True)
        wait_health("b", "DOWN")
        one = load(through, headers, args.clients, args.requests)
        haproxy = gateway_pid(Path(state["gateway"]["key_file"]).parent / "haproxy.pid")
        server = int(subprocess.run([*engine, "inspect", "--format", "{{.State.Pid}}", f"{project}-a-tiny-server"],
                                    check=True, capture_output=True, text=True).stdout)
        assert haproxy is not None
        results["overhead"] = [overhead(direct, through, headers, args, int(tokens),
                                        {"haproxy": haproxy, "server": server})
                               for tokens in args.tokens.split(",")]
        results["interleaved"] = [interleaved(direct, through, headers, args, int(tokens))
                                  for tokens in args.tokens.split(",")]
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
    return finish(results, out)


def finish(results: dict[str, object], out: Path) -> int:
    results["machine"]["load_after"] = os.getloadavg()  # type: ignore[index]
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
