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
