"""The boot server (and dnsmasq) as systemd units: what `builder pxe serve --install` writes and enables.

The boot server is `builder pxe serve` itself, run by systemd as the owner of pxe-root/ (the user who published
it) with no capabilities (one only to bind a port under 1024), and it tells systemd when it listens
(Type=notify). dnsmasq has a unit of its own, started as root because it binds ports 67 and 69 (it drops to its
own user afterwards), after the boot server, which writes its config when it starts.
"""

import pwd
import re
import stat
from pathlib import Path

from builder.core.errors import RecipeError
from builder.core.types import Address
from builder.core.units import HARDENING, Section, Unit, plain, plain_argv, python_command, python_path, render
from builder.netboot.inventory import Control
from builder.netboot.serve import dnsmasq_config

BOOT_UNIT = "builder-pxe.service"
DNSMASQ_UNIT = "builder-dnsmasq.service"
RESTART_SECONDS = 3
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


def _owner(root: Path) -> str:
    """Who the boot server runs as: the owner of pxe-root/, by name (or uid when the name is not plain)."""
    uid = root.stat().st_uid
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
    return name if _USER.fullmatch(name) else str(uid)


# Retried for as long as it takes: after a reboot the control address may come up after the unit starts.
_RESTART = [("Restart", "on-failure"), ("RestartSec", f"{RESTART_SECONDS}s")]


def _unit_head(description: str, after: str = "network-online.target") -> list[tuple[str, str]]:
    return [("Description", description), ("After", after), ("Wants", "network-online.target"),
            ("StartLimitIntervalSec", "0")]


_INSTALL: Section = ("Install", [("WantedBy", "multi-user.target")])


def boot_server_unit(root: Path, bind: Address, port: int) -> Unit:
    """`builder pxe serve --root ROOT --bind ADDRESS --port PORT` as a Type=notify service."""
    root = root.resolve()
    where = plain(root, "--root")
    argv = [*python_command(), "pxe", "serve", "--root", where, "--bind", plain(bind, "--bind"), "--port", str(port)]
    owner = _owner(root)
    # root (the default) is not named: systemd would then change groups after the capabilities are gone
    service: list[tuple[str, str]] = [("Type", "notify"), *([("User", owner)] if owner not in ("root", "0") else [])]
    above = python_path()
    if above is not None:  # a checkout run from its folder: the unit's interpreter must find it too
        service.append(("Environment", f"PYTHONPATH={plain(above, 'the builder package folder')}"))
    service += [("ExecStart", plain_argv(argv, "the boot server's command")), *_RESTART,
                # it writes pxe-root/dnsmasq.conf when it starts, and reads the rest
                ("ReadWritePaths", where)]
    if port < 1024:
        service += [("AmbientCapabilities", "CAP_NET_BIND_SERVICE"), ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE")]
    else:
        service.append(("CapabilityBoundingSet", ""))
    service += HARDENING
    return Unit(BOOT_UNIT, render([("Unit", _unit_head(f"builder boot server for {where}")),
                                   ("Service", service), _INSTALL]))


def check_tftp_readable(root: Path) -> None:
    """dnsmasq serves pxe-root/tftp as its own user, not as the owner: every folder on the way must let others
    through, or it fails to start (say it now, with the folder to change)."""
    tftp = root.resolve() / "tftp"
    for folder in [*reversed(tftp.parents), tftp]:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH or (folder == tftp and not mode & stat.S_IROTH):
            raise RecipeError(f"--root {root}: dnsmasq reads {tftp} as its own user, and {folder} is mode "
                              f"{stat.S_IMODE(mode):04o}, closed to it",
                              f"keep pxe-root in a folder others can enter (e.g. /srv/pxe-root), or chmod o+rx "
                              f"{folder}")


def dnsmasq_unit(root: Path, dnsmasq: str) -> Unit:
    """dnsmasq on pxe-root/dnsmasq.conf (proxy-DHCP and TFTP), restarted with the boot server."""
    root = root.resolve()
    config = plain(root / "dnsmasq.conf", "--root")
    program = plain(dnsmasq, "dnsmasq's path")
    run_dir = "/run/builder-dnsmasq"
    head = [*_unit_head(f"builder proxy-DHCP and TFTP for {plain(root, '--root')} (dnsmasq)",
                        after=f"network-online.target {BOOT_UNIT}"),
            ("Requires", BOOT_UNIT), ("PartOf", BOOT_UNIT)]
    service = [
        # dnsmasq's parent exits once the daemon has bound its sockets, or with the reason it could not: systemd
        # (and `--install`) learn whether it started, which a foreground dnsmasq would not tell
        ("Type", "forking"),
        ("PIDFile", f"{run_dir}/dnsmasq.pid"),
        ("RuntimeDirectory", "builder-dnsmasq"),
        ("ExecStartPre", f"{program} --test --conf-file={config}"),
        ("ExecStart", f"{program} --conf-file={config} --pid-file={run_dir}/dnsmasq.pid "
                      f"--dhcp-leasefile={run_dir}/leases"),
        *_RESTART,
        # root only to bind 67/69, answer DHCP and hand its pid file over; dnsmasq then becomes its own user
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE CAP_NET_RAW CAP_NET_ADMIN CAP_SETUID CAP_SETGID CAP_CHOWN"),
        *HARDENING,
    ]
    return Unit(DNSMASQ_UNIT, render([("Unit", head), ("Service", service), _INSTALL]))


def boot_units(root: Path, bind: Address, port: int, control: Control | None, dnsmasq: str) -> list[Unit]:
    """The boot server's unit, and dnsmasq's with a control node (its subnet and pxe-root/tftp checked first)."""
    units = [boot_server_unit(root, bind, port)]
    if control is not None:
        dnsmasq_config(root, control)  # the clear error about control.subnet, before anything is written
        check_tftp_readable(root)
        units.append(dnsmasq_unit(root, dnsmasq))
    return units
