"""What an engine reports about an image (builder/engines/cli.py holds the engine interface)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageInfo:
    ref: str
    id: str  # sha256:<hex> of the image config: the local content address of the image
    labels: dict[str, str]
    size: int  # uncompressed bytes
    env: tuple[str, ...] = ()  # the image's ENV as KEY=VALUE, for roots that run without an engine (netboot)
