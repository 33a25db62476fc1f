"""File locks (flock) around state that two builder runs could share: a build context, a cache entry,
a pxe-root, a pull destination. A second run waits, and says what for; the lock goes with the process, so
a killed run never leaves one held.
"""

import fcntl
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from builder.core.paths import cache_subdir


def lock_file(name: str) -> Path:
    """A lock under the cache's locks/ folder, for state kept in the cache."""
    return cache_subdir("locks") / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.lock"


@contextmanager
def locked(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) while the block runs; wait for it if taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # flock, not lockf: its lock belongs to this open file, so no other open of the same file (in this
    # process or a library's) can drop it by closing, and children started later do not inherit it.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logging.getLogger("builder.progress").info("waiting for another builder %s (lock %s)", what, path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
