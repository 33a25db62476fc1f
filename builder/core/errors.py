"""Errors a user can act on: a message that names the file, field or command, and a hint."""


class BuilderError(Exception):
    """Base error; the CLI prints `message` (and `hint`) on one line each and exits with `exit_code`."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class RecipeError(BuilderError):
    """The recipe (or a command-line choice of target/variant) is invalid."""

    exit_code = 2


class SourceError(BuilderError):
    """The llama.cpp source could not be fetched or does not match its pin."""


class ArchiveError(SourceError):
    """An archive holds a member that would land outside its folder, or a device file: nothing is unpacked."""

    exit_code = 2


class EngineError(BuilderError):
    """A container engine is missing or a command it ran failed."""


class CommandError(BuilderError):
    """An external command failed; carries the tail of its output."""

    def __init__(self, message: str, hint: str = "", tail: str = "", log: str = "") -> None:
        super().__init__(message, hint)
        self.tail = tail
        self.log = log

    @property
    def last_line(self) -> str:
        """The command's last line of output (usually its error), else the message."""
        return (self.tail.strip().splitlines() or [self.message])[-1]


class RegistryError(BuilderError):
    """A registry refused, failed or could not be reached; nothing is recorded as published."""


class LockError(BuilderError):
    """The lock file and the recipes disagree, or the lock file is unreadable."""

    exit_code = 2



class Stopped(BaseException):  # noqa: N818 (not an error: the user or the system asked to stop)
    """SIGINT or SIGTERM arrived: clean-up runs on the way out, then the CLI exits 128 + the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# SIGINT/SIGTERM seen by this process. The CLI's handler raises Stopped at once, but an exception raised in a
# signal handler can be swallowed (Python only prints "Exception ignored" when the signal lands inside some
# interpreter and library clean-up code), so every step that marks work as finished checks this too.
_stop_signals: list[int] = []


def request_stop(signum: int) -> bool:
    """Record a stop request; False when one came already (clean-up is running and must finish)."""
    if _stop_signals:
        return False
    _stop_signals.append(signum)
    return True


def raise_if_stopped() -> None:
    """Before anything that marks work as finished (a content tag, a cache name, a `current` link)."""
    if _stop_signals:
        raise Stopped(_stop_signals[0])

