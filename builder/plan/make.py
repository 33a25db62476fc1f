"""recipe + resolved source -> BuildPlan. Pure: no I/O, same inputs give the same plan."""

from datetime import UTC, datetime

from builder.plan.bases import LockedBases, base_ref
from builder.recipe.load import choose_variant
from builder.recipe.models import BootstrapBase, BuildPlan, ImageBase, Recipe, SourceInfo, VariantRecipe
from builder.recipe.targets import COMMON_CMAKE, TOOLBOX_PACKAGES

LABEL_PREFIX = "dev.builder"
PROVENANCE_LABELS = {"commit": "llama-cpp.commit", "rpc_protocol": "ggml-rpc.protocol"}


def image_labels(title: str, description: str, source: str, revision: str, version: str, epoch: int,
                 target: str, variant: str, own: dict[str, str], recipe: dict[str, str]) -> dict[str, str]:
    """The labels every image carries (OCI, builder's, Toolbx's), the flavour's own, then the recipe's."""
    created = datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "org.opencontainers.image.title": title, "org.opencontainers.image.description": description,
        "org.opencontainers.image.source": source, "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.version": version, "org.opencontainers.image.created": created,
        f"{LABEL_PREFIX}.target": target, f"{LABEL_PREFIX}.variant": variant, **own,
        "com.github.containers.toolbox": "true", **recipe,
    }


def runtime_base(spec: ImageBase | BootstrapBase) -> ImageBase | BootstrapBase:
    """A bootstrapped runtime base with the packages Toolbx needs; a registry base is taken as it is."""
    return spec if isinstance(spec, ImageBase) else _with_packages(spec, TOOLBOX_PACKAGES)


# RPC over RDMA (a variant's `rpc_rdma: true`): ggml-rpc compiles its RDMA transport when CMake finds libibverbs,
# and the image then needs the library and the user-space drivers of the NICs (mlx5, irdma, bnxt_re, rxe …).
RDMA_BUILD_PACKAGES: tuple[str, ...] = ("libibverbs-dev",)
RDMA_RUN_PACKAGES: tuple[str, ...] = ("libibverbs1", "ibverbs-providers")
RDMA_LABEL = f"{LABEL_PREFIX}.rpc.rdma"


def _with_packages(spec: ImageBase | BootstrapBase, extra: tuple[str, ...]) -> ImageBase | BootstrapBase:
    return spec.model_copy(update={"packages": spec.packages + [p for p in extra if p not in spec.packages]})


def variant_bases(section: VariantRecipe) -> tuple[ImageBase | BootstrapBase, ImageBase | BootstrapBase]:
    """(toolchain, runtime) as the variant is built: Toolbx's packages in a bootstrapped runtime, and with
    `rpc_rdma` libibverbs in both (its headers in the toolchain, the library and NIC providers at run time)."""
    toolchain, runtime = section.base.toolchain, runtime_base(section.base.runtime)
    if section.rpc_rdma:
        toolchain = _with_packages(toolchain, RDMA_BUILD_PACKAGES)
        runtime = _with_packages(runtime, RDMA_RUN_PACKAGES)
    return toolchain, runtime


def make_plan(
    recipe: Recipe,
    recipe_path: str,
    source: SourceInfo,
    *,
    variant: str | None = None,
    source_date_epoch: int | None = None,
    locked: LockedBases | None = None,
    provenance: dict[str, str | None] | None = None,
) -> BuildPlan:
    """`locked`: builder.lock's package sets of bootstrapped bases; a locked base is named by its packages.
    `provenance`: what the source tree records of itself (`commit`, `rpc_protocol`), each a label where known."""
    target, chosen, section = choose_variant(recipe.target, recipe.variants, variant, recipe_path)
    assert recipe.llama_cpp is not None, "load_recipe fills in the shared pin"
    toolchain, runtime = variant_bases(section)
    cmake = {**COMMON_CMAKE, **chosen.cmake, **recipe.llama_cpp.cmake, **section.cmake}
    if section.rpc_rdma:  # stated, so a toolchain without libibverbs fails the build instead of dropping RDMA
        cmake["GGML_RPC_RDMA"] = "ON"
    # Shown by `--version` of every binary, so a node tells which source it runs.
    cmake["LLAMA_BUILD_COMMIT"] = source.identity.split(":")[-1][:12]
    labels = image_labels(
        f"builder {target.name}/{chosen.name}", recipe.description or target.description, source.locator,
        source.identity, source.version, source.epoch if source_date_epoch is None else source_date_epoch,
        target.name, chosen.name,
        {f"{LABEL_PREFIX}.llama-cpp.ref": source.locator,
         # what people look a build up by; absent, never made up, when the pin does not record it
         **{f"{LABEL_PREFIX}.{label}": value for key, label in PROVENANCE_LABELS.items()
            if (value := (provenance or {}).get(key))},
         **{f"{LABEL_PREFIX}.sdk.{name}": f"{sdk.file} sha256:{sdk.sha256}" for name, sdk in section.sdks.items()},
         **({RDMA_LABEL: "true"} if section.rpc_rdma else {})},
        recipe.labels)
    return BuildPlan(
        recipe=recipe_path,
        target=target.name,
        variant=chosen.name,
        description=recipe.description or target.description,
        toolchain_ref=base_ref(toolchain, locked),
        runtime_ref=base_ref(runtime, locked),
        toolchain=toolchain,
        runtime=runtime,
        source=source,
        cmake=cmake,
        binaries=list(recipe.llama_cpp.binaries),
        labels=labels,
        smoke_device=chosen.smoke_device,
        repository=f"localhost/builder/{target.name}",
        driver_modules=" ".join(m for choice in chosen.host.modules for m in choice),
        sdks=dict(section.sdks),
        # The smoke role lets exactly these stay unresolved on a machine without the device.
        env={**({"LLAMA_DRIVER_LIBS": " ".join(chosen.driver_libs)} if chosen.driver_libs else {}),
             **chosen.host.env, **section.env},
        ship=[f"/opt/sdk/{name}/{pattern}" for name, sdk in section.sdks.items() for pattern in sdk.ship]
        + list(section.ship),
        rpc_rdma=section.rpc_rdma,
    )
