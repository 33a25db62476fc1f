"""Pydantic models of the vLLM flavour: recipes/vllm/<target>.yaml and the plan made from it. No I/O here."""

import re
from typing import Annotated, ClassVar

from pydantic import Field, field_validator, model_validator

from builder.core.types import CommandWord, DistName, EnvName, HttpUrl, ImageRef, LabelKey, OneLine, Version
from builder.recipe.models import BaseSpec, RelPath, Strict, TableName

# The version part takes a shell's safe characters only: the compiled package reaches a RUN line.
Requirement = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?(==|===)"
                                           r"[A-Za-z0-9][A-Za-z0-9.+!_-]*$",
                                   description="an exact pin: NAME==VERSION (=== for a version without a local tag)")]


class Compile(Strict):
    """Build vLLM from its source distribution against the installed torch (vendor torch builds)."""

    package: Requirement = Field(description="the vLLM sdist to build, e.g. vllm==0.32.0")
    env: dict[EnvName, OneLine] = Field(default_factory=dict, description="build environment, e.g. VLLM_TARGET_DEVICE")
    env_from: dict[EnvName, Annotated[list[CommandWord], Field(min_length=1)]] = Field(
        default_factory=dict, description="build environment from the output of a program in the virtual "
        "environment's bin/ folder: NAME: [PROGRAM, ARG, …], e.g. ROCM_PATH: [rocm-sdk, path, --root]")


    @field_validator("env_from")
    @classmethod
    def _programs(cls, env_from: dict[str, list[str]]) -> dict[str, list[str]]:
        for key, argv in env_from.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", argv[0]):
                raise ValueError(f"{key}: {argv[0]!r} must be a program name in the virtual environment's bin/ folder")
        return env_from


class VllmVariant(Strict):
    """How the vLLM image of one variant is made: a base with Python, and pinned Python packages."""

    base: BaseSpec = Field(description="the image's base; it must carry python3 and python3-venv")
    toolchain: BaseSpec | None = Field(None, description="base of the stage that compiles vLLM (with `compile`)")
    python: str = Field(pattern=r"^3\.[0-9]+$", description="the base's Python version, e.g. 3.11")
    requirements: list[Requirement] = Field(min_length=1, description="exact top-level pins the lock resolves")
    index: HttpUrl | None = Field(None, description="an extra package index (vendor wheels); default: PyPI only")
    lock: RelPath | None = Field(None, description="lock file beside the recipe; default <recipe>-<variant>.lock")
    compile: Compile | None = None
    leave_out: list[DistName] = Field(default_factory=list, description="packages dropped from the lock (installed "
                                      "with --no-deps): dependencies whose index builds cannot work in this image")
    alias: DistName | None = Field(None, description="another distribution name the vLLM package must answer to")
    env: dict[str, OneLine] = Field(default_factory=dict, description="environment variables set in the image")

    @model_validator(mode="after")
    def _toolchain_for_compile(self) -> "VllmVariant":
        if self.compile is not None and self.toolchain is None:
            raise ValueError("`compile` needs a `toolchain` base to compile in")
        return self

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for key in env:
            if not re.match(r"^[A-Z_][A-Z0-9_]*$", key):
                raise ValueError(f"{key!r} is not an environment variable name")
        return env


class VllmRecipe(Strict):
    """One vLLM recipe per target: recipes/vllm/<target>.yaml, a section per variant vLLM runs on."""

    SCHEMA_COMMAND: ClassVar[str] = "builder schema --flavour vllm"

    target: TableName = Field(description="a target from `builder targets`")
    description: OneLine = ""
    variants: dict[TableName, VllmVariant] = Field(min_length=1)
    labels: dict[LabelKey, OneLine] = Field(default_factory=dict, description="extra OCI labels")


class VllmPlan(Strict):
    """Everything that determines a vLLM image; rendering and building read only this."""

    flavour: str = "vllm"
    recipe: str
    target: str
    variant: str
    device: str = Field(description="vLLM's name for the device: cpu, cuda, rocm, xpu")
    description: str
    base_ref: ImageRef
    base: BaseSpec
    toolchain_ref: ImageRef | None
    toolchain: BaseSpec | None
    python: str
    requirements: list[str]
    index: HttpUrl | None
    lock_file: str | None = Field(description="the lock (exact versions + sha256) or None: unlocked, render-only")
    lock_pins: list[str]
    compile: Compile | None
    leave_out: list[DistName]
    alias: DistName | None
    env: dict[EnvName, OneLine]
    vllm_version: Version
    labels: dict[LabelKey, OneLine]
    repository: str
