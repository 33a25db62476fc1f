"""Helpers for engine tests: images started with `builder run` in the foreground, servers polled on 127.0.0.1."""

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from builder.engines import ENGINES
from conftest import free_port

PROMPT = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "seed": 42}


@contextmanager
def container(engine: str, logs: Path, name: str, role: str, *args: str, target: str = "cpu",
              variant: str | None = None, env: tuple[str, ...] = (), flavour: str | None = None,
              extra: tuple[str, ...] = (), prefix: tuple[str, ...] = ()) -> Iterator[subprocess.Popen[bytes]]:
    """`builder run` in the foreground, as a user would, output to logs/<name>.log; removed afterwards. `prefix`
    runs it under a command (nsenter into a network namespace: the host network it gets is the namespace's)."""
    log = open(logs / f"{name}.log", "wb")
    options = ["--target", target, "--engine", engine, "--name", name, *extra]
    options += ["--variant", variant] if variant else []
    options += ["--flavour", flavour] if flavour else []
    options += [flag for item in env for flag in ("--env", item)]
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "builder", "run", *options, role, *args],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        subprocess.run([*ENGINES[engine]().command(), "rm", "--force", name], capture_output=True)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def wait_healthy(port: int, proc: subprocess.Popen[bytes], log: Path, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited early ({proc.returncode}):\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    pytest.fail(f"server on {port} not healthy after {seconds} s:\n{log.read_text(errors='replace')[-3000:]}")


def complete(port: int, timeout: float = 60) -> str:
    resp = requests.post(f"http://127.0.0.1:{port}/v1/completions", json=PROMPT, timeout=timeout)
    resp.raise_for_status()
    return str(resp.json()["choices"][0]["text"])


def cpu_reference_text(engine: str, logs: Path, model: Path) -> str:
    """The greedy completion of the cpu image on its own: the text every other path must reproduce."""
    port = free_port()
    name = f"builder-test-cpu-{port}"
    with container(engine, logs, name, "server", "-m", str(model), "-c", "256", "-t", "2",
                   "--port", str(port)) as proc:
        wait_healthy(port, proc, logs / f"{name}.log")
        return complete(port)
