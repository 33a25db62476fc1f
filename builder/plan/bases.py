"""Naming a base image: its inputs, its entry in builder.lock and the tag a Containerfile's FROM uses.

No I/O: only the host's architecture is read (from the kernel)."""

import os
from collections.abc import Mapping
from typing import Any

from builder.core.digests import json_hash
from builder.recipe.models import BootstrapBase, ImageBase, LockedBase

# Bump when the way a base is made changes, so old cached bases are not reused.
BOOTSTRAP_VERSION = "2"
# The same for bases bootstrapped from their locked package set.
LOCKED_BOOTSTRAP_VERSION = "1"
BASE_REPOSITORY = "localhost/builder-base"


def host_arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def base_inputs(spec: BootstrapBase) -> dict[str, Any]:
    """What the recipe asks of a base, mirror left out: a mirror (a snapshot of the archive) may change
    where locked files come from, never which files they are."""
    # Fields at their defaults are left out, so a field added later (with a default) renames no base.
    inputs = spec.model_dump(mode="json", exclude={"mirror"}, exclude_defaults=True)
    inputs.update(kind=spec.kind, suite=spec.suite, packages=sorted(set(spec.packages)))
    return inputs


def lock_name(spec: BootstrapBase) -> str:
    """The base's entry in builder.lock's `bases`: its suite and a hash of its inputs and architecture."""
    return f"{spec.suite}-{json_hash({'arch': host_arch(), **base_inputs(spec)})[:16]}"


def bootstrap_key(spec: BootstrapBase, locked: LockedBase | None = None) -> str:
    """Names the base: its inputs, and with a lock the exact .debs (so a moved lock makes a new base)."""
    if locked is not None:
        inputs: dict[str, Any] = {"v": LOCKED_BOOTSTRAP_VERSION, "arch": host_arch(), **base_inputs(spec),
                                  "debs": sorted(deb.sha256 for deb in locked.resolved)}
        return json_hash(inputs)
    later_fields = {"components", "extra_suites", "prune"}
    inputs = {"v": BOOTSTRAP_VERSION, "arch": host_arch(), **spec.model_dump(exclude=later_fields)}
    inputs["packages"] = sorted(set(spec.packages))
    # Only non-default values of fields added later enter the key, so bases made before keep their names.
    if spec.components != ["main"]:
        inputs["components"] = sorted(set(spec.components))
    if spec.extra_suites:
        inputs["extra_suites"] = [{"suite": e.suite, "packages": sorted(set(e.packages))} for e in spec.extra_suites]
    if spec.prune:
        inputs["prune"] = [p.model_dump() for p in spec.prune]
    return json_hash(inputs)


LockedBases = Mapping[str, LockedBase]


def locked_for(spec: BootstrapBase, locked: LockedBases) -> LockedBase | None:
    return locked.get(lock_name(spec))


def base_ref(spec: ImageBase | BootstrapBase, locked: LockedBases | None = None) -> str:
    """The reference a Containerfile's FROM uses for this base."""
    if isinstance(spec, ImageBase):
        return spec.ref
    return f"{BASE_REPOSITORY}:{spec.suite}-{bootstrap_key(spec, locked_for(spec, locked or {}))[:16]}"
