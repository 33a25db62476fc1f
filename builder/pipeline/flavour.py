"""What a flavour of image (llama.cpp, vLLM, …) supplies to the one pipeline (pipeline/build.py runs it).

Content tags, write-if-changed contexts, scratch tags, smoke test, promotion, publishing, netboot and
toolboxes are the same code for every flavour; `Flavour` lists what differs.
"""

import json
import re
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel

from builder.core.paths import cache_subdir
from builder.fetch.source import SourceTree
from builder.plan.bases import LockedBases
from builder.recipe.models import BaseSpec, BuildPlan
from builder.recipe.vllm_models import VllmPlan
from builder.render.context import write_if_changed

Plan = BuildPlan | VllmPlan


@dataclass(frozen=True)
class BuildArgs:
    """What the build service (compiler cache, wheel index) passes to the engine for one build."""

    build_args: dict[str, str]
    env_args: dict[str, str]


@dataclass(frozen=True)
class Prepared:
    """A plan with its rendered files and fingerprint: everything up to the engine, nothing built."""

    flavour: "Flavour"
    plan: Plan
    files: dict[str, bytes]
    fingerprint: str
    locked: LockedBases  # builder.lock's package sets of bootstrapped bases
    recipe_path: Path
    lock: Path  # builder.lock, which the inputs must agree with
    tree: SourceTree | None = None  # llama.cpp: the resolved source tree
    source_override: str | None = None  # llama.cpp: a local tree instead of the pin (development)

    @property
    def name(self) -> str:
        """target/variant as builder prints it (cpu/cpu, cpu/vllm-cpu)."""
        return f"{self.plan.target}/{self.flavour.tag_prefix}{self.plan.variant}"

    @property
    def tag(self) -> str:
        """The content tag: REPO:<variant>-<first 16 hex of the fingerprint>."""
        return f"{self.floating}-{self.fingerprint[:16]}"

    @property
    def floating(self) -> str:
        return f"{self.plan.repository}:{self.flavour.tag_prefix}{self.plan.variant}"

    @property
    def context(self) -> Path:
        """The build context folder in the cache (one per target, variant and flavour)."""
        return cache_subdir("contexts") / f"{self.plan.target}-{self.flavour.tag_prefix}{self.plan.variant}"

    def document(self) -> dict[str, object]:
        """plan.json: the plan, its fingerprint and the image tag."""
        return {**self.plan.model_dump(mode="json"), "fingerprint": self.fingerprint, "image": self.tag}

    def write(self, out: Path) -> list[str]:
        """Write the rendered files and plan.json into `out` (only those whose bytes changed); the changed names."""
        files = {**self.files, "plan.json": (json.dumps(self.document(), indent=2, sort_keys=True) + "\n").encode()}
        return [name for name, data in files.items()
                if write_if_changed(out / name, data, 0o755 if name.startswith("scripts/") else 0o644)]


class Flavour(ABC):
    """One kind of image (builder.flavours.llama.LlamaCpp, builder.flavours.vllm.Vllm), in the order the stages call it:

    recipe_path: its shipped recipe of a target.
    plan: load the recipe and plan the image (llama.cpp resolves its source first: the plan names it).
    render: the context's files and fingerprint; pure, nothing downloaded.
    check: refuse what may not be built (placeholder pins, no wheel lock, disagreeing builder.lock);
        `strict` (publishing): the inputs must be locked.
    fetch: the pinned inputs into the context (checked by sha256); returns the service the build talks to.
    prefetch: the same network-bound inputs into the cache only (`builder fetch`), no context written.
    bases: what the Containerfile builds on, made ready in the engine before the build.
    sbom, run_flags, summary: the SPDX document, `builder run`'s extra engine flags, `builder plan`'s lines.
    """

    name: ClassVar[str]  # what --flavour takes
    tag_prefix: ClassVar[str]  # before the variant in tags and folder names ("" or "vllm-"): keeps tags stable
    serves: ClassVar[str]  # what the image serves with, the word before its version in registry tags
    roles: ClassVar[tuple[str, ...]]  # what `builder run ROLE` accepts (the image's entrypoint roles)
    recipe_model: ClassVar[type[BaseModel]]

    @abstractmethod
    def recipe_path(self, target: str) -> Path: ...
    @abstractmethod
    def plan(self, path: Path, variant: str | None, source_override: str | None, locked: LockedBases,
             epoch: int | None) -> tuple[Plan, SourceTree | None]: ...
    @abstractmethod
    def render(self, plan: Plan) -> tuple[dict[str, bytes], str]: ...
    @abstractmethod
    def check(self, prep: Prepared, lock: Path, *, strict: bool) -> None: ...
    @abstractmethod
    def fetch(self, prep: Prepared, context: Path) -> AbstractContextManager[BuildArgs]: ...
    @abstractmethod
    def prefetch(self, prep: Prepared) -> None: ...
    @abstractmethod
    def bases(self, prep: Prepared) -> list[BaseSpec]: ...
    @abstractmethod
    def sbom(self, prep: Prepared, image: str, digest: str, contents: Any) -> dict[str, Any]: ...
    @abstractmethod
    def summary(self, prep: Prepared) -> dict[str, str]: ...

    def run_flags(self, role: str, args: list[str], shm_size: str) -> tuple[list[str], list[str]]:
        return args, []

    def served_model(self, role: str, args: list[str]) -> str | None:
        """The model a role's arguments name positionally, besides -m/--model (`builder run --model-sha256`)."""
        return None

    def publish_tags(self, prep: Prepared) -> tuple[str, str]:
        """Registry tags: the floating T-V and the immutable T-V-<serves><version>-<content hash>."""
        version = re.sub(r"[^A-Za-z0-9_.-]", "_", prep.plan.labels["org.opencontainers.image.version"])[:40]
        floating = f"{prep.plan.target}-{self.tag_prefix}{prep.plan.variant}"
        return floating, f"{floating}-{self.serves}{version}-{prep.fingerprint[:16]}"
