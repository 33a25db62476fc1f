"""`builder cluster logs FILE NODE [SERVICE]` without --local: what is checked before any ssh (admins:, the node, the
service on that node), the one fixed command the node runs, and the ssh command line, with a stand-in `ssh` on
PATH that records its arguments (no node to log in to in a unit test; tests/qemu/test_netboot_shared_qemu.py reads
a booted node's logs)."""

import os
import stat
from pathlib import Path

import pytest
from test_cluster_admins import ED25519, admins_file
from test_cluster_firewall import NODE_A, services_file

from builder.cluster.model import load_cluster
from builder.cluster.nodelogs import log_names, remote_command
from builder.cluster.ssh import target
from conftest import run_cli, run_cli_inproc


def test_the_remote_command_is_fixed_tail_of_the_logs() -> None:
    assert remote_command(("node",), 50, False) == (
        "cd /run/builder/logs 2>/dev/null && ls -- node.log >/dev/null 2>&1 || exit 3; "
        "cat -- node.log.1 node.log 2>/dev/null | tail -n 50")
    both = remote_command(("big-server", "big-rpc-worker"), 7, False)
    assert "echo '==> big-server <=='; cat -- big-server.log.1 big-server.log 2>/dev/null | tail -n 7" in both
    assert "echo '==> big-rpc-worker <=='; cat -- big-rpc-worker.log.1 big-rpc-worker.log" in both
    follow = remote_command(("chat-server",), 0, True)
    assert follow.endswith("; tail -n 0 -F -- chat-server.log & cat >/dev/null; kill $! 2>/dev/null; exit 0")


@pytest.mark.parametrize(("logs", "lines"), [(("x;reboot",), 5), (("-n",), 5), (("$(id)",), 5), (("a b",), 5),
                                             (("node",), -1), (("node",), 10**7)])
def test_the_remote_command_takes_no_other_text(logs: tuple[str, ...], lines: int) -> None:
    with pytest.raises(ValueError):
        remote_command(logs, lines, False)


def test_each_process_of_the_service_on_that_node_has_its_log(tmp_path: Path) -> None:
    loaded = load_cluster(admins_file(tmp_path))
    assert log_names(loaded, "a", None) == ("node",)
    assert log_names(loaded, "a", "chat") == ("chat-server",)
    assert log_names(loaded, "a", "big") == ("big-server",)
    assert log_names(loaded, "b", "big") == ("big-rpc-worker",)


def test_without_admins_it_says_to_add_them(tmp_path: Path) -> None:
    proc = run_cli_inproc("cluster", "logs", str(services_file(tmp_path)), "a")
    message = "no admins:, so builder cannot log in to the nodes to read their logs"
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "serial console" in proc.stderr and "admins:" in proc.stderr.splitlines()[1]


@pytest.mark.parametrize(("words", "message"), [
    ((), "name the node to read"),
    (("zz",), "no netbooted node named 'zz'"),
    (("a", "chatt"), "no service named 'chatt' (did you mean 'chat'?)"),
    (("b", "chat"), "service 'chat' runs nothing on b"),
    (("a", "chat", "-n", "-1"), "--lines' / '-n': Input should be greater than or equal to 0"),
])
def test_a_wrong_node_or_service_is_one_line_before_any_ssh(tmp_path: Path, words: tuple[str, ...],
                                                           message: str) -> None:
    proc = run_cli_inproc("cluster", "logs", str(admins_file(tmp_path)), *words, env={"PATH": str(tmp_path)})
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def fake_ssh(tmp_path: Path, exit_code: int) -> dict[str, str]:
    """A stand-in `ssh` first on PATH: it records its arguments, prints two lines and exits with `exit_code`; and
    node a's host key already pinned in builder's known_hosts for the file (so no agent is asked)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "ssh"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" >{tmp_path / 'argv'}\necho 'srv  line one'\n"
                      f"echo 'srv  line two'\nexit {exit_code}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    env = {"BUILDER_CACHE": str(tmp_path / "cache"), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return env


def pin(path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BUILDER_CACHE", env["BUILDER_CACHE"])
    t = target(load_cluster(path), "a")
    t.known_hosts.parent.mkdir(parents=True, exist_ok=True)
    t.known_hosts.write_text(f"{NODE_A} {' '.join(ED25519.split()[:2])}\n")
    return t.known_hosts


def test_it_runs_ssh_with_builders_options_and_prints_the_lines(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = admins_file(tmp_path)
    env = fake_ssh(tmp_path, 0)
    known = pin(path, env, monkeypatch)
    (tmp_path / "id").write_text("not read by the stand-in\n")
    proc = run_cli("cluster", "logs", str(path), "a", "chat", "-n", "20", "--identity", str(tmp_path / "id"), env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "srv  line one\nsrv  line two\n"
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[:2] == ["-F", "none"] and argv[-3:-1] == ["--", NODE_A]
    assert argv[-1] == remote_command(("chat-server",), 20, False)
    options = [argv[i + 1] for i, word in enumerate(argv) if word == "-o"]
    assert {"BatchMode=yes", "StrictHostKeyChecking=yes", f"UserKnownHostsFile={known}", "IdentitiesOnly=yes",
            "PasswordAuthentication=no", "ForwardAgent=no"} <= set(options)
    assert argv[argv.index("-l") + 1] == "root" and argv[argv.index("-i") + 1] == str(tmp_path / "id")
    follow = run_cli("cluster", "logs", str(path), "a", "-f", env=env)
    assert follow.returncode == 0 and follow.stdout == "srv  line one\nsrv  line two\n", follow.stderr
    assert (tmp_path / "argv").read_text().splitlines()[-1] == remote_command(("node",), 50, True)


@pytest.mark.parametrize(("code", "message"), [
    (3, "a: no /run/builder/logs/chat-server.log on the node"),
    (255, f"a: ssh root@{NODE_A} -p 22 failed: srv  line two"),
])
def test_a_failure_on_the_node_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int,
                                           message: str) -> None:
    path = admins_file(tmp_path)
    env = fake_ssh(tmp_path, code)
    pin(path, env, monkeypatch)
    proc = run_cli("cluster", "logs", str(path), "a", "chat", env=env)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
