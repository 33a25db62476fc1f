"""A netbooted node's systemd units (builder/netboot/nodeunits.py): what `pxe build` writes into the root, as the
root's systemd reads it. `systemd-analyze verify` (this machine's systemd) reads every unit, the template through
an instance; the root gets its default target, the masks, a volatile and bounded journal and an empty machine-id;
restart back-off settings go only to a systemd that has them (254 and later)."""

import os
import subprocess
from pathlib import Path

import pytest

from builder.core.errors import RecipeError
from builder.core.units import render
from builder.netboot.nodeunits import MASKED, PROCESS, TARGET, install_node_units, node_units, systemd_version
from conftest import require_tool


def unit_settings(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith(("#", "["))]


def test_systemd_analyze_verifies_every_unit(tmp_path: Path) -> None:
    require_tool("systemd-analyze", "systemd")
    units = node_units(252)
    for name, text in units.items():
        # the scripts are the root's; a program this machine has stands for them
        (tmp_path / name).write_text(text.replace("/usr/lib/builder/node", "/bin/true"))
    (tmp_path / "builder-process@tiny-server.service").write_text((tmp_path / PROCESS).read_text())
    names = [str(tmp_path / n) for n in units if n != PROCESS] + [str(tmp_path / "builder-process@tiny-server.service")]
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", *names], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines() if str(tmp_path) in line]
    assert proc.returncode == 0 and not complaints, proc.stdout + proc.stderr


def test_each_process_is_a_template_instance_restarted_alone_and_bounded() -> None:
    process = unit_settings(node_units(257)[PROCESS])
    assert "ExecStart=/usr/lib/builder/node process %i" in process  # the script reads its own line of the plan
    assert "ExecStartPost=/usr/lib/builder/node ready %i" in process  # active once it answers
    assert {"Restart=always", "RestartSec=5", "RestartSteps=5", "RestartMaxDelaySec=60", "StartLimitBurst=10",
            "StandardOutput=journal+console", "SyslogIdentifier=builder-%i"} <= set(process)
    old = unit_settings(node_units(252)[PROCESS])  # bookworm's systemd has no back-off steps
    assert "Restart=always" in old and not any(s.startswith("RestartSteps") for s in old)
    qualify = unit_settings(node_units(257)["builder-qualify.service"])
    assert "SuccessExitStatus=3" in qualify and "Type=oneshot" in qualify  # unqualified is a report, not a failure
    target = unit_settings(node_units(257)[TARGET])
    assert "Wants=builder-node.service builder-dhcp.service builder-plan.service" in target


def test_a_template_may_name_its_instance_and_nothing_else() -> None:
    assert "%i" in render([("Service", [("ExecStart", "/bin/x %i")])], instance=True)
    for value in ("/bin/x %n", "/bin/x 100%"):
        with pytest.raises(RecipeError, match="without %"):
            render([("Service", [("ExecStart", value)])], instance=True)
    with pytest.raises(RecipeError, match="without %"):
        render([("Service", [("ExecStart", "/bin/x %i")])])


def test_the_root_boots_into_the_node_target(tmp_path: Path) -> None:
    shared = tmp_path / "usr/lib/x86_64-linux-gnu/systemd"
    shared.mkdir(parents=True)
    (shared / "libsystemd-shared-257.so").write_bytes(b"")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")  # the image's: not the node's
    assert systemd_version(tmp_path) == 257
    assert install_node_units(tmp_path) == 257
    etc = tmp_path / "etc/systemd/system"
    assert os.readlink(etc / "default.target") == TARGET
    assert all(os.readlink(etc / name) == "/dev/null" for name in MASKED)
    assert os.readlink(tmp_path / "etc/systemd/system-generators/systemd-getty-generator") == "/dev/null"
    journal = (tmp_path / "etc/systemd/journald.conf.d/builder.conf").read_text()
    assert "Storage=volatile" in journal and "RuntimeMaxUse=64M" in journal
    assert (tmp_path / "etc/machine-id").read_text() == ""  # systemd makes one per boot
    assert "RestartSteps=5" in (etc / PROCESS).read_text()
    assert systemd_version(tmp_path / "nothing") == 0
