"""Ctrl-C, SIGTERM and SIGKILL sent to a real `builder cluster up --local` and `cluster down --local`: nothing
half started stays running, and nothing says "up" that isn't.

The cluster file has one service with two replicas (nodes a and b) whose servers answer only under
`--api-prefix /held`: the gateway's /health checks never pass, so `up` stays in its wait for healthy servers
until it is stopped, and every moment chosen below is reached for certain. A stop while a container started
left it running: `up` counted a container only once its `run` returned (and podman 4.3's `rm --force A B`
silently removes nothing when B does not exist). Everything listens on 127.0.0.0/8.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder.cluster.gateway import gateway_pid
from builder.cluster.local import LABEL, Local
from builder.cluster.model import load_cluster
from builder.core.digests import sha256_file
from conftest import ROOT, free_port, require_engine, require_tool, run_cli
from tinymodel import make_tiny_model

pytestmark = pytest.mark.engine

ENGINE = "podman"
WAIT = 300  # seconds for any one moment to come (a loaded machine starts containers slowly)


@pytest.fixture(scope="module")
def model(cpu_prepared: Any, tmp_path_factory: pytest.TempPathFactory, llama_cpu_image: str) -> tuple[Path, str]:
    require_engine(ENGINE)
    require_tool("haproxy", "haproxy")
    vocab = cpu_prepared.tree.path / "models" / "ggml-vocab-llama-spm.gguf"
    path = make_tiny_model(vocab, tmp_path_factory.mktemp("model") / "tiny.gguf")
    return path, sha256_file(path)


class Held:
    """One cluster file in its own folder: its project (the containers' label), state and ports."""

    def __init__(self, folder: Path, model: tuple[Path, str]) -> None:
        (folder / "tiny.gguf").symlink_to(model[0])
        self.ports = (free_port(), free_port())  # the gateway's, its metrics'
        data = {
            "gateway": {"port": self.ports[0], "metrics_port": self.ports[1]},
            "nodes": [{"name": n, "mac": f"52:54:00:00:01:1{i}", "target": "cpu", "memory": "1GiB"}
                      for i, n in enumerate("ab")],
            "services": [{"name": "held", "model": "tiny.gguf", "sha256": model[1], "nodes": ["a", "b"],
                          "port": free_port(), "context": 256, "args": ["-t", "1", "--api-prefix", "/held"],
                          "unsafe_args": True}],
        }
        self.path = folder / "cluster.yaml"
        self.path.write_text(yaml.safe_dump(data))
        local = Local.of(load_cluster(self.path))
        self.project, self.pidfile = local.project, local.pidfile
        self.config = str(local.state / "haproxy.cfg")

    def cli(self, verb: str, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return run_cli("cluster", verb, "--local", str(self.path), *extra, timeout=timeout)

    def start(self, verb: str, *extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "builder", "cluster", verb, "--local", str(self.path),
                                 *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)

    def up(self) -> subprocess.Popen[str]:
        return self.start("up", "--engine", ENGINE, "--timeout", "900")

    def containers(self) -> list[str]:
        """Every container of this cluster, running or not."""
        proc = subprocess.run([ENGINE, "ps", "--all", "--filter", f"label={LABEL}={self.project}", "--format",
                               "{{.Names}}"], capture_output=True, text=True, timeout=60, check=True)
        return proc.stdout.split()

    def gateways(self) -> list[int]:
        """Every HAProxy running this cluster's config, pidfile or not: its master (master-worker mode), whose
        worker is its child and not counted."""
        found = {}
        for entry in Path("/proc").iterdir():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if argv and argv[0].endswith(b"haproxy") and self.config.encode() in argv:
                found[int(entry.name)] = ppid
        return sorted(pid for pid, ppid in found.items() if ppid not in found)

    def status(self) -> dict[str, Any]:
        proc = self.cli("status", "--json", timeout=120)
        document = dict(json.loads(proc.stdout))
        # exit 0 exactly when everything serves: a script acting on `status` sees what a person sees
        assert proc.returncode == (0 if document["ok"] else 1) and document["ok"] == (not document["problems"])
        return document

    def assert_nothing_left(self) -> None:
        assert self.containers() == [], "containers left behind"
        assert self.gateways() == [], "a gateway left running"
        for port in self.ports:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port))  # raises when something still listens there
        document = self.status()
        assert document["gateway"]["running"] is False
        assert {p["container"] for s in document["services"] for p in s["processes"]} == {"absent"}

    def clean(self) -> None:
        """What a failing test may have left: `down`, then by label and by config, whatever `down` missed."""
        self.cli("down")
        names = self.containers()
        if names:
            subprocess.run([ENGINE, "rm", "--force", *names], capture_output=True, timeout=120)
        for pid in self.gateways():
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def held(tmp_path: Path, model: tuple[Path, str]) -> Iterator[Held]:
    cluster = Held(tmp_path, model)
    try:
        yield cluster
    finally:
        cluster.clean()


def wait_for(proc: subprocess.Popen[str], check: Callable[[], object], what: str, pause: float = 0.1) -> None:
    """Poll until `check` holds; fail if the process ended first or the wait runs out."""
    deadline = time.monotonic() + WAIT
    while not check():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"it exited {proc.returncode} before {what}:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {WAIT} s")
        time.sleep(pause)


def first_container(held: Held) -> Callable[[], bool]:
    return lambda: bool(held.containers())


def gateway_up(held: Held) -> Callable[[], bool]:
    return lambda: gateway_pid(held.pidfile) is not None


def child_running(proc: subprocess.Popen[str], word: str) -> Callable[[], bool]:
    """A child of `proc` whose argv has `word` (e.g. the engine's `rm`) is running."""
    def check() -> bool:
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            if ppid == proc.pid and word.encode() in argv:
                return True
        return False
    return check


def stopped(proc: subprocess.Popen[str], code: int) -> None:
    """It exits `code` with one line about it, no error and no traceback."""
    _, err = proc.communicate(timeout=120)
    lines = err.splitlines()
    assert proc.returncode == code, err[-3000:]
    assert lines[-1] == {130: "interrupted", 143: "terminated"}[code], err[-3000:]
    assert "Traceback" not in err and not [line for line in lines if line.startswith("error")], err[-3000:]


@pytest.mark.parametrize("moment", ["first container", "gateway"])
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["int", "term"])
def test_a_stopped_up_leaves_nothing_running(held: Held, signum: int, code: int, moment: str) -> None:
    proc = held.up()
    try:
        wait_for(proc, first_container(held) if moment == "first container" else gateway_up(held), moment,
                 pause=0.05)
        proc.send_signal(signum)
        stopped(proc, code)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    held.assert_nothing_left()


def killed_up(held: Held) -> None:
    """`up` killed (no clean-up can run) once its gateway runs: both servers and the gateway stay."""
    proc = held.up()
    try:
        wait_for(proc, gateway_up(held), "gateway")
    finally:
        proc.kill()
        proc.communicate(timeout=60)


def test_a_killed_up_is_not_reported_up_and_down_removes_it(held: Held) -> None:
    killed_up(held)
    assert len(held.containers()) == 2 and len(held.gateways()) == 1

    document = held.status()
    assert document["gateway"]["running"] is True  # true: its HAProxy runs
    healths = [p["health"] for s in document["services"] for p in s["processes"]]
    assert len(healths) == 2 and "UP" not in healths, healths  # yet no server serves

    down = held.cli("down")
    assert down.returncode == 0, down.stderr
    assert down.stdout.startswith("removed ") and "gateway" in down.stdout, down.stdout
    assert all(name in down.stdout for name in (f"{held.project}-a-held-server", f"{held.project}-b-held-server"))
    held.assert_nothing_left()
    again = held.cli("down")
    assert again.returncode == 0 and again.stdout.strip() == "nothing was running", again.stdout + again.stderr


def test_a_stopped_down_is_finished_by_the_next(held: Held) -> None:
    killed_up(held)
    down = held.start("down")
    try:
        wait_for(down, child_running(down, "rm"), "the engine's rm", pause=0.02)
        down.send_signal(signal.SIGTERM)
        stopped(down, 143)
    finally:
        if down.poll() is None:
            down.kill()
            down.communicate()
    again = held.cli("down")
    assert again.returncode == 0, again.stderr
    assert "gateway" in again.stdout, again.stdout  # the stopped one never got to it
    held.assert_nothing_left()
