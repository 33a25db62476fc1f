"""Pydantic models: recipes as written by users, and the build plan derived from them. No I/O here."""

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from builder.targets import DEFAULT_BINARIES

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="lowercase hex sha256")]
PackageName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9+.-]+$")]


def _relative_path(value: str) -> str:
    if value.startswith("/") or ".." in value.split("/"):
        raise ValueError("must be a relative path inside the source, without '..'")
    return value


RelPath = Annotated[str, AfterValidator(_relative_path)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageBase(Strict):
    """A base image from a registry, pinned by digest (what users normally use)."""

    kind: Literal["image"]
    ref: str = Field(description="registry reference with @sha256:<digest>, e.g. debian:bookworm-slim@sha256:…")

    @field_validator("ref")
    @classmethod
    def _pinned(cls, ref: str) -> str:
        if not re.search(r"@sha256:[0-9a-f]{64}$", ref):
            raise ValueError("must be pinned by digest: NAME[:TAG]@sha256:<64 hex digits>")
        return ref


class BootstrapBase(Strict):
    """A base image bootstrapped from Debian packages with mmdebstrap and imported into the engine."""

    kind: Literal["bootstrap"]
    suite: str = Field("bookworm", pattern=r"^[a-z][a-z-]+$", description="Debian suite, e.g. bookworm")
    mirror: str | None = Field(None, description="Debian mirror URL; default: mmdebstrap's default")
    packages: list[PackageName] = Field(default_factory=list, description="packages on top of minbase")
    components: list[Annotated[str, Field(pattern=r"^[a-z][a-z-]*$")]] = Field(
        default_factory=lambda: ["main"], min_length=1,
        description="archive components, e.g. [main, non-free] for NVIDIA's CUDA toolkit")


BaseSpec = Annotated[ImageBase | BootstrapBase, Field(discriminator="kind")]


class Bases(Strict):
    toolchain: BaseSpec = Field(description="base of the stage that compiles llama.cpp")
    runtime: BaseSpec = Field(description="base of the slim image that ships the binaries")


class GitSource(Strict):
    """llama.cpp from a git repository at a pinned ref (a commit id is best)."""

    kind: Literal["git"]
    url: str
    ref: str = Field(min_length=1)
    subdir: RelPath = ""


class ArchiveSource(Strict):
    """llama.cpp from a tar archive (URL or local path) checked against its sha256."""

    kind: Literal["archive"]
    url: str
    sha256: Sha256
    subdir: RelPath = ""


class PypiSource(Strict):
    """llama.cpp from a PyPI sdist that vendors it (e.g. llama-cpp-python's vendor/llama.cpp)."""

    kind: Literal["pypi"]
    package: PackageName
    version: str = Field(pattern=r"^[0-9A-Za-z.+-]+$")
    sha256: Sha256
    subdir: RelPath = ""


SourceSpec = Annotated[GitSource | ArchiveSource | PypiSource, Field(discriminator="kind")]


class LlamaCpp(Strict):
    source: SourceSpec
    cmake: dict[str, str] = Field(default_factory=dict, description="extra -D flags, override the defaults")
    binaries: list[str] = Field(default_factory=lambda: list(DEFAULT_BINARIES))


class VariantRecipe(Strict):
    """How one variant of the target is built: its bases and any extra CMake flags."""

    base: Bases
    cmake: dict[str, str] = Field(default_factory=dict, description="extra -D flags for this variant")


class Recipe(Strict):
    """One recipe per target: recipes/<target>.yaml, with a section per variant it can build."""

    target: str = Field(description="a target from `builder targets`")
    description: str = ""
    variants: dict[str, VariantRecipe] = Field(min_length=1, description="variant name -> how to build it")
    llama_cpp: LlamaCpp | None = Field(None, description="default: the shared pin in recipes/llama-cpp.yaml")
    labels: dict[str, str] = Field(default_factory=dict, description="extra OCI labels")


class SourceInfo(Strict):
    """The llama.cpp source as resolved on disk."""

    locator: str = Field(description="where it came from, for people")
    identity: str = Field(description="content identity: sha256 of the archive, git commit or tree hash")
    version: str
    epoch: int = Field(description="the source's own timestamp, used when SOURCE_DATE_EPOCH is unset")


class BuildPlan(Strict):
    """Everything that determines an image, resolved from a recipe; rendering and building read only this."""

    recipe: str
    target: str
    variant: str
    description: str
    toolchain_ref: str
    runtime_ref: str
    toolchain: BaseSpec
    runtime: BaseSpec
    source: SourceInfo
    cmake: dict[str, str]
    binaries: list[str]
    labels: dict[str, str]
    smoke_device: str
    repository: str
