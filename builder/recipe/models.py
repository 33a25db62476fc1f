"""Pydantic models: recipes as written by users, and the build plan derived from them. No I/O here."""

import re
from dataclasses import dataclass
from typing import Annotated, Literal
from urllib.parse import unquote

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StrictBool,
    field_validator,
    model_validator,
)

from builder.core.errors import RecipeError
from builder.core.types import (
    ArchiveUrl,
    BinaryName,
    CmakeName,
    EnvName,
    GitRef,
    GitUrl,
    HttpUrl,
    ImageRef,
    LabelKey,
    MirrorUrl,
    OneLine,
    PinnedImageRef,
    RelativeGlob,
    ShipGlob,
    one_line,
    parse_image_ref,
)
from builder.recipe.targets import DEFAULT_BINARIES

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="lowercase hex sha256")]
PackageName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9+.-]+$")]


def _relative_path(value: str) -> str:
    if value.startswith("/") or ".." in value.split("/"):
        raise ValueError("must be a relative path inside the source, without '..'")
    return one_line(value)


RelPath = Annotated[str, AfterValidator(_relative_path)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# A digest or sha256 of all zeros marks a pin nobody has checked yet: recipes may render with it, builds refuse it.
PLACEHOLDER_SHA256 = "0" * 64
AptPackage = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9+.-]+(=[A-Za-z0-9.+~:-]+)?$",
                                  description="an apt package, optionally pinned: NAME=VERSION")]


class AptRepository(Strict):
    """A vendor apt repository added to an image base; its signing key is pinned by sha256."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", description="file name for its .list and key")
    url: HttpUrl = Field(description="the repository's base URL")
    suite: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$", description="e.g. noble, or a path ending in /")
    components: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")]] = Field(
        default_factory=lambda: ["main"])
    key_url: HttpUrl = Field(description="its ASCII-armored OpenPGP signing key")
    key_sha256: Sha256


class DebFile(Strict):
    """A .deb file installed into an image base, pinned by URL and sha256 (vendor releases outside any repo)."""

    url: HttpUrl = Field(description="where the .deb is downloaded from; its last part names the file")
    sha256: Sha256

    @field_validator("url")
    @classmethod
    def _deb_file(cls, url: str) -> str:
        # The file is saved under this name in the build context: no '..', no encoded '/'.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+~%-]*\.deb", url.rsplit("/", 1)[-1]) or \
                not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+~-]*\.deb", unquote(url.rsplit("/", 1)[-1])):
            raise ValueError("must end in a .deb file name (letters, digits and . _ + ~ -)")
        return url


class ImageBase(Strict):
    """A base image from a registry, pinned by digest (what users normally use).

    `packages` (and any vendor `repositories` they come from) are installed with apt on top of it.
    """

    kind: Literal["image"]
    ref: PinnedImageRef = Field(description="registry reference with @sha256:<digest>, "
                                "e.g. debian:bookworm-slim@sha256:…")
    repositories: list[AptRepository] = Field(default_factory=list, description="vendor apt repositories to add")
    packages: list[AptPackage] = Field(default_factory=list, description="apt packages installed on top")
    debs: list[DebFile] = Field(default_factory=list, description=".deb files installed on top, with their deps")


SuiteName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]*[a-z0-9]$",
                                  description="a Debian suite name, e.g. sid, experimental, trixie-backports")]


def _dpkg_glob(value: str) -> str:
    if ".." in value.split("/"):
        raise ValueError("must not contain '..'")
    return value


# dpkg matches these like the shell, except that '*' also matches '/'.
DpkgGlob = Annotated[str, Field(pattern=r"^/[A-Za-z0-9_.+*?/-]+$",
                                description="an absolute path glob as dpkg's path-exclude takes it"),
                     AfterValidator(_dpkg_glob)]


class ExtraSuite(Strict):
    """Another suite of the base's archive (e.g. experimental on top of sid) and the packages taken from it.

    The suite is added to the base's apt sources, and apt is pinned to take exactly these packages from it
    (at priority 990); every other package, and every package's dependencies not listed here, come from
    the base's own suite. List the dependencies that both suites carry when the one in `suite` is too old.
    """

    suite: SuiteName
    packages: list[PackageName] = Field(min_length=1, description="packages taken from this suite")


class Prune(Strict):
    """Files of the base's packages that dpkg does not unpack: those matching `drop`, except those matching `keep`.

    For kernel libraries with one file per GPU family, so a base carries only its target's. It happens while
    the base is made, so the files never reach a layer.
    """

    drop: DpkgGlob
    keep: list[DpkgGlob] = Field(default_factory=list, description="globs among `drop` that stay")


class BootstrapBase(Strict):
    """A base image bootstrapped from Debian packages with mmdebstrap and imported into the engine."""

    kind: Literal["bootstrap"]
    suite: str = Field("bookworm", pattern=r"^[a-z][a-z-]+$", description="Debian suite, e.g. bookworm")
    mirror: MirrorUrl | None = Field(None, description="Debian mirror URL (http, https or file); default: Debian's")
    packages: list[PackageName] = Field(default_factory=list, description="packages on top of minbase")
    components: list[Annotated[str, Field(pattern=r"^[a-z][a-z-]*$")]] = Field(
        default_factory=lambda: ["main"], min_length=1,
        description="archive components, e.g. [main, non-free] for NVIDIA's CUDA toolkit")
    extra_suites: list[ExtraSuite] = Field(
        default_factory=list, description="other suites of the archive and the packages taken from each")
    prune: list[Prune] = Field(default_factory=list, description="package files left out of the base")

    @model_validator(mode="after")
    def _suites_distinct(self) -> "BootstrapBase":
        suites, taken = {self.suite}, dict[str, str]()
        for i, extra in enumerate(self.extra_suites):
            if extra.suite in suites:
                raise ValueError(f"extra_suites[{i}].suite: {extra.suite} is already a suite of this base")
            suites.add(extra.suite)
            for name in extra.packages:
                if name in taken:
                    raise ValueError(f"extra_suites[{i}].packages: {name} is taken from {taken[name]} already")
                taken[name] = extra.suite
        return self


BaseSpec = Annotated[ImageBase | BootstrapBase, Field(discriminator="kind")]


class Bases(Strict):
    toolchain: BaseSpec = Field(description="base of the stage that compiles llama.cpp")
    runtime: BaseSpec = Field(description="base of the slim image that ships the binaries")


class GitSource(Strict):
    """llama.cpp from a git repository at a pinned ref (a commit id is best)."""

    kind: Literal["git"]
    url: GitUrl = Field(description="https://, http://, ssh://, git://, file:// or an absolute path")
    ref: GitRef
    subdir: RelPath = ""


class ArchiveSource(Strict):
    """llama.cpp from a tar archive (URL or local path) checked against its sha256."""

    kind: Literal["archive"]
    url: ArchiveUrl = Field(description="https://, http:// or an absolute path")
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
    cmake: dict[CmakeName, OneLine] = Field(default_factory=dict, description="extra -D flags, override the defaults")
    binaries: list[BinaryName] = Field(default_factory=lambda: list(DEFAULT_BINARIES))


WHEEL_FILE = re.compile(r"^(?P<name>[A-Za-z0-9_.]+)-(?P<version>[A-Za-z0-9_.+!]+)(-(?P<build>[0-9][A-Za-z0-9_]*))?"
                        r"-(?P<python>[a-z0-9_.]+)-(?P<abi>[a-z0-9_.]+)-(?P<platform>[a-z0-9_.]+)\.whl\Z")
SDK_NAME = r"^[a-z0-9][a-z0-9_-]*$"


def wheel_tags(file: str) -> dict[str, str]:
    """The parts of a wheel file name (name, version, build, python, abi, platform)."""
    match = WHEEL_FILE.match(file)
    if match is None:
        raise ValueError(f"{file}: not a wheel file name")
    return {key: value or "" for key, value in match.groupdict().items()}


class WheelSdk(Strict):
    """A binary wheel (e.g. OpenVINO's runtime from PyPI) pinned by file name and sha256.

    Fetched with `pip download` once, unpacked by builder, and copied into the build stage at
    /opt/sdk/<name>; the files matching `ship` go into the runtime image next to the binaries.
    """

    kind: Literal["wheel"]
    package: PackageName
    version: str = Field(pattern=r"^[0-9A-Za-z.+-]+$")
    file: str = Field(description="the exact wheel file: NAME-VERSION[-BUILD]-PYTHON-ABI-PLATFORM.whl")
    sha256: Sha256
    ship: list[RelativeGlob] = Field(default_factory=list,
                                description="globs inside the unpacked wheel that the runtime image needs")

    @field_validator("file")
    @classmethod
    def _wheel_name(cls, file: str) -> str:
        if not WHEEL_FILE.match(file):
            raise ValueError("must be a wheel file name: NAME-VERSION[-BUILD]-PYTHON-ABI-PLATFORM.whl")
        return file

    @model_validator(mode="after")
    def _file_matches(self) -> "WheelSdk":
        tags = wheel_tags(self.file)
        if tags["name"].lower() != re.sub(r"[-_.]+", "_", self.package).lower() or tags["version"] != self.version:
            raise ValueError(f"file {self.file} is not {self.package} {self.version}")
        return self


SdkSpec = Annotated[WheelSdk, Field(discriminator="kind")]


class VariantRecipe(Strict):
    """How one variant of the target is built: its bases, any extra CMake flags and pinned SDKs."""

    base: Bases
    cmake: dict[CmakeName, OneLine] = Field(default_factory=dict, description="extra -D flags for this variant")
    sdks: dict[Annotated[str, Field(pattern=SDK_NAME)], SdkSpec] = Field(
        default_factory=dict, description="name -> a pinned SDK the build needs, placed at /opt/sdk/<name>")
    env: dict[EnvName, OneLine] = Field(
        default_factory=dict, description="environment of the runtime image (on top of the target's)")
    ship: list[ShipGlob] = Field(
        default_factory=list, description="globs of files in the toolchain stage the runtime image needs")
    rpc_rdma: StrictBool = Field(
        False, description="RPC over RDMA (RoCE/InfiniBand): build ggml-rpc against libibverbs and ship it")


# Target and variant names come from the table in recipe/targets.py; the charset keeps a wrong one printable.
TableName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")]


class Recipe(Strict):
    """One recipe per target: recipes/<target>.yaml, with a section per variant it can build."""

    target: TableName = Field(description="a target from `builder targets`")
    description: OneLine = ""
    variants: dict[TableName, VariantRecipe] = Field(min_length=1, description="variant name -> how to build it")
    llama_cpp: LlamaCpp | None = Field(None, description="default: the shared pin in recipes/llama-cpp.yaml")
    labels: dict[LabelKey, OneLine] = Field(default_factory=dict, description="extra OCI labels")


class SourceInfo(Strict):
    """The llama.cpp source as resolved on disk."""

    locator: str = Field(description="where it came from, for people")
    identity: str = Field(description="content identity: sha256 of the archive, git commit or tree hash")
    version: str
    epoch: int = Field(description="the source's own timestamp, used when SOURCE_DATE_EPOCH is unset")


@dataclass(frozen=True)
class Placeholder:
    """A pin still holding PLACEHOLDER_SHA256, with what it pins."""

    field: str  # e.g. variants.rocm.base.toolchain.repositories[0].key_sha256
    source: str  # the image reference without its digest, a file's URL, or an SDK wheel's file name
    kind: Literal["image", "file", "wheel"]


LLAMA_BASE_FIELDS = ("base.toolchain", "base.runtime")  # where a llama.cpp variant's two bases are
VLLM_BASE_FIELDS = ("toolchain", "base")  # and a vLLM variant's (its toolchain is optional)


def placeholders_of(where: str, toolchain: BaseSpec | None, runtime: BaseSpec, sdks: dict[str, SdkSpec],
                    fields: tuple[str, str] = LLAMA_BASE_FIELDS) -> list[Placeholder]:
    """Every placeholder pin of one variant (`where` is its field path, `fields` its bases'), in recipe order."""
    found = []
    for stage, base in zip(fields, (toolchain, runtime), strict=True):
        if not isinstance(base, ImageBase):
            continue
        if parse_image_ref(base.ref).digest == f"sha256:{PLACEHOLDER_SHA256}":
            found.append(Placeholder(f"{where}.{stage}.ref", base.ref.rsplit("@", 1)[0], "image"))
        found += [Placeholder(f"{where}.{stage}.repositories[{i}].key_sha256", repo.key_url, "file")
                  for i, repo in enumerate(base.repositories) if repo.key_sha256 == PLACEHOLDER_SHA256]
        found += [Placeholder(f"{where}.{stage}.debs[{i}].sha256", deb.url, "file")
                  for i, deb in enumerate(base.debs) if deb.sha256 == PLACEHOLDER_SHA256]
    found += [Placeholder(f"{where}.sdks.{name}.sha256", sdk.file, "wheel")
              for name, sdk in sdks.items() if sdk.sha256 == PLACEHOLDER_SHA256]
    return found


def refuse_placeholders(recipe: str, target: str, variant: str, toolchain: BaseSpec | None, runtime: BaseSpec,
                        sdks: dict[str, SdkSpec], fields: tuple[str, str] = LLAMA_BASE_FIELDS) -> None:
    """Recipe fields that still hold the all-zeros placeholder instead of a checked digest or sha256 never build
    (either flavour: `builder matrix` asks the same question through `placeholders_of`)."""
    found = [p.field for p in placeholders_of(f"variants.{variant}", toolchain, runtime, sdks, fields)]
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise RecipeError(f"{recipe}: {found[0]}{more}: placeholder pin (all zeros), never checked; "
                          "refusing to build",
                          f"where the registry and vendor sites are reachable, `builder pin --target {target}` "
                          "reads the real values into the recipe (then run `builder lock`)")


class BuildPlan(Strict):
    """Everything that determines an image, resolved from a recipe; rendering and building read only this."""

    recipe: str
    target: str
    variant: str
    description: str
    toolchain_ref: ImageRef
    runtime_ref: ImageRef
    toolchain: BaseSpec
    runtime: BaseSpec
    source: SourceInfo
    cmake: dict[CmakeName, OneLine]
    binaries: list[BinaryName]
    labels: dict[LabelKey, OneLine]
    smoke_device: str
    repository: str
    driver_modules: str = Field(default="", pattern=r"^[a-z0-9_ ]*$",
                                description="the device's kernel modules, for the kernel-log line of a degraded check")
    sdks: dict[str, SdkSpec] = Field(default_factory=dict)
    env: dict[EnvName, OneLine] = Field(default_factory=dict, description="image environment defaults of the variant")
    ship: list[ShipGlob] = Field(default_factory=list, description="toolchain-stage globs installed with the binaries")
    # Left out of a dump when off, so the plan.json of every image planned before the field stays byte for byte.
    rpc_rdma: bool = Field(False, exclude_if=lambda on: not on,
                           description="ggml-rpc carries RDMA (libibverbs built in and shipped)")


DebVersion = Annotated[str, Field(pattern=r"^[A-Za-z0-9.+~:-]+$")]


class LockedDeb(Strict):
    """One package of a bootstrapped base as resolved by `builder lock`: its exact version and .deb file."""

    name: PackageName
    version: DebVersion
    arch: str = Field(pattern=r"^[a-z0-9-]+$")
    suite: str = Field(pattern=r"^[a-z][a-z0-9/-]*$", description="the suite it came from, e.g. sid, experimental")
    filename: Annotated[str, Field(pattern=r"^pool/[A-Za-z0-9_.+~%/-]+\.deb$", description="its path below the mirror"),
                        AfterValidator(_relative_path)]
    sha256: Sha256
    size: int = Field(ge=0)
    priority: str = Field(pattern=r"^[a-z-]+$", description="the archive's priority (minbase takes all required)")


class LockedBase(Strict):
    """The full package set of one bootstrapped base, keyed in builder.lock by the base's inputs."""

    inputs: dict[str, JsonValue] = Field(description="the base as its recipe states it, without the mirror")
    resolved: list[LockedDeb] = Field(min_length=1, description="every package the base installs, sorted by name")
