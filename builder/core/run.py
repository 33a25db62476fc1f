"""The one place that starts external commands: logs argv, streams output to a log, raises on failure."""

import ctypes
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.text import Text

from builder.core.errors import CommandError, EngineError, Stopped

log = logging.getLogger("builder")
TAIL_LINES = 30
STOP_GRACE = 20  # seconds a stopped command gets to clean up before SIGKILL
_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_Mask = set[int | signal.Signals]  # a thread's blocked signals, as pthread_sigmask returns them

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
    pipe = subprocess.PIPE if capture else None
    proc, held = _start(argv, stdin=subprocess.PIPE if input is not None else None, stdout=pipe, stderr=pipe,
                        text=True, env=dict(env) if env is not None else None, cwd=cwd)
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        stdout, stderr = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise CommandError(f"`{_fmt(argv)}` did not finish within {timeout:.0f} s") from None
    except BaseException:
        stop(proc)  # an error, Ctrl-C or SIGTERM here: the command must not outlive builder's clean-up
        raise
    if check and proc.returncode != 0:
        output = ((stdout or "") + (stderr or "")).strip().splitlines()
        raise CommandError(
            f"`{_fmt(argv[:3])} …` failed with exit code {proc.returncode}",
            tail="\n".join(output[-TAIL_LINES:]),
        )
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM (engines clean up their build containers on it), then SIGKILL after a grace period."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@cache
def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _child_setup(held: _Mask) -> Callable[[], None]:
    """For Popen: the child gets SIGTERM when builder dies, even by SIGKILL, so no build runs on orphaned,
    and it starts with the signal mask builder had before `_start` held the stop signals back.

    Runs in the child between fork and exec, and calls nothing that takes a lock. PR_SET_PDEATHSIG is
    Linux only.
    """
    prctl = _prctl()
    parent = os.getpid()

    def preexec() -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:  # builder died before the line above took effect
                os._exit(1)
    return preexec


def _start(argv: Argv, **options: Any) -> tuple[subprocess.Popen[str], _Mask]:
    """Popen with Ctrl-C and SIGTERM held back until it returns, so a stop can never land after the fork
    but before the caller knows the child (which would then run on while builder cleans up).

    The caller must pass the returned mask to `signal.pthread_sigmask(SIG_SETMASK, …)` inside the `try`
    that stops the child: a stop that arrived meanwhile is raised there.
    """
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        proc: subprocess.Popen[str] = subprocess.Popen([str(a) for a in argv], preexec_fn=_child_setup(held),
                                                       **options)
    except FileNotFoundError:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        raise EngineError(f"command not found: {argv[0]!s}", "install it or put it on PATH") from None
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        raise
    return proc, held


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
        proc, held = _start(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, errors="replace", env=dict(env) if env is not None else None, cwd=cwd)
        assert proc.stdout is not None
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            for raw in proc.stdout:
                logfile.write(raw)
                text = raw.rstrip()
                if text:
                    tail.append(text)
                    reporter.line(text)
            code = proc.wait()
        except BaseException:
            stop(proc)
            raise
    if code != 0:
        raise CommandError(
            f"{title} failed (exit code {code})",
            hint=f"full log: {log_path}",
            tail="\n".join(tail),
            log=str(log_path),
        )


# An engine command that only touches local storage (tag, rm, inspect): past this it hangs, it is not working.
LOCAL_TIMEOUT = 300


def replace_process(argv: Argv, env: Mapping[str, str] | None = None) -> None:
    """Replace builder with the command (an interactive container, a tool's shell); never returns."""
    log.debug("$ %s", _fmt(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    args = [str(a) for a in argv]
    try:
        os.execvpe(args[0], args, dict(env) if env is not None else os.environ)
    except FileNotFoundError:
        raise EngineError(f"command not found: {args[0]}", "install it or put it on PATH") from None


def follow(argv: Argv) -> int | None:
    """Run a command whose output streams to builder's own until it ends (a `tail -F` over ssh): its exit code, or
    None when builder is stopped (Ctrl-C, SIGTERM), which ends it cleanly. Its stdin is a pipe builder holds open
    and closes first on the way out, so a remote command that reads it sees the session end."""
    log.debug("$ %s", _fmt(argv))
    sys.stdout.flush()
    proc, held = _start(argv, stdin=subprocess.PIPE, text=True)
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        return proc.wait()
    except (KeyboardInterrupt, Stopped):
        return None
    finally:
        if proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            stop(proc)


def start_server(argv: Argv) -> "subprocess.Popen[str]":
    """Start a helper that serves until `stop` (dnsmasq); it dies with builder."""
    log.debug("$ %s", _fmt(argv))
    proc, held = _start(argv, text=True)
    signal.pthread_sigmask(signal.SIG_SETMASK, held)  # from here the caller stops it; before, PDEATHSIG would
    return proc
