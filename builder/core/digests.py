"""sha256 digests: of bytes (as OCI names them), of a file, of a JSON document (a stable name for inputs)."""

import hashlib
import json
from pathlib import Path
from typing import Any


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in blocks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def json_hash(doc: Any) -> str:
    """The hex sha256 of a JSON document with sorted keys."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
