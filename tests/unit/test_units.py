"""The control node's systemd units as `--print` shows them: what they run, that systemd accepts them
(`systemd-analyze verify`), and that a value systemd would read differently is refused before anything is
written. tests/engine/test_control_units.py installs and runs them under a real systemd."""

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cluster import cluster_file, node
from test_netboot import fake_artifacts, inventory, publish

from builder.core.units import notify_ready
from conftest import ROOT, require_tool, run_cli_inproc


def published_root(tmp_path: Path) -> Path:
    root, path = tmp_path / "pxe-root", inventory(tmp_path)
    folder, manifest = fake_artifacts(tmp_path, "a")
    publish(root, path, {("cpu", "cpu"): (folder, manifest)})
    return root


def units_of(printed: str) -> dict[str, str]:
    """`--print`'s output split into {unit name: text}; each unit opens with `# /etc/systemd/system/NAME`."""
    units: dict[str, str] = {}
    for chunk in printed.split("# /etc/systemd/system/")[1:]:
        name, text = chunk.split("\n", 1)
        units[name] = text
    return units


def settings(text: str) -> list[str]:
    return [line for line in text.splitlines() if "=" in line and not line.startswith("#")]


def verify(tmp_path: Path, units: dict[str, str]) -> None:
    """systemd's own check of unit files (it loads them as systemd would, and checks each command exists)."""
    require_tool("systemd-analyze", "systemd")
    folder = tmp_path / "units"
    folder.mkdir(exist_ok=True)
    for name, text in units.items():
        (folder / name).write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", *(f"./{name}" for name in units)], cwd=folder,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder every user may enter, like /srv (pytest's own are closed to others): dnsmasq's user reads
    pxe-root/tftp in it."""
    with tempfile.TemporaryDirectory(prefix="builder-units-") as folder:
        Path(folder).chmod(0o755)
        yield Path(folder)


def test_pxe_serve_print_shows_the_boot_server_and_dnsmasq_units(tmp_path: Path, open_folder: Path) -> None:
    root = published_root(open_folder)
    proc = run_cli_inproc("pxe", "serve", "--root", str(root), "--dnsmasq", "--print")
    assert proc.returncode == 0, proc.stderr
    units = units_of(proc.stdout)
    assert sorted(units) == ["builder-dnsmasq.service", "builder-pxe.service"]
    boot = settings(units["builder-pxe.service"])
    # this interpreter and builder, absolute paths; the address and port of the published control node
    assert f"ExecStart={sys.executable} -m builder pxe serve --root {root.resolve()} --bind 10.0.2.2 " \
        "--port 8000" in boot
    assert f"Environment=PYTHONPATH={ROOT}" in boot  # a checkout: the unit's interpreter finds it too
    assert {"Type=notify", "Restart=on-failure", "WantedBy=multi-user.target", "ProtectSystem=strict",
            "NoNewPrivileges=yes", "PrivateTmp=yes", "CapabilityBoundingSet=",
            f"ReadWritePaths={root.resolve()}"} <= set(boot)
    assert not any(s.startswith("User=") for s in boot)  # root's own folder: root, with no capabilities
    dnsmasq = settings(units["builder-dnsmasq.service"])
    config = root.resolve() / "dnsmasq.conf"
    assert any(s.startswith("ExecStart=") and s.endswith(f" --conf-file={config} "
                                                         "--pid-file=/run/builder-dnsmasq/dnsmasq.pid "
                                                         "--dhcp-leasefile=/run/builder-dnsmasq/leases")
               for s in dnsmasq)
    assert {"PartOf=builder-pxe.service", "Requires=builder-pxe.service", "Restart=on-failure", "Type=forking",
            "PIDFile=/run/builder-dnsmasq/dnsmasq.pid"} <= set(dnsmasq)
    assert not (root / "dnsmasq.conf").exists()  # --print writes nothing
    verify(tmp_path, units)


def test_dnsmasq_unit_is_refused_when_its_user_cannot_reach_tftp(tmp_path: Path) -> None:
    root = published_root(tmp_path)
    tmp_path.chmod(0o700)
    proc = run_cli_inproc("pxe", "serve", "--root", str(root), "--dnsmasq", "--print")
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    closed = next(f for f in [*reversed(tmp_path.parents), tmp_path] if not f.stat().st_mode & 0o001)
    assert f"dnsmasq reads {root.resolve()}/tftp as its own user, and {closed} is mode 0700" in proc.stderr
    assert f"chmod o+rx {closed}" in proc.stderr


def test_a_port_under_1024_gets_only_the_capability_to_bind_it(tmp_path: Path) -> None:
    root = published_root(tmp_path)
    proc = run_cli_inproc("pxe", "serve", "--root", str(root), "--bind", "127.0.0.1", "--port", "80", "--print")
    boot = settings(units_of(proc.stdout)["builder-pxe.service"])
    assert {"AmbientCapabilities=CAP_NET_BIND_SERVICE", "CapabilityBoundingSet=CAP_NET_BIND_SERVICE"} <= set(boot)
    assert any(s.endswith("--bind 127.0.0.1 --port 80") for s in boot)


def test_the_boot_server_runs_as_the_owner_of_pxe_root(tmp_path: Path) -> None:
    root = published_root(tmp_path)
    tmp_path.chmod(0o755)
    os.chown(root, 65534, 65534)  # nobody, as if nobody had published it
    proc = run_cli_inproc("pxe", "serve", "--root", str(root), "--print")
    assert "User=nobody" in settings(units_of(proc.stdout)["builder-pxe.service"])


@pytest.mark.parametrize("folder", ["pxe%root", "pxe root", "pxe$HOME", 'pxe"root', "pxe\\root", "pxe\nroot"])
def test_a_root_systemd_would_read_differently_is_refused(tmp_path: Path, folder: str) -> None:
    root = tmp_path / folder
    path = inventory(tmp_path)
    fake, manifest = fake_artifacts(tmp_path, "a")
    publish(root, path, {("cpu", "cpu"): (fake, manifest)})
    proc = run_cli_inproc("pxe", "serve", "--root", str(root), "--print")
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert "a systemd unit cannot hold" in proc.stderr and "hint: use a path of plain characters" in proc.stderr
    assert len(proc.stderr.splitlines()) == 2


@pytest.mark.parametrize("bind", ["fe80::1%eth0", "10.0.0.1\nExecStartPre=/bin/sh", "a b", "%H"])
def test_a_bind_address_systemd_would_read_differently_is_refused(tmp_path: Path, bind: str) -> None:
    proc = run_cli_inproc("pxe", "serve", "--root", str(published_root(tmp_path)), "--bind", bind, "--print")
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: --bind ")


def test_install_needs_a_machine_that_runs_systemd(tmp_path: Path) -> None:
    if Path("/run/systemd/system").is_dir():
        # not a missing tool: the refusal this checks cannot happen on such a machine
        pytest.skip("this machine runs systemd: tests/engine/test_control_units.py installs for real")
    root = published_root(tmp_path)
    proc = run_cli_inproc("pxe", "serve", "--root", str(root), "--install")
    assert proc.returncode == 1 and "error: builder pxe serve --install: this machine does not run systemd" \
        in proc.stderr and "--print" in proc.stderr
    assert not (root / "dnsmasq.conf").exists()


def test_cluster_up_print_shows_the_gateway_unit(tmp_path: Path) -> None:
    addressed = [node(n, i + 1, address=f"10.0.0.{11 + i}") for i, n in enumerate("abcd")]
    path = cluster_file(tmp_path, nodes=addressed, control={"address": "10.0.0.1"})
    proc = run_cli_inproc("cluster", "up", str(path), "--install", "--print",
                          env={"BUILDER_CACHE": str(tmp_path / "builder")})
    assert proc.returncode == 0, proc.stderr
    units = units_of(proc.stdout)
    [(name, text)] = units.items()
    assert name.startswith("builder-gateway-cluster-") and name.endswith(".service")
    state = next(tmp_path.glob("builder/clusters/builder-netboot-cluster-*"))
    lines = settings(text)
    haproxy = next(s for s in lines if s.startswith("ExecStart=")).split("=", 1)[1].split()[0]
    # HAProxy's master-worker mode with systemd's notify protocol; a reload is checked, then seamless (SIGUSR2)
    assert f"ExecStart={haproxy} -Ws -f {state}/haproxy.cfg -p {state}/haproxy.pid" in lines
    assert lines.index(f"ExecReload={haproxy} -c -q -f {state}/haproxy.cfg") < \
        next(i for i, s in enumerate(lines) if s.startswith("ExecReload=") and s.endswith(" -USR2 $MAINPID"))
    assert {"Type=notify", "Restart=on-failure", "KillMode=mixed", f"ReadWritePaths={state}",
            "ProtectSystem=strict"} <= set(lines)
    assert not (state / "haproxy.cfg").exists()  # --print writes no config
    verify(tmp_path, units)
    proc = run_cli_inproc("cluster", "up", str(path), "--local", "--install")
    assert proc.returncode == 2 and "--local clusters are containers on this machine" in proc.stderr


def test_the_boot_server_tells_systemd_when_it_listens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """READY=1 on $NOTIFY_SOCKET, the datagram systemd waits for with Type=notify; nothing without it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(tmp_path / "notify"))
        listener.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        notify_ready()
        assert listener.recv(64) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    notify_ready()  # not under systemd: nothing to tell, no error


def test_a_cluster_file_path_systemd_would_read_differently_is_refused(tmp_path: Path) -> None:
    addressed = [node(n, i + 1, address=f"10.0.0.{11 + i}") for i, n in enumerate("abcd")]
    (tmp_path / "my cluster").mkdir()
    path = cluster_file(tmp_path / "my cluster", nodes=addressed, control={"address": "10.0.0.1"})
    proc = run_cli_inproc("cluster", "up", str(path), "--install", "--print",
                          env={"BUILDER_CACHE": str(tmp_path / "builder")})
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert f"error: the cluster file '{path}': a systemd unit cannot hold ' '" in proc.stderr
