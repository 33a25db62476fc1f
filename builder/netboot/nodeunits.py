"""The systemd units of a netbooted node, written into its root at `pxe build` (static: the same for every node).

systemd is the node's PID 1 (the initramfs hands over to it). Its default target is builder-node.target, which
pulls only what a node needs: builder-node.service (hostname, modules, users: once), builder-dhcp.service (the
boot lease kept renewed) and builder-plan.service, which fetches the node's plan, checks its sha256 and starts
one unit per line: the gateway's agent, the ssh server and the metrics exporter (builder-agent/-sshd/-metrics),
and one instance of the template builder-process@.service per process (`SERVICE-ROLE`, e.g. `tiny-server`,
`tiny-rpc-rpc-worker`). A process's unit runs `/usr/lib/builder/node process SERVICE-ROLE`, which reads its own
line from the verified plan: no plan string passes through systemd's quoting. The unit is active once the
process answers (ExecStartPost polls it and prints the `ready on` line), is restarted alone when it exits (with
back-off, and failed after too many restarts in a row), and writes to the journal and the console. Every script
is images/netboot/node.sh; the plan's lines are builder/netboot/plan.py's. The journal is kept in RAM, bounded, and
systemd-journal-gatewayd serves it on the node's own address (JOURNAL_PORT; its socket bound at boot, the node's
firewall admitting the control node only): `builder cluster logs` reads it over HTTP.
"""

import os
from pathlib import Path

from builder.core.units import Section, render

NODE = "/usr/lib/builder/node"
TARGET = "builder-node.target"
PROCESS = "builder-process@.service"
# What a node's root does not need at boot (no udev, no consoles to log in on, no disks to check): masked.
MASKED = ("getty.target", "getty@.service", "serial-getty@.service", "console-getty.service",
          "systemd-firstboot.service", "systemd-hwdb-update.service", "systemd-journal-flush.service",
          "systemd-journal-catalog-update.service", "ldconfig.service", "systemd-update-done.service",
          "systemd-random-seed.service", "systemd-pstore.service", "systemd-binfmt.service",
          "systemd-modules-load.service",  # no modules.dep in the root: builder-node.service loads the modules
          "proc-sys-fs-binfmt_misc.automount", "dev-hugepages.mount", "dev-mqueue.mount", "sys-kernel-debug.mount",
          "sys-kernel-tracing.mount", "sys-kernel-config.mount", "sys-fs-fuse-connections.mount",
          "systemd-logind.service", "systemd-networkd.service", "systemd-resolved.service",
          "systemd-timesyncd.service", "systemd-tpm2-setup-early.service", "systemd-tpm2-setup.service",
          "systemd-pcrmachine.service", "systemd-pcrphase.service", "systemd-pcrphase-sysinit.service",
          "ssh.service", "ssh.socket", "prometheus-node-exporter.service", "cron.service", "apt-daily.timer",
          "apt-daily-upgrade.timer")
# Generators that would scan for what a node does not have (gettys, SysV scripts, GPT partitions).
MASKED_GENERATORS = ("systemd-getty-generator", "systemd-sysv-generator", "systemd-rc-local-generator",
                     "systemd-gpt-auto-generator", "systemd-hibernate-resume-generator")
JOURNAL_PORT = 19531  # systemd-journal-gatewayd, on the node's own address: the control node reads the journal
# The journal identifiers of the node's own units (`builder cluster logs FILE NODE` without a service), systemd's
# own lines (a unit started, failed, restarted) among them; a process's is builder-SERVICE-ROLE.
NODE_IDENTIFIERS = ("builder-setup", "builder-plan", "builder-qualify", "builder-dhcp", "builder-agent",
                    "builder-sshd", "builder-metrics", "systemd")
JOURNAL_MAX = "64M"  # the node's journal, in RAM (/run/log/journal)
RESTART_SECONDS = 5
# A process that exits this many times in START_LIMIT_SECONDS is left failed (`cluster status` says so).
START_LIMIT_BURST, START_LIMIT_SECONDS = 10, 600

_OUTPUT = [("StandardOutput", "journal+console"), ("StandardError", "inherit")]


def _oneshot(description: str, command: str, after: str = "", success: str = "") -> list[Section]:
    unit = [("Description", description), ("PartOf", TARGET)]
    if after:
        unit += [("Requires", after), ("After", after)]
    service = [("Type", "oneshot"), ("RemainAfterExit", "yes"), ("ExecStart", f"{NODE} {command}"),
               ("SyslogIdentifier", f"builder-{command}"), *_OUTPUT]
    if success:
        service.append(("SuccessExitStatus", success))
    return [("Unit", unit), ("Service", service)]


def _daemon(description: str, command: str, after: str = "builder-plan.service") -> list[Section]:
    """A long-running unit of the node (agent, ssh server, exporter, DHCP client), restarted when it exits."""
    return [("Unit", [("Description", description), ("After", after),
                      ("StartLimitIntervalSec", "0")]),
            ("Service", [("ExecStart", f"{NODE} {command}"), ("Restart", "always"),
                         ("RestartSec", str(RESTART_SECONDS)), ("SyslogIdentifier", f"builder-{command}"),
                         *_OUTPUT])]


def _process(back_off: bool) -> list[Section]:
    """The template of one process of the plan (%i: SERVICE-ROLE)."""
    service = [("ExecStart", f"{NODE} process %i"), ("ExecStartPost", f"{NODE} ready %i"),
               ("ExecStopPost", f"{NODE} stopped %i"), ("Restart", "always"), ("RestartSec", str(RESTART_SECONDS))]
    if back_off:  # systemd 254 and later: each restart in a row waits longer, up to a minute
        service += [("RestartSteps", "5"), ("RestartMaxDelaySec", "60")]
    service += [("TimeoutStartSec", "infinity"), ("TimeoutStopSec", "30"), ("SyslogIdentifier", "builder-%i"),
                ("LimitNOFILE", "65536"), *_OUTPUT]
    return [("Unit", [("Description", "builder process %i"), ("After", "builder-plan.service"),
                      ("StartLimitIntervalSec", str(START_LIMIT_SECONDS)),
                      ("StartLimitBurst", str(START_LIMIT_BURST))]),
            ("Service", service)]


def node_units(systemd_version: int) -> dict[str, str]:
    """The node's own units by file name (`systemd_version`: the root's, for what it understands)."""
    target = [("Unit", [("Description", "builder netbooted node"), ("Requires", "basic.target"),
                        ("After", "basic.target"),
                        ("Wants", "builder-node.service builder-dhcp.service builder-plan.service"),
                        ("AllowIsolate", "yes")])]
    units = {
        TARGET: render(target),
        "builder-node.service": render(_oneshot("builder node: hostname, modules, users", "setup")),
        "builder-plan.service": render(_oneshot("builder node: fetch the plan and start its units", "plan",
                                                after="builder-node.service")),
        "builder-qualify.service": render(_oneshot("builder node: qualification of the image on this node",
                                                   "qualify", success="3")),
        "builder-dhcp.service": render(_daemon("builder node: the boot lease kept renewed", "dhcp",
                                                        after="builder-node.service")),
        "builder-agent.service": render(_daemon("builder node: the gateway's agent", "agent")),
        "builder-sshd.service": render(_daemon("builder node: ssh server (admins:)", "sshd")),
        "builder-metrics.service": render(_daemon("builder node: metrics exporter (admins:)", "metrics")),
        PROCESS: render(_process(systemd_version >= 254), instance=True),
    }
    return units


JOURNALD = render([("Journal", [("Storage", "volatile"), ("RuntimeMaxUse", JOURNAL_MAX),
                                ("ForwardToConsole", "no"), ("ForwardToSyslog", "no")])])
SYSTEM = render([("Manager", [("ShowStatus", "error"), ("DefaultTimeoutStopSec", "30s")])])


def systemd_version(root: Path) -> int:
    """The root's systemd version, from its libsystemd-shared-NNN.so; 0 when it is not there."""
    for folder in ("usr/lib/x86_64-linux-gnu/systemd", "usr/lib/systemd", "lib/systemd"):
        for path in sorted((root / folder).glob("libsystemd-shared-*.so")):
            digits = path.name.removeprefix("libsystemd-shared-").removesuffix(".so").split(".")[0]
            if digits.isdigit():
                return int(digits)
    return 0


def _link(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    os.symlink(target, path)


def _add_group(root: Path, name: str) -> None:
    """A system group in the root's /etc/group (and gshadow), as the package's maintainer scripts would add it."""
    group = root / "etc/group"
    text = group.read_text() if group.is_file() else ""
    if any(line.split(":", 1)[0] == name for line in text.splitlines()):
        return
    used = {int(f[2]) for f in (line.split(":") for line in text.splitlines()) if len(f) > 2 and f[2].isdigit()}
    gid = next(g for g in range(999, 99, -1) if g not in used)
    group.write_text(text + ("" if not text or text.endswith("\n") else "\n") + f"{name}:x:{gid}:\n")
    shadow = root / "etc/gshadow"
    if shadow.is_file():
        body = shadow.read_text()
        shadow.write_text(body + ("" if not body or body.endswith("\n") else "\n") + f"{name}:!::\n")


def install_node_units(root: Path) -> int:
    """Write the node's units, its default target, the journal's and manager's settings and the masks into
    `root`; returns the root's systemd version."""
    version = systemd_version(root)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True, exist_ok=True)
    for name, text in node_units(version).items():
        (etc / name).write_text(text)
    _link(etc / "default.target", TARGET)
    for name in MASKED:
        _link(etc / name, "/dev/null")
    for name in MASKED_GENERATORS:
        _link(root / "etc/systemd/system-generators" / name, "/dev/null")
    for folder, text in (("journald.conf.d", JOURNALD), ("system.conf.d", SYSTEM)):
        (root / "etc/systemd" / folder).mkdir(parents=True, exist_ok=True)
        (root / "etc/systemd" / folder / "builder.conf").write_text(text)
    # the group that may read the journal (systemd-journal-gatewayd runs in it), there before journald starts
    _add_group(root, "systemd-journal")
    # an empty machine-id: systemd makes one per boot in RAM (a node keeps no state of its own)
    machine_id = root / "etc/machine-id"
    if machine_id.is_symlink():
        machine_id.unlink()
    machine_id.write_text("")
    return version
