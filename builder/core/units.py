"""systemd units for the control node's servers: written from checked values, installed atomically, enabled.

systemd reads `%` as a specifier, `$` as a variable in command lines, quotes and backslashes as escapes, and a
newline as the end of a setting: a value that reaches a unit is either plain characters (paths, names) or a
number or IP address checked by its type, and anything else is refused with one line before a file is written.
"""

import os
import re
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from builder.core.errors import CommandError, EngineError, RecipeError
from builder.core.files import write_atomically
from builder.core.run import run

UNIT_DIR = Path("/etc/systemd/system")
# Paths and words that reach a unit: no blank, quote, backslash, `%` (specifier) or `$` (variable).
_PLAIN = re.compile(r"[A-Za-z0-9/._+,:@=~-]+")
_UNIT_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*\.service")
SYSTEMCTL_TIMEOUT = 120  # starting a unit waits for it to be ready (Type=notify) or to fail

Section = tuple[str, Sequence[tuple[str, str]]]
# Sandboxing every unit builder writes gets: each removes a kernel or mount feature its server never uses.
HARDENING: list[tuple[str, str]] = [
    ("NoNewPrivileges", "yes"),
    ("PrivateTmp", "yes"),
    ("ProtectSystem", "strict"),
    ("ProtectKernelTunables", "yes"),
    ("ProtectKernelModules", "yes"),
    ("ProtectControlGroups", "yes"),
    ("RestrictSUIDSGID", "yes"),
    ("LockPersonality", "yes"),
]


@dataclass(frozen=True)
class Unit:
    name: str  # e.g. builder-pxe.service
    text: str


def plain(value: str | Path, what: str) -> str:
    """`value` as it may stand in a unit file (a path or word of plain characters), or one line saying why not."""
    text = str(value)
    if not _PLAIN.fullmatch(text):
        odd = next((c for c in text if not _PLAIN.fullmatch(c)), "")
        shown = repr(odd) if odd else "nothing"
        raise RecipeError(f"{what} {text!r}: a systemd unit cannot hold {shown} safely (systemd reads % as a "
                          "specifier, $ as a variable, blanks and quotes as word breaks)",
                          "use a path of plain characters (letters, digits, / . _ + , : @ = ~ -)")
    return text


def plain_argv(argv: Sequence[str | Path], what: str) -> str:
    """A command line for Exec*=: every word plain (so systemd splits and reads it exactly as given)."""
    return " ".join(plain(word, what) for word in argv)


def render(sections: Sequence[Section], *, instance: bool = False) -> str:
    """A unit file: a header line, then each section's settings in the order given. A last guard: no value
    holds a control character or a `%` (the values were checked by `plain` or their type before); a template
    unit (`instance`) may hold `%i`, its instance name, and no other specifier."""
    lines = ["# Written by builder: regenerate it with the same command, do not edit."]
    for title, settings in sections:
        lines += ["", f"[{title}]"]
        for key, value in settings:
            bare = value.replace("%i", "") if instance else value
            if "%" in bare or not value.isprintable():
                raise RecipeError(f"{key}={value!r}: a unit setting must be one line without %")
            lines.append(f"{key}={value}")
    return "\n".join(lines) + "\n"


def python_command() -> list[str]:
    """This builder as a unit starts it: this interpreter, absolute, with `-m builder`."""
    return [str(Path(sys.executable).absolute()), "-m", "builder"]


def python_path() -> Path | None:
    """The folder above the builder package when the interpreter would not find it on its own (a checkout run
    with `python -m builder` from its folder); None for an installed builder."""
    import site

    import builder

    above = Path(builder.__file__).resolve().parent.parent
    installed = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    return None if above in installed else above


@dataclass(frozen=True)
class Installed:
    name: str
    state: str  # "installed" (new), "updated" (rewritten and restarted), "unchanged"


def require_systemd(verb: str) -> None:
    """--install writes /etc/systemd/system and talks to the running systemd: root, on a machine booted with it."""
    if not Path("/run/systemd/system").is_dir():
        raise EngineError(f"{verb} --install: this machine does not run systemd",
                          "start the server in the foreground instead, or use --print to see the units")
    if os.geteuid() != 0:
        raise EngineError(f"{verb} --install writes {UNIT_DIR} and needs root", f"sudo {verb} --install …")


def install(units: Sequence[Unit], unit_dir: Path = UNIT_DIR) -> list[Installed]:
    """Write each unit (only where its text changed, atomically), reload systemd, enable and start them all,
    and restart the ones that were rewritten. Running again with the same units changes nothing."""
    results = []
    for unit in units:
        if not _UNIT_NAME.fullmatch(unit.name):
            raise RecipeError(f"{unit.name!r} is not a plain unit name")
        path = unit_dir / unit.name
        old = path.read_text() if path.is_file() else None
        if old != unit.text:
            write_atomically(path, unit.text)
        results.append(Installed(unit.name, "unchanged" if old == unit.text else
                                 "installed" if old is None else "updated"))
    names = [unit.name for unit in units]
    if any(r.state != "unchanged" for r in results):
        run(["systemctl", "daemon-reload"], timeout=SYSTEMCTL_TIMEOUT)
    updated = [r.name for r in results if r.state == "updated"]
    try:
        run(["systemctl", "enable", "--now", "--", *names], timeout=SYSTEMCTL_TIMEOUT)
        if updated:
            run(["systemctl", "restart", "--", *updated], timeout=SYSTEMCTL_TIMEOUT)
    except CommandError as exc:
        failed = [name for name in names if not is_active(name)] or names
        raise CommandError(f"systemd could not start {', '.join(failed)}",
                           f"`journalctl -u {failed[0]} -n 30` says why; the units stay installed and enabled, "
                           "and systemd tries again every few seconds", tail=exc.tail) from None
    return results


def systemctl(*words: str) -> None:
    run(["systemctl", *words], timeout=SYSTEMCTL_TIMEOUT)


def is_active(name: str) -> bool:
    return run(["systemctl", "is-active", "--quiet", "--", name], check=False, timeout=SYSTEMCTL_TIMEOUT
               ).returncode == 0


def notify_ready() -> None:
    """Tell systemd a Type=notify unit is ready (READY=1 on $NOTIFY_SOCKET); nothing when not run by systemd."""
    where = os.environ.get("NOTIFY_SOCKET", "")
    if not where.startswith(("/", "@")):
        return
    address = "\0" + where[1:] if where.startswith("@") else where
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(b"READY=1")
