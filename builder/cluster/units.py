"""The netboot gateway as a systemd unit: what `builder cluster up FILE --install` writes and enables.

HAProxy runs in master-worker mode with systemd support (`-Ws`), as Debian's own haproxy.service does: the
unit is Type=notify, so systemd knows it is ready when the workers listen, and a reload (SIGUSR2 to the master)
starts new workers on the new config while the old ones finish the requests in flight. HAProxy starts as root
to bind the port and read the key's 0600 map, then becomes the haproxy user in an empty chroot (the config
says so when builder writes it as root).
"""

from pathlib import Path

from builder.cluster.gateway import MALLOC_TUNABLES
from builder.cluster.model import Loaded
from builder.core.units import HARDENING, Unit, plain, plain_argv, render

RESTART_SECONDS = 3


def gateway_unit_name(loaded: Loaded) -> str:
    """One unit per cluster file, named like its state folder: builder-gateway-STEM-HASH.service."""
    project = loaded.state_folder("netboot-")[0]
    return f"builder-gateway-{project.removeprefix('builder-netboot-')}.service"


def gateway_unit(loaded: Loaded, state: Path, haproxy: str, kill: str) -> Unit:
    """HAProxy on `state`/haproxy.cfg, its master's pid in `state`/haproxy.pid (what `cluster status` reads)."""
    config = plain(state / "haproxy.cfg", "the gateway's state folder")
    pidfile = plain(state / "haproxy.pid", "the gateway's state folder")
    program = plain(haproxy, "haproxy's path")
    check = plain_argv([program, "-c", "-q", "-f", config], "the gateway's config check")
    head = [("Description", f"builder gateway for {plain(loaded.path.resolve(), 'the cluster file')} (HAProxy)"),
            ("After", "network-online.target"), ("Wants", "network-online.target"), ("StartLimitIntervalSec", "0")]
    service = [
        ("Type", "notify"),
        ("Environment", f"GLIBC_TUNABLES={plain(MALLOC_TUNABLES, 'GLIBC_TUNABLES')}"),
        ("ExecStartPre", check),
        ("ExecStart", plain_argv([program, "-Ws", "-f", config, "-p", pidfile], "the gateway's command")),
        # a changed config is checked first, so a bad one leaves the running gateway as it was
        ("ExecReload", check),
        ("ExecReload", f"{plain(kill, 'kill')} -USR2 $MAINPID"),
        ("KillMode", "mixed"),
        ("SuccessExitStatus", "143"),
        ("Restart", "on-failure"),
        ("RestartSec", f"{RESTART_SECONDS}s"),
        ("ReadWritePaths", plain(state, "the gateway's state folder")),
        # CAP_KILL: the master (root) signals its workers (the haproxy user) to stop or reload
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE CAP_SETUID CAP_SETGID CAP_SYS_CHROOT CAP_KILL"),
        *HARDENING,
    ]
    return Unit(gateway_unit_name(loaded), render([("Unit", head), ("Service", service),
                                                   ("Install", [("WantedBy", "multi-user.target")])]))
