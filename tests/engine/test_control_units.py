"""The control node survives its own reboot: the units `builder pxe serve --install` and `builder cluster up
--install` write, run by a real systemd (PID 1 of a Debian trixie container bootstrapped by builder itself,
tests/support/systemd_box.py), and checked as an operator would: `systemctl is-active`, the server answers, a
killed server is started again, a re-run changes nothing, a changed unit is restarted, and after the container
restarts (its systemd boots again) the servers are back.

The container has no network but its own loopback (`--network none`): every server binds 127.0.0.x, dnsmasq
answers on `lo` only, and no packet leaves it.
"""

import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from systemd_box import SYSTEMD_BOX
from test_cluster import MODEL, SHA
from test_netboot import fake_artifacts, publish

from builder.engines.podman import PodmanEngine
from builder.fetch.bootstrap import ensure_base
from conftest import ROOT, require_engine, require_tool

pytestmark = pytest.mark.engine

SETTLE = 60  # seconds for a unit to come back, or for systemd to finish booting (bounded polls, 0.5 s apart)
PROBE = """
import sys, urllib.request
request = urllib.request.Request(sys.argv[1], headers=dict([sys.argv[2].split(": ", 1)]) if sys.argv[2:] else {})
try:
    with urllib.request.urlopen(request, timeout=5) as answer:
        sys.stdout.write(answer.read().decode())
except OSError as exc:
    sys.exit(f"no answer: {exc}")
"""


@dataclass
class Box:
    """One container whose PID 1 is systemd, this checkout at /src (read-only) and a work folder at /work."""

    name: str
    work: Path
    command: list[str]

    def run(self, *argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*self.command, "exec", "--workdir", "/src", self.name, *argv],
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            journal = subprocess.run([*self.command, "exec", self.name, "journalctl", "--no-pager", "-n", "30"],
                                     capture_output=True, text=True, timeout=60).stdout
            pytest.fail(f"{' '.join(argv)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n"
                        f"the journal's last lines:\n{journal}")
        return proc

    def builder(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("python3", "-m", "builder", *args, check=check, timeout=300)

    def get(self, url: str, *header: str) -> subprocess.CompletedProcess[str]:
        return self.run("python3", "/work/probe.py", url, *header, check=False, timeout=30)

    def state(self, unit: str) -> str:
        return self.run("systemctl", "is-active", unit, check=False).stdout.strip()

    def main_pid(self, unit: str) -> int:
        return int(self.run("systemctl", "show", "--property=MainPID", "--value", unit).stdout)

    def wait(self, what: str, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + SETTLE
        while not ready():
            if time.monotonic() > deadline:
                journal = self.run("journalctl", "--no-pager", "-n", "40", check=False).stdout
                pytest.fail(f"{what} not within {SETTLE} s; the journal's last lines:\n{journal}")
            time.sleep(0.5)

    def booted(self) -> None:
        """systemd finished starting the system (degraded: a unit the container cannot run, e.g. haproxy's own)."""
        self.wait("systemd's boot", lambda: self.run("systemctl", "is-system-running", check=False)
                  .stdout.strip() in ("running", "degraded"))

    def reboot(self) -> None:
        subprocess.run([*self.command, "restart", "--time", "30", self.name], check=True, capture_output=True,
                       timeout=120)
        self.booted()

    def kill_main(self, unit: str) -> int:
        """SIGKILL the unit's main process (as a crash would, not through systemctl); its pid."""
        pid = self.main_pid(unit)
        self.run("kill", "-9", str(pid))
        return pid


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    require_engine("podman")
    require_tool("mmdebstrap", "mmdebstrap")
    engine = PodmanEngine()
    started = time.monotonic()
    image = ensure_base(engine, SYSTEMD_BOX)  # cached by its inputs: bootstrapped on the first run only
    print(f"\nsystemd box {image}: {time.monotonic() - started:.0f} s to make or find")
    work = tmp_path_factory.mktemp("units")
    work.chmod(0o755)  # like /srv: dnsmasq's own user reads pxe-root/tftp (`--install` refuses a closed folder)
    (work / "probe.py").write_text(PROBE)
    name = f"builder-units-{uuid.uuid4().hex[:8]}"
    command = engine.command()
    # dnsmasq needs CAP_NET_ADMIN and CAP_NET_RAW (podman leaves them out by default); they act on the
    # container's own network, which is its loopback alone
    subprocess.run([*command, "run", "--detach", "--name", name, *engine.container_flags(), "--network", "none",
                    "--cap-add", "NET_ADMIN,NET_RAW",
                    "--systemd", "always", "--volume", f"{ROOT}:/src:ro", "--volume", f"{work}:/work",
                    image, "/sbin/init"], check=True, capture_output=True, timeout=120)
    try:
        found = Box(name, work, command)
        found.booted()
        yield found
    finally:
        subprocess.run([*command, "rm", "--force", "--time", "5", name], capture_output=True, timeout=120)


def pxe_root(work: Path) -> Path:
    """A published generation whose control node is the container's loopback, dnsmasq answering on `lo` only."""
    path = work / "cluster.yaml"
    path.write_text(yaml.safe_dump({
        "control": {"address": "127.0.0.1", "http_port": 8000, "subnet": "127.0.0.0", "interface": "lo"},
        "nodes": [{"name": "node1", "mac": "52:54:00:12:34:56", "target": "cpu", "role": "rpc-worker"}]}))
    folder, manifest = fake_artifacts(work, "a")
    publish(work / "pxe-root", path, {("cpu", "cpu"): (folder, manifest)})
    return work / "pxe-root"


def test_boot_server_and_dnsmasq_run_under_systemd_and_come_back(box: Box) -> None:
    pxe_root(box.work)
    boot_file = "http://127.0.0.1:8000/current/boot.ipxe"
    install = ("pxe", "serve", "--install", "--root", "/work/pxe-root", "--dnsmasq")
    first = box.builder(*install)
    assert "builder-pxe.service      installed; enabled at boot, running" in first.stdout
    assert "builder-dnsmasq.service  installed; enabled at boot, running" in first.stdout
    assert box.state("builder-pxe.service") == "active" and box.state("builder-dnsmasq.service") == "active"
    # Type=notify: `--install` returned once the server listened, so it answers at once
    assert box.get(boot_file).stdout.startswith("#!ipxe")
    # dnsmasq serves TFTP on the loopback only (its config binds `lo`), as its own user, not root
    sockets = box.run("ss", "-H", "-uln", "sport = :69").stdout
    assert "127.0.0.1:69" in sockets and "0.0.0.0:69" not in sockets, sockets
    dnsmasq_user = box.run("ps", "-o", "user=", "-p", str(box.main_pid("builder-dnsmasq.service"))).stdout.strip()
    assert dnsmasq_user != "root"

    # a crash: systemd starts it again
    killed = box.kill_main("builder-pxe.service")
    box.wait("the boot server after kill -9", lambda: box.state("builder-pxe.service") == "active"
             and box.main_pid("builder-pxe.service") not in (0, killed))
    assert box.get(boot_file).stdout.startswith("#!ipxe")
    box.run("systemctl", "restart", "builder-pxe.service")
    assert box.get(boot_file).stdout.startswith("#!ipxe")
    assert box.state("builder-dnsmasq.service") == "active"  # restarted with it (PartOf)

    # the same command again changes nothing; a changed one rewrites the unit and restarts the server
    pid = box.main_pid("builder-pxe.service")
    again = box.builder(*install)
    assert "builder-pxe.service      unchanged" in again.stdout and box.main_pid("builder-pxe.service") == pid
    moved = box.builder("pxe", "serve", "--install", "--root", "/work/pxe-root", "--port", "8001", "--dnsmasq")
    assert "builder-pxe.service      updated" in moved.stdout
    assert box.get("http://127.0.0.1:8001/current/boot.ipxe").stdout.startswith("#!ipxe")
    assert box.get(boot_file).returncode != 0
    assert "--port 8001" in box.run("cat", "/etc/systemd/system/builder-pxe.service").stdout
    assert not box.run("sh", "-c", "ls -A /etc/systemd/system | grep partial", check=False).stdout

    # the control node reboots: systemd starts both again, nobody runs builder
    box.reboot()
    box.wait("the boot server after a reboot", lambda: box.state("builder-pxe.service") == "active")
    assert box.get("http://127.0.0.1:8001/current/boot.ipxe").stdout.startswith("#!ipxe")
    assert box.state("builder-dnsmasq.service") == "active"


def test_gateway_runs_under_systemd_reloads_without_a_restart_and_comes_back(box: Box) -> None:
    work = box.work / "gateway"
    work.mkdir()
    (work / "tiny.gguf").write_bytes(MODEL)
    (work / "backend").mkdir()
    (work / "backend" / "health").write_text("ok\n")  # what the gateway's health check GETs

    def cluster(max_request: str) -> None:
        (work / "cluster.yaml").write_text(yaml.safe_dump({
            "control": {"address": "127.0.0.1"},
            "gateway": {"address": "127.0.0.1", "port": 8080, "max_request": max_request},
            "nodes": [{"name": "a", "mac": "52:54:00:12:34:01", "target": "cpu", "memory": "4GiB",
                       "address": "127.0.0.11"}],
            "services": [{"name": "chat", "model": "tiny.gguf", "sha256": SHA, "nodes": ["a"], "port": 8189}]}))

    cluster("1MiB")
    # a stand-in for the node's llama-server: GET /health answers 200 on the node's loopback address
    box.run("systemd-run", "--unit=stand-in", "python3", "-m", "http.server", "--bind", "127.0.0.11",
            "--directory", "/work/gateway/backend", "8189")
    # a gateway `up` started as a process, before the unit: the unit takes its place
    box.builder("cluster", "up", "/work/gateway/cluster.yaml", "--timeout", "60")
    up = box.builder("cluster", "up", "/work/gateway/cluster.yaml", "--install", "--timeout", "60")
    unit = next(w for w in up.stderr.split() if w.startswith("builder-gateway-"))
    assert "stopping the gateway `builder cluster up` started, for its systemd unit" in up.stderr
    assert f"{unit} installed; enabled at boot, running" in up.stderr and "endpoint  http://127.0.0.1:8080/v1" \
        in up.stdout
    assert box.run("pgrep", "-c", "-x", "haproxy").stdout.strip() == "2"  # the unit's master and one worker
    key_file = next(line.split()[1] for line in up.stdout.splitlines() if line.startswith("key "))
    bearer = "Authorization: Bearer " + box.run("cat", key_file).stdout.strip()
    models = "http://127.0.0.1:8080/v1/models"

    def serving() -> bool:
        answer = box.get(models, bearer)
        return answer.returncode == 0 and json.loads(answer.stdout)["data"][0]["id"] == "chat"

    assert box.state(unit) == "active" and serving()
    assert box.get(models).returncode != 0  # without the key: refused (401)
    status = json.loads(box.builder("cluster", "status", "/work/gateway/cluster.yaml", "--json").stdout)
    assert status["gateway"]["running"] is True
    assert status["services"][0]["processes"][0]["health"] == "UP"

    killed = box.kill_main(unit)
    box.wait("the gateway after kill -9", lambda: box.state(unit) == "active"
             and box.main_pid(unit) not in (0, killed) and serving())

    # a changed config is reloaded by the same master (new workers; requests in flight finish on the old ones)
    master = box.main_pid(unit)
    cluster("2MiB")
    reloaded = box.builder("cluster", "up", "/work/gateway/cluster.yaml", "--timeout", "60")
    assert f"reloaded {unit} with the new config" in reloaded.stderr
    assert box.main_pid(unit) == master and serving()
    # the old worker finishes and leaves: one worker again, as the haproxy user
    box.wait("the old worker's exit", lambda: box.run("pgrep", "-c", "-u", "haproxy", "haproxy", check=False)
             .stdout.strip() == "1")
    assert "tune.bufsize 2097152" in box.run("sh", "-c", f"cat {Path(key_file).parent}/haproxy.cfg").stdout

    box.reboot()
    box.wait("the gateway after a reboot", lambda: box.state(unit) == "active" and serving())

    down = box.builder("cluster", "down", "/work/gateway/cluster.yaml")
    assert f"removed gateway ({unit} disabled)" in down.stdout
    assert box.state(unit) == "inactive" and box.get(models, bearer).returncode != 0
    assert box.run("systemctl", "is-enabled", unit, check=False).stdout.strip() == "disabled"
