"""builder.lock: every pinned input of every image the recipes build, so CI and users build the same thing.

The recipes say what to build; the lock records what was reviewed and published. `builder build` and
`builder publish` refuse to go on when the two disagree for the image they make (publish also when the
image has no lock entry), and `builder lock --check` lists every disagreement. `builder lock` rewrites the
file from the recipes. Entries hold whole variant sections, so a pin added to recipes later (a ROCm or
vLLM version) is locked without changing this module.

`bases` holds the full package set of every bootstrapped base the recipes use (llama.cpp and vLLM
images), resolved against the archive by `builder lock` (builder/fetch/debian.py) and kept until the base's
inputs change or `builder lock --refresh` moves them all to the archive's current versions. Builds
install exactly these versions (builder/fetch/bootstrap.py).

`netboot` holds, per netboot target, the Debian kernel and firmware packages its nodes boot (every .deb with
its version, suite and sha256, in the same shape as a base), resolved by `builder lock` when the target's
packages change and moved to the archive's current versions by `builder lock --refresh-netboot` (or
`--refresh`). `builder pxe build` unpacks exactly these (builder/netboot/kernels.py). They are no input of any
container image: changing them changes no image's fingerprint.

`netboot_admin` holds, per Debian suite of the netbooted roots, openssh-server and prometheus-node-exporter
with what they depend on, in the same shape; `builder pxe build` unpacks what a root of that suite lacks
(builder/netboot/adminlayer.py).
"""

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from builder import PROJECT_ROOT
from builder.core.errors import LockError, RecipeError
from builder.core.files import write_atomically
from builder.fetch.bootstrap import apt_preferences
from builder.fetch.debian import resolve
from builder.flavours.vllm import load_vllm_recipe, locked_sections, read_lock
from builder.netboot.adminlayer import SPECS, AdminSpec, resolve_admin
from builder.netboot.kernels import KERNELS, KernelSpec, resolve_kernel
from builder.plan.bases import base_inputs, host_arch, lock_name
from builder.plan.make import variant_bases
from builder.recipe.load import RECIPES_DIR, SHARED_PIN, display_path, load_recipe
from builder.recipe.models import BootstrapBase, ImageBase, LockedBase, Recipe

LOCK_FILE = PROJECT_ROOT / "builder.lock"
LOCK_VERSION = 1
HINT = "run `builder lock` to record the recipes' pins, review the diff and commit builder.lock"


def entry(recipe: Recipe, variant: str) -> dict[str, Any]:
    """The pinned inputs of one image: the variant section (bases, flags, vendor pins) and llama.cpp."""
    assert recipe.llama_cpp is not None, "load_recipe fills in the shared pin"
    # A field at its default is left out (`rpc_rdma: false`), so entries locked before it stay as they are.
    section = recipe.variants[variant].model_dump(mode="json")
    if not section["rpc_rdma"]:
        del section["rpc_rdma"]
    for base in section["base"].values():
        if base.get("kind") == "bootstrap":
            base["packages"] = sorted(set(base["packages"]))
    return {**section, "llama_cpp": recipe.llama_cpp.model_dump(mode="json")}


def built_images(recipes_dir: Path = RECIPES_DIR) -> list[tuple[Path, Recipe, str]]:
    """(recipe file, recipe, variant) for every image the recipes build."""
    out = []
    for path in sorted(p for p in recipes_dir.resolve().glob("*.yaml") if p.name != SHARED_PIN.name):
        own = recipes_dir / SHARED_PIN.name
        recipe = load_recipe(path, own if own.is_file() else SHARED_PIN)
        out += [(path, recipe, variant) for variant in recipe.variants]
    return out


def compute(recipes_dir: Path = RECIPES_DIR) -> dict[str, Any]:
    images = {f"{recipe.target}/{variant}": {"recipe": str(path.relative_to(recipes_dir.resolve().parent)),
                                            **entry(recipe, variant)}
              for path, recipe, variant in built_images(recipes_dir)}
    return {"version": LOCK_VERSION, "images": images}


def image_bases(recipe: Recipe, variant: str) -> list[tuple[str, ImageBase | BootstrapBase]]:
    """(stage, base) as the image is built: a bootstrapped runtime base carries Toolbx's packages too."""
    toolchain, runtime = variant_bases(recipe.variants[variant])
    return [("toolchain", toolchain), ("runtime", runtime)]


def used_bases(recipes_dir: Path = RECIPES_DIR) -> dict[str, tuple[BootstrapBase, str]]:
    """lock name -> (base, the first image that uses it) for every bootstrapped base an image is built on.

    vLLM variants count when they have their wheel lock: the others are render-only and never bootstrap."""
    found: dict[str, tuple[BootstrapBase, str]] = {}
    for _, recipe, variant in built_images(recipes_dir):
        for stage, base in image_bases(recipe, variant):
            if isinstance(base, BootstrapBase):
                found.setdefault(lock_name(base), (base, f"{recipe.target}/{variant} {stage}"))
    for vrecipe, name, section in locked_sections(recipes_dir):
        for stage, vbase in (("base", section.base), ("toolchain", section.toolchain)):
            if isinstance(vbase, BootstrapBase):
                found.setdefault(lock_name(vbase), (vbase, f"vllm {vrecipe.target}/{name} {stage}"))
    return dict(sorted(found.items()))


def compute_bases(recipes_dir: Path, previous: dict[str, Any], *, refresh: bool) -> dict[str, Any]:
    """The `bases` section: entries of unchanged bases kept (unless `refresh`), the others resolved now."""
    out: dict[str, Any] = {}
    for name, (base, user) in used_bases(recipes_dir).items():
        if name in previous and not refresh:
            out[name] = previous[name]
            continue
        logging.getLogger("builder.progress").info("resolving the %s base of %s (%s) …", base.suite, user, name)
        resolved = resolve(base, host_arch(), apt_preferences(base))
        out[name] = LockedBase(inputs=base_inputs(base), resolved=resolved).model_dump(mode="json")
    return out


def _kept_or_resolved(previous: dict[str, Any], specs: dict[str, Any], refresh: bool, what: str,
                      resolve_one: Callable[[Any], LockedBase]) -> dict[str, Any]:
    """Each spec's old entry while it still has the same inputs (unless `refresh`), else resolved now."""
    out: dict[str, Any] = {}
    for name, spec in specs.items():
        old = previous.get(name)
        if isinstance(old, dict) and old.get("inputs") == spec.lock_inputs() and not refresh:
            out[name] = old
            continue
        logging.getLogger("builder.progress").info(what.format(suite=spec.suite, name=name))
        out[name] = resolve_one(spec).model_dump(mode="json")
    return out


def compute_netboot(previous: dict[str, Any], *, refresh: bool,
                    kernels: dict[str, KernelSpec] = KERNELS) -> dict[str, Any]:
    """The `netboot` section: entries whose target still asks for the same packages kept (unless `refresh`)."""
    return _kept_or_resolved(previous, kernels, refresh, "resolving the {suite} netboot kernel of {name} …",
                             resolve_kernel)


def compute_netboot_admin(previous: dict[str, Any], *, refresh: bool,
                          specs: dict[str, AdminSpec] = SPECS) -> dict[str, Any]:
    """The `netboot_admin` section: each suite's ssh server and exporter, kept while its inputs stay the same
    (unless `refresh`)."""
    return _kept_or_resolved(previous, specs, refresh,
                             "resolving the {name} ssh server and exporter of netbooted nodes …", resolve_admin)


def _plain(value: Any, where: str, field: str, depth: int = 0) -> None:
    """Every key and string of a lock entry is one plain line (they are printed in messages)."""
    if depth > 16:
        raise LockError(f"{where}: {field}: nested too deeply for a lock entry", HINT)
    if isinstance(value, str) and re.search(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", value):
        raise LockError(f"{where}: {field}: control characters in a value", HINT)
    if isinstance(value, dict):
        for key, item in value.items():
            if not re.fullmatch(r"[A-Za-z0-9_.:/@+-]{1,128}", key):
                raise LockError(f"{where}: {field}: key {key[:40]!r} is not a plain name", HINT)
            _plain(item, where, f"{field}.{key}", depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _plain(item, where, f"{field}[{i}]", depth + 1)


def read(path: Path = LOCK_FILE) -> dict[str, Any] | None:
    """The lock file's content, None when there is none; LockError when it is unreadable or malformed."""
    where = display_path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise LockError(f"{where}: not a text file (invalid UTF-8)", HINT) from None
    except OSError as exc:
        raise LockError(f"{where}: cannot read the lock file: {exc.strerror}", HINT) from None
    except ValueError as exc:
        raise LockError(f"{where}: not JSON: {str(exc).splitlines()[0][:120]}", HINT) from None
    except RecursionError:
        raise LockError(f"{where}: nested too deeply to be a lock file", HINT) from None
    if not isinstance(data, dict) or data.get("version") != LOCK_VERSION or not isinstance(data.get("images"), dict):
        raise LockError(f"{where}: version: expected a lock file of version {LOCK_VERSION}", HINT)
    for image, item in data["images"].items():
        if not isinstance(item, dict):
            raise LockError(f"{where}: images.{image[:40]!r}: expected a mapping of pinned inputs", HINT)
    _plain(data["images"], where, "images")
    for section, what in (("bases", "locked bases"), ("netboot", "pinned netboot kernels"),
                          ("netboot_admin", "pinned ssh servers and exporters")):
        if not isinstance(data.get(section, {}), dict):
            raise LockError(f"{where}: {section}: expected an object of {what}", HINT)
        if section != "bases":
            _plain(data.get(section, {}), where, section)
    return data


def _entry(value: Any, path: Path, field: str) -> LockedBase:
    """One locked package set of the lock file; LockError naming its field when it is malformed."""
    try:
        return LockedBase.model_validate(value)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = ".".join(str(part) for part in error["loc"])
        raise LockError(f"{display_path(path)}: {field}.{loc}: {error['msg']}", HINT) from None


def locked_bases(path: Path = LOCK_FILE) -> dict[str, LockedBase]:
    """The lock's package sets of bootstrapped bases, by lock name; empty when there is no lock file."""
    return {name: _entry(value, path, f"bases.{name}")
            for name, value in ((read(path) or {}).get("bases") or {}).items()}


def netboot_entry(target: str, path: Path = LOCK_FILE) -> LockedBase | None:
    """The lock's pinned netboot kernel and firmware of `target`; None when the lock has none."""
    value = ((read(path) or {}).get("netboot") or {}).get(target)
    return None if value is None else _entry(value, path, f"netboot.{target}")


def netboot_admin_entries(path: Path = LOCK_FILE) -> dict[str, LockedBase]:
    """The lock's pinned ssh servers and exporters of netbooted roots, by Debian suite (those builder asks for)."""
    out = {}
    for suite, value in ((read(path) or {}).get("netboot_admin") or {}).items():
        if suite not in SPECS:
            continue
        entry = _entry(value, path, f"netboot_admin.{suite}")
        if entry.inputs == SPECS[suite].lock_inputs():
            out[suite] = entry
    return out


def write(path: Path = LOCK_FILE, recipes_dir: Path = RECIPES_DIR, *, refresh: bool = False,
          refresh_netboot: bool = False) -> dict[str, Any]:
    """Rewrite the lock from the recipes; bases and netboot kernels are resolved against the archive where
    needed (`refresh`: all of them again; `refresh_netboot`: the netboot kernels only)."""
    old = read(path) or {}
    previous = old.get("bases") or {}
    lock = compute(recipes_dir)
    lock["bases"] = compute_bases(recipes_dir, previous, refresh=refresh)
    lock["netboot"] = compute_netboot(old.get("netboot") or {}, refresh=refresh or refresh_netboot)
    lock["netboot_admin"] = compute_netboot_admin(old.get("netboot_admin") or {}, refresh=refresh or refresh_netboot)
    write_atomically(path, json.dumps(lock, indent=2, sort_keys=True) + "\n")
    return lock


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def differences(locked: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """`path: lock has X, recipes have Y` for every pinned value that differs."""
    old, new = _flatten(locked), _flatten(wanted)
    lines = []
    for key in sorted(set(old) | set(new)):
        if key == "recipe":
            continue
        if key not in old:
            lines.append(f"{key}: not in the lock, recipes have {json.dumps(new[key])}")
        elif key not in new:
            lines.append(f"{key}: lock has {json.dumps(old[key])}, recipes have none")
        elif old[key] != new[key]:
            lines.append(f"{key}: lock has {json.dumps(old[key])}, recipes have {json.dumps(new[key])}")
    return lines


def check(path: Path = LOCK_FILE, recipes_dir: Path = RECIPES_DIR) -> list[str]:
    """One line per disagreement between the lock file and the recipes; empty when they agree."""
    where = display_path(path)
    lock = read(path)
    if lock is None:
        return [f"{where}: no lock file"]
    wanted = compute(recipes_dir)["images"]
    locked = lock["images"]
    lines = []
    for image in sorted(set(locked) | set(wanted)):
        if image not in locked:
            lines.append(f"{where}: {image}: not in the lock (built by {wanted[image]['recipe']})")
        elif image not in wanted:
            lines.append(f"{where}: {image}: in the lock, but no recipe builds it")
        else:
            lines += [f"{where}: {image}: {line}" for line in differences(locked[image], wanted[image])]
    have = lock.get("bases") or {}
    used = used_bases(recipes_dir)
    for name in sorted(set(used) - set(have)):
        base, user = used[name]
        lines.append(f"{where}: bases.{name}: not in the lock (the {base.suite} base of {user})")
    lines += [f"{where}: bases.{name}: in the lock, but no recipe uses it" for name in sorted(set(have) - set(used))]
    pinned = lock.get("netboot") or {}
    for target, spec in KERNELS.items():
        if target not in pinned:
            lines.append(f"{where}: netboot.{target}: not in the lock (the {spec.suite} kernel of {target} nodes)")
        elif not isinstance(pinned[target], dict) or pinned[target].get("inputs") != spec.lock_inputs():
            lines.append(f"{where}: netboot.{target}: pinned for other packages than builder asks for")
    lines += [f"{where}: netboot.{name}: in the lock, but builder netboots no such target"
              for name in sorted(set(pinned) - set(KERNELS))]
    ssh = lock.get("netboot_admin") or {}
    for suite, ssh_spec in SPECS.items():
        if not isinstance(ssh.get(suite), dict) or ssh[suite].get("inputs") != ssh_spec.lock_inputs():
            lines.append(f"{where}: netboot_admin.{suite}: not pinned for the ssh server and exporter of {suite}")
    lines += [f"{where}: netboot_admin.{name}: in the lock, but builder netboots no {name} root"
              for name in sorted(set(ssh) - set(SPECS))]
    for path in sorted((recipes_dir / "vllm").glob("*.yaml")):  # vLLM wheel locks made from other inputs
        for name, section in load_vllm_recipe(path).variants.items():
            try:
                read_lock(path, name, section)
            except RecipeError as exc:
                lines.append(exc.message)
    return lines


def require(recipe: Recipe, variant: str, *, strict: bool, path: Path = LOCK_FILE) -> None:
    """Fail when the lock disagrees with this image's recipe; with `strict`, also when it has no entry."""
    where = display_path(path)
    image = f"{recipe.target}/{variant}"
    lock = read(path)
    locked = (lock or {}).get("images", {}).get(image)
    if locked is None:
        if strict:
            raise LockError(f"{where}: {image}: not in the lock; publishing needs locked inputs", HINT)
        return
    lines = differences(locked, entry(recipe, variant))
    have = (lock or {}).get("bases") or {}
    lines += [f"bases.{lock_name(base)}: the {base.suite} base of the {stage} stage has no locked package set"
              for stage, base in image_bases(recipe, variant)
              if isinstance(base, BootstrapBase) and lock_name(base) not in have]
    if lines:
        more = f" (and {len(lines) - 1} more; see `builder lock --check`)" if len(lines) > 1 else ""
        raise LockError(f"{where}: {image}: {lines[0]}{more}", HINT)
