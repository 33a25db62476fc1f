"""The one place that starts external commands: logs argv, streams output to a log, raises on failure."""

import logging
import os
import re
import shlex
import subprocess
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.text import Text

from builder.errors import CommandError, EngineError

log = logging.getLogger("builder")
TAIL_LINES = 30

# Lines worth showing when output is not a terminal: engine steps, our script's markers, ninja progress.
_STEP = re.compile(r"^(\[\d+/\d+\] )?(STEP \d+/\d+|Step \d+/\d+|\[builder\]|COMMIT|Successfully tagged)")
_NINJA = re.compile(r"^\[(\d+)/(\d+)\] (Building|Linking)")


Argv = Sequence[str | os.PathLike[str]]


def _fmt(argv: Argv) -> str:
    return shlex.join(str(a) for a in argv)


def run(
    argv: Argv,
    *,
    check: bool = True,
    capture: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    input: str | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a short command; on failure raise CommandError with the tail of its output."""
    log.debug("$ %s", _fmt(argv))
    try:
        proc = subprocess.run(
            [str(a) for a in argv],
            capture_output=capture,
            text=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            input=input,
            timeout=timeout,
        )
    except FileNotFoundError:
        raise EngineError(f"command not found: {argv[0]!s}", "install it or put it on PATH") from None
    except subprocess.TimeoutExpired:
        raise CommandError(f"`{_fmt(argv)}` did not finish within {timeout:.0f} s") from None
    if check and proc.returncode != 0:
        output = ((proc.stdout or "") + (proc.stderr or "")).strip().splitlines()
        raise CommandError(
            f"`{_fmt(argv[:3])} …` failed with exit code {proc.returncode}",
            tail="\n".join(output[-TAIL_LINES:]),
        )
    return proc


class _Reporter:
    """Shows progress of a long command: a live last line on a terminal, step lines otherwise."""

    def __init__(self, title: str) -> None:
        self.console = Console(stderr=True)
        self.title = title
        self.live: Live | None = None
        self.ninja_decile = -1

    def __enter__(self) -> "_Reporter":
        if self.console.is_terminal:
            self.live = Live(Text(f"{self.title} …"), console=self.console, transient=True)
            self.live.__enter__()
        else:
            print(f"{self.title} …", file=sys.stderr, flush=True)
        return self

    def line(self, text: str) -> None:
        if self.live is not None:
            self.live.update(Text(f"{self.title}: {text[:150]}", overflow="ellipsis", no_wrap=True))
            return
        ninja = None if _STEP.match(text) else _NINJA.match(text)
        if ninja:
            decile = int(ninja.group(1)) * 10 // max(int(ninja.group(2)), 1)
            if decile <= self.ninja_decile:
                return
            self.ninja_decile = decile
        elif not _STEP.match(text):
            return
        print(f"  {text[:200]}", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)


def run_logged(
    argv: Argv,
    log_path: Path,
    *,
    title: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> None:
    """Run a long command, saving all output to `log_path` and showing progress; raise with the tail."""
    log.debug("$ %s", _fmt(argv))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    with open(log_path, "w") as logfile, _Reporter(title) as reporter:
        logfile.write(f"$ {_fmt(argv)}\n")
        try:
            proc = subprocess.Popen(
                [str(a) for a in argv],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                errors="replace",
                env=dict(env) if env is not None else None,
                cwd=cwd,
            )
        except FileNotFoundError:
            raise EngineError(f"command not found: {argv[0]!s}", "install it or put it on PATH") from None
        assert proc.stdout is not None
        for raw in proc.stdout:
            logfile.write(raw)
            text = raw.rstrip()
            if text:
                tail.append(text)
                reporter.line(text)
        code = proc.wait()
    if code != 0:
        raise CommandError(
            f"{title} failed (exit code {code})",
            hint=f"full log: {log_path}",
            tail="\n".join(tail),
            log=str(log_path),
        )
