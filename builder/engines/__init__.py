"""Pick an engine by name, or the first usable one for `auto`."""

from collections.abc import Callable

from builder.core.errors import EngineError
from builder.engines.base import ImageInfo
from builder.engines.cli import Engine
from builder.engines.docker import DockerEngine
from builder.engines.podman import PodmanEngine

ENGINES: dict[str, Callable[[], Engine]] = {"podman": PodmanEngine, "docker": DockerEngine}
ENGINE_CHOICES = ("auto", *ENGINES)

__all__ = ["ENGINES", "ENGINE_CHOICES", "Engine", "ImageInfo", "get_engine"]


def get_engine(name: str = "auto") -> Engine:
    if name != "auto" and name not in ENGINES:
        raise EngineError(f"--engine: unknown engine {name!r}", f"choose one of: {', '.join(ENGINE_CHOICES)}")
    names = list(ENGINES) if name == "auto" else [name]
    reasons = []
    for candidate in names:
        engine: Engine = ENGINES[candidate]()
        reason = engine.available()
        if reason is None:
            return engine
        reasons.append(reason)
    raise EngineError(
        "no usable container engine: " + "; ".join(reasons),
        "install podman (apt-get install podman) or docker.io and start dockerd",
    )
