"""Files replaced whole: a reader sees the old text or the new one, never part of either."""

import os
from pathlib import Path


def write_atomically(path: Path, data: str | bytes) -> None:
    """Write `data` beside `path` (a hidden `.NAME.part`), flush it to disk, then rename it over `path`
    (mode 0644). The partial file is removed when the write fails."""
    partial = path.with_name(f".{path.name}.part")
    try:
        with open(partial, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(partial, 0o644)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
