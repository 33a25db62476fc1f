#!/usr/bin/env python3
"""Measure publishing the cpu image to a local registry (docker-registry on 127.0.0.1, plain HTTP).

  python bench/bench_publish.py [--engine podman] [--runs 3]

1. first publish to an empty registry (export, SBOM, every blob sent, verify, tag), per engine;
2. publish again (the content tag exists: one HEAD, nothing built or sent), median of --runs;
3. pull back by tag with the engine, and the bytes that went over the wire (the registry's blob store).
The image must exist locally already (`builder build --target cpu`).
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "support"))
sys.path.insert(0, str(ROOT / "tests"))

from registry import start_registry  # noqa: E402


def cli(*args: str) -> tuple[float, dict[str, object]]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "builder", *args, "--json"], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    return time.monotonic() - started, json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", action="append", choices=["podman", "docker"])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for engine in args.engine or ["podman"]:
        with tempfile.TemporaryDirectory() as tmp, start_registry(Path(tmp)) as reg:
            target = f"{reg.host}/builder"
            first, doc = cli("publish", "--target", "cpu", "--engine", engine, "--registry", target)
            assert doc["pushed"], doc
            again = [cli("publish", "--target", "cpu", "--engine", engine, "--registry", target)[0]
                     for _ in range(args.runs)]
            stored = sum(f.stat().st_size for f in (Path(tmp) / "storage").rglob("data") if f.is_file())
            pulled_ref = f"{target}:cpu-cpu"
            started = time.monotonic()
            pull = ["--tls-verify=false"] if engine == "podman" else []
            subprocess.run([engine, "pull", "-q", *pull, pulled_ref], check=True, capture_output=True)
            pull_s = time.monotonic() - started
            subprocess.run([engine, "rmi", pulled_ref], capture_output=True)
            print(f"{engine}: first publish {first:.1f} s, republish (skip) median {statistics.median(again):.2f} s, "
                  f"pull back {pull_s:.1f} s, registry holds {stored / 1e6:.1f} MB, digest {doc['digest']}")


if __name__ == "__main__":
    main()
