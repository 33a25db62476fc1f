"""The netboot flavour of an image: vmlinuz, initrd.img, root.squashfs, SHA256SUMS and manifest.json.

The root is the image's own filesystem (exported from the engine) plus the node's scripts, busybox, the image's
environment, the accelerator's kernel modules and firmware, and systemd (the node's PID 1, its units from
builder/netboot/nodeunits.py), the ssh server and the metrics exporter of the root's Debian suite (pinned .debs,
builder/netboot/adminlayer.py). Artifacts are cached by everything that
goes into them, so a second `pxe build` of the same image is immediate.
"""

import fnmatch
import hashlib
import json
import os
import re
import shutil
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from builder.core.digests import sha256_file
from builder.core.errors import BuilderError, EngineError, RecipeError
from builder.core.locks import lock_file, locked
from builder.core.paths import cache_subdir
from builder.core.run import run, run_logged
from builder.engines import Engine, ImageInfo
from builder.engines.cleanup import temp_path
from builder.engines.host import find_driver
from builder.netboot import nodeunits
from builder.netboot.adminlayer import add_admin_layer, layers_key
from builder.netboot.initramfs import NODE_SCRIPTS, initramfs
from builder.netboot.kernels import (
    FIREWALL_MODULES,
    INITRD_FIRMWARE,
    NET_MODULES,
    RDMA_MODULES,
    ROOT_MODULES,
    KernelSpec,
    busybox,
    fetch_kernel_tree,
    firmware_dir,
    kernel_image,
    kernel_version,
    modules_dir,
    pinned_version,
    version_tuple,
)
from builder.netboot.modules import load_order, module_bytes, plain_name
from builder.netboot.nodeunits import install_node_units
from builder.plan.make import RDMA_LABEL
from builder.recipe.load import select
from builder.recipe.models import LockedBase

NETBOOT_VERSION = "5"  # bump when the artifacts' layout or node scripts' contract changes
FILES = ("vmlinuz", "initrd.img", "root.squashfs")
COMPRESSORS = ("zstd", "xz", "gzip", "lzo", "lz4")
# The levels mksquashfs takes for each algorithm (-Xcompression-level); xz and lz4 take none.
LEVELS = {"zstd": range(1, 23), "gzip": range(1, 10), "lzo": range(1, 10)}
# `pxe build`'s default: zstd at level 3, chosen by measurement (docs/benchmarks.md, "squashfs compression"):
# on a home cluster a roll spends far more time in mksquashfs at higher levels than it saves on the wire.
DEFAULT_COMPRESSION = "zstd:3"
# Target, variant, kernel version, suite: one plain path component (no "/", no leading dot), and a word
# that cannot break a boot script or a kernel command line.
_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+~-]{0,127}\Z")
_IMAGE = re.compile(r"^[\x21-\x7e]{1,512}\Z")
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
# images/netboot/'s files in the root's /usr/lib/builder, by the name there
ROOT_SCRIPTS = (("node.sh", "node"),  # what the node's units run (nodeunits.py)
                ("plan.sh", "plan.sh"),  # what they have in common, sourced by node
                ("sshd.sh", "sshd"), ("sshd_config", "sshd_config"),  # the ssh server of a plan's ssh line
                ("reboot.sh", "reboot"),  # what `builder cluster reboot` runs over ssh
                ("metrics.sh", "metrics"))  # the exporter of a plan's metrics line
VERITY_BLOCK = 4096  # dm-verity data and hash block size; mksquashfs pads its output to 4 KiB too
# What people look up about a llama.cpp set (builder/fetch/provenance.py): recorded by `pxe build`, shown by
# `pxe list`; null where the source records no commit. Not part of the set's key: the image fixes both.
LLAMA_FACTS = {"llama_cpp_commit": re.compile(r"^[0-9a-f]{7,40}\Z"),
               "ggml_rpc_protocol": re.compile(r"^[0-9]{1,4}\.[0-9]{1,4}\.[0-9]{1,4}\Z")}


def check_set_manifest(manifest: object, where: str, error: type[BuilderError] = RecipeError) -> dict[str, object]:
    """A netboot set's manifest.json, checked field by field before any value names a path or reaches a
    boot script: the set may come from a registry or a folder someone else filled."""
    if not isinstance(manifest, dict):
        raise error(f"{where}/manifest.json: expected a JSON object")
    for key in ("schema", "target", "variant", "image", "image_digest", "kernel_version", "files"):
        if key not in manifest:
            raise error(f"{where}/manifest.json: {key}: required key is missing")
    if manifest["schema"] != 1:
        raise error(f"{where}/manifest.json: schema: expected 1, got {str(manifest['schema'])[:40]!r}")
    for key in ("target", "variant", "kernel_version", "kernel_suite"):
        value = manifest.get(key, "x")
        if not isinstance(value, str) or not _WORD.match(value):
            raise error(f"{where}/manifest.json: {key}: {str(value)[:60]!r} is not a plain name",
                        "letters, digits and . _ + ~ -, not starting with a dot; no / or spaces")
    if not isinstance(manifest["image"], str) or not _IMAGE.match(manifest["image"]):
        raise error(f"{where}/manifest.json: image: expected an image reference without spaces or control characters")
    digest = manifest["image_digest"]
    if not isinstance(digest, str) or not re.match(r"^sha256:[0-9a-f]{64}$", digest):
        raise error(f"{where}/manifest.json: image_digest: expected sha256:<64 hex>")
    files = manifest["files"]
    if not isinstance(files, dict) or sorted(files) != sorted(FILES):
        raise error(f"{where}/manifest.json: files: expected exactly {', '.join(FILES)}",
                    f"got {', '.join(repr(str(k)[:40]) for k in files) if isinstance(files, dict) else 'no object'}")
    for name, entry in files.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or \
                not _SHA256.match(entry["sha256"]) or type(entry.get("size")) is not int or entry["size"] < 0:
            raise error(f"{where}/manifest.json: files.{name}: needs sha256 (64 hex) and size (bytes)")
    if "verity" in manifest:
        check_verity(manifest["verity"], f"{where}/manifest.json", error)
    for key, pattern in LLAMA_FACTS.items():
        value = manifest.get(key)
        if value is not None and not (isinstance(value, str) and pattern.match(value)):
            raise error(f"{where}/manifest.json: {key}: {str(value)[:60]!r} is not a "
                        f"{'commit (hex)' if key == 'llama_cpp_commit' else 'version (N.N.N)'}")
    return manifest


def record_llama_cpp(folder: Path, manifest: dict[str, object], commit: str | None,
                     protocol: str | None) -> dict[str, object]:
    """The set's manifest with its image's llama.cpp commit and ggml RPC protocol, written back when they were
    missing (a set made before builder recorded them) or differ. Both follow from the image, which the set's
    key names, so this changes no file a node boots."""
    facts: dict[str, object] = {"llama_cpp_commit": commit, "ggml_rpc_protocol": protocol}
    for key, value in facts.items():
        if value is not None and not LLAMA_FACTS[key].match(str(value)):
            facts[key] = None  # nothing unchecked reaches the manifest
    if all(key in manifest and manifest[key] == value for key, value in facts.items()):
        return manifest
    updated = {**manifest, **facts}
    staged = folder / f".manifest.json.{os.getpid()}.tmp"
    staged.write_text(json.dumps(updated, indent=2) + "\n")
    os.replace(staged, folder / "manifest.json")
    return updated


def check_verity(verity: object, where: str, error: type[BuilderError] = RecipeError) -> dict[str, object]:
    """The dm-verity fields a node's boot script carries: hex hashes and a block count, nothing else."""
    if not isinstance(verity, dict) or set(verity) != {"root_hash", "salt", "data_blocks", "algorithm"} \
            or not isinstance(verity["root_hash"], str) or not _SHA256.match(verity["root_hash"]) \
            or not isinstance(verity["salt"], str) or not _SHA256.match(verity["salt"]) \
            or type(verity["data_blocks"]) is not int or not 0 < verity["data_blocks"] < 2**40 \
            or verity["algorithm"] != "sha256":
        raise error(f"{where}: verity: expected root_hash and salt (64 hex each), data_blocks (a count) and "
                    "algorithm sha256")
    return verity


@dataclass(frozen=True)
class Squash:
    """mksquashfs compression: `zstd:3` (the default), `zstd:19`, `xz`, ...; an algorithm without a level gets
    mksquashfs's own default level for it (zstd: 15, gzip: 9)."""

    algorithm: str = "zstd"
    level: int | None = 3

    @classmethod
    def parse(cls, text: str) -> "Squash":
        algorithm, colon, level = text.partition(":")
        if algorithm not in COMPRESSORS:
            raise RecipeError(f"--compression {text[:40]!r}: unknown algorithm", f"one of {', '.join(COMPRESSORS)}")
        if not colon:
            return cls(algorithm, None)
        levels = LEVELS.get(algorithm)
        if levels is None:
            raise RecipeError(f"--compression {text[:40]!r}: {algorithm} takes no level",
                              f"give {algorithm} alone, or a level with zstd, gzip or lzo (e.g. zstd:3)")
        if not (level.isascii() and level.isdigit()) or int(level) not in levels:
            raise RecipeError(f"--compression {text[:40]!r}: the level of {algorithm} is a number from {levels.start} "
                              f"to {levels.stop - 1}", f"e.g. {algorithm}:{min(3, levels.stop - 1)}")
        return cls(algorithm, int(level))

    def flags(self) -> list[str]:
        flags = ["-comp", self.algorithm]
        if self.level is not None:
            flags += ["-Xcompression-level", str(self.level)]
        return flags

    def __str__(self) -> str:
        return self.algorithm if self.level is None else f"{self.algorithm}:{self.level}"


def _artifact_key(image_id: str, spec: KernelSpec, tree: Path, squash: Squash, ssh: dict[str, LockedBase]) -> str:
    scripts = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(NODE_SCRIPTS.iterdir())}
    inputs = {"v": NETBOOT_VERSION, "image": image_id, "kernel": spec.key(), "tree": tree.name, "squash": str(squash),
              "scripts": scripts, "initrd_modules": [*NET_MODULES, *ROOT_MODULES, *FIREWALL_MODULES],
              "initrd_firmware": list(INITRD_FIRMWARE),
              "ssh": layers_key(ssh), "units": hashlib.sha256(Path(nodeunits.__file__).read_bytes()).hexdigest()}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _extract(tarball: Path, dest: Path) -> None:
    # The engine's export is trusted (our own image), but keep entries inside dest all the same.
    with tarfile.open(tarball) as archive:
        archive.extractall(dest, filter="fully_trusted" if os.geteuid() == 0 else "tar")


def _add_node_files(root: Path, tree: Path, kver: str, spec: KernelSpec, env: tuple[str, ...],
                    rdma: bool = False, image_id: str = "") -> list[str]:
    """The scripts the node's units run, busybox, the image's environment and id, accelerator modules and firmware
    (and with `rdma`, the RDMA modules of the data NICs); returns missing modules."""
    lib = root / "usr/lib/builder"
    lib.mkdir(parents=True, exist_ok=True)
    for shipped, name in ROOT_SCRIPTS:
        shutil.copy2(NODE_SCRIPTS / shipped, lib / name)
    # the DHCP event script of builder-dhcp.service's udhcpc (lease renewals), run by the root's busybox
    script = (NODE_SCRIPTS / "udhcpc.sh").read_text().replace("#!/bin/busybox sh", "#!/usr/lib/builder/busybox sh", 1)
    (lib / "udhcpc.sh").write_text(script)
    (lib / "udhcpc.sh").chmod(0o755)
    shutil.copy2(busybox(tree), lib / "busybox")
    (lib / "image.env").write_text("".join(f"{_env_line(item)}\n" for item in env))
    if re.fullmatch(r"(sha256:)?[0-9a-f]{64}", image_id):  # the agent's `state` answer reports it
        (lib / "image.digest").write_text(f"sha256:{image_id.removeprefix('sha256:')}\n")
    moddir = modules_dir(tree, kver)
    order, missing = load_order(moddir, spec.accel_modules)
    if missing:
        raise EngineError(f"kernel {kver} ({spec.suite}) has no {', '.join(missing)} module, which the accelerator "
                          "of these nodes needs", "pin a kernel that builds it: builder lock --refresh-netboot")
    if rdma:  # an image built with rpc_rdma: its RDMA drivers, those the kernel has (the others are reported)
        extra, missing = load_order(moddir, RDMA_MODULES)
        order += [path for path in extra if path not in order]
    target_modules = root / "lib/modules"
    target_modules.mkdir(parents=True, exist_ok=True)
    names = [plain_name(path) for path in order]
    for path, name in zip(order, names, strict=True):
        (target_modules / name).write_bytes(module_bytes(moddir / path))
    (lib / "modules.load").write_text("".join(f"{n}\n" for n in names))
    source = firmware_dir(tree)
    if spec.firmware_globs and source.is_dir():
        for blob in sorted(source.rglob("*")):
            rel = blob.relative_to(source).as_posix()
            if blob.is_file() and any(fnmatch.fnmatch(rel, g) for g in spec.firmware_globs):
                dest = root / "lib/firmware" / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(blob, dest)
    for folder in ("dev", "proc", "sys", "run", "tmp"):
        (root / folder).mkdir(exist_ok=True)
    return missing


def require_driver(root: Path, target: str, variant: str) -> None:
    """A netbooted node runs the image's own root: no host is there to lend the device's user-space driver
    (the way `builder run` mounts it), so the root must carry it, or the node could only fall back to the CPU."""
    driver = select(target, variant)[1].host.driver
    if driver is None:
        return
    absent = [name for name, lib in find_driver(driver, root).items() if lib is None]
    if absent:
        raise RecipeError(
            f"{target}/{variant}: the image carries no {driver.name} ({', '.join(absent)}), and a netbooted node "
            "has no host to take it from",
            "netboot an image whose runtime stage installs the driver (a recipe variant with an `image` runtime "
            "base and the vendor's .debs under `debs:`, pinned by sha256), or run these nodes from a disk install "
            "with the driver and `builder run`")


def _env_line(item: str) -> str:
    key, _, value = item.partition("=")
    return f"{key}='" + value.replace("'", "'\\''") + "'"


def build_artifacts(engine: Engine, image: str, target: str, variant: str, spec: KernelSpec, kernel: LockedBase,
                    squash: Squash, out: Path | None = None, where: str = "builder.lock", *,
                    ssh: dict[str, LockedBase]) -> tuple[Path, dict[str, object]]:
    """Make (or reuse) the netboot artifacts of `image` with the pinned `kernel` (checked by
    kernels.pinned_kernel) and the pinned ssh servers by suite (`ssh`: the root's own is unpacked into it);
    returns their folder and manifest."""
    info = engine.inspect(image)
    if info is None:
        raise RecipeError(f"no image {image} in {engine.name}", f"build it first: builder build --target {target}")
    if not shutil.which("mksquashfs"):
        raise EngineError("mksquashfs is not installed", "apt-get install squashfs-tools")
    if not shutil.which("veritysetup"):
        raise EngineError("veritysetup is not installed (it makes the root's dm-verity hash tree)",
                          "apt-get install cryptsetup-bin")
    tree = fetch_kernel_tree(spec, kernel, where)
    kver = kernel_version(tree)
    if version_tuple(kver) < spec.min_version:
        raise EngineError(f"kernel {kver} from {spec.suite} is older than {target} needs "
                          f"({'.'.join(map(str, spec.min_version))})", spec.why)
    key = _artifact_key(info.id, spec, tree, squash, ssh)
    folder = out or cache_subdir("netboot") / "artifacts" / f"{target}-{variant}-{key[:16]}"
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        manifest: dict[str, object] = json.loads(manifest_path.read_text())
        if manifest.get("key") == key:
            return folder, manifest
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder_id = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    with locked(lock_file(f"netboot-{folder_id}"), f"making the netboot set {folder}"):
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("key") == key:
                return folder, manifest  # the run we waited for made it
        packages = {name: pinned_version(kernel, name) or "" for name in ("linux-image-amd64", *spec.firmware_packages)}
        return _make(engine, image, info, target, variant, spec, tree, kver, squash, key, folder, packages,
                     lambda root: add_admin_layer(root, ssh, where))


def _make(engine: Engine, image: str, info: ImageInfo, target: str, variant: str, spec: KernelSpec, tree: Path,
          kver: str, squash: Squash, key: str, folder: Path, packages: dict[str, str],
          add_ssh: Callable[[Path], dict[str, object]]) -> tuple[Path, dict[str, object]]:
    work = temp_path(folder.parent)
    work.mkdir()
    try:
        started = time.monotonic()
        staged = work / "out"
        staged.mkdir()
        engine.export_rootfs(image, work / "rootfs.tar")
        root = work / "root"
        root.mkdir()
        _extract(work / "rootfs.tar", root)
        (work / "rootfs.tar").unlink()
        require_driver(root, target, variant)
        missing = _add_node_files(root, tree, kver, spec, info.env, rdma=info.labels.get(RDMA_LABEL) == "true",
                                  image_id=info.id)
        ssh = add_ssh(root)
        if not (root / "lib/systemd/systemd").is_file():
            if ssh.get("missing"):  # a root of another distribution, or of a suite builder pins no layer for
                raise EngineError(f"the root of {image} cannot netboot: {ssh['missing']}, and its nodes run under "
                                  "the systemd of that layer", "netboot an image built on Debian bookworm, trixie "
                                  "or forky (sid)")
            raise EngineError(f"the root of {image} has no /lib/systemd/systemd after the pinned layer",
                              "pin the layer again: builder lock --refresh-netboot")
        ssh["systemd"] = install_node_units(root)
        squash_started = time.monotonic()
        run_logged(["mksquashfs", str(root), str(staged / "root.squashfs"), "-noappend", "-no-xattrs",
                    "-mkfs-time", "0", "-all-time", "0", "-no-progress", *squash.flags()],
                   work / "mksquashfs.log", title=f"squashfs ({squash}) of {image}")
        squash_seconds = time.monotonic() - squash_started
        verity = _add_verity(staged / "root.squashfs", work / "veritysetup.log")
        initrd, initrd_missing = initramfs(tree, modules_dir(tree, kver))
        (staged / "initrd.img").write_bytes(initrd)
        shutil.copyfile(kernel_image(tree, kver), staged / "vmlinuz")
        files = {name: {"sha256": sha256_file(staged / name), "size": (staged / name).stat().st_size}
                 for name in FILES}
        manifest = {
            "schema": 1, "key": key, "target": target, "variant": variant, "image": image,
            "image_digest": info.id, "kernel_version": kver, "kernel_suite": spec.suite, "kernel_packages": packages,
            "compression": str(squash), "files": files, "verity": verity, "ssh": ssh,
            "rootfs_bytes": sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink()),
            "missing_modules": sorted(set(missing + initrd_missing)),
            "seconds": {"total": round(time.monotonic() - started, 1), "squashfs": round(squash_seconds, 1)},
        }
        (staged / "SHA256SUMS").write_text("".join(f"{f['sha256']}  {n}\n" for n, f in files.items()))
        (staged / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staged, folder)
    finally:
        run(["rm", "-rf", "--", str(work)], check=False)
    return folder, manifest


def _add_verity(squashfs: Path, log: Path) -> dict[str, object]:
    """Append the dm-verity hash tree (with its superblock) to the squashfs, after its last 4 KiB block:
    one file still holds the root, and a node opens it through dm-verity with the root hash from its boot
    script. The salt and UUID come from the squashfs's own hash, so the same image gives the same bytes."""
    size = squashfs.stat().st_size
    if size % VERITY_BLOCK:
        with squashfs.open("ab") as f:
            f.write(b"\0" * (VERITY_BLOCK - size % VERITY_BLOCK))
        size = squashfs.stat().st_size
    salt = sha256_file(squashfs)
    uuid = f"{salt[:8]}-{salt[8:12]}-4{salt[13:16]}-8{salt[17:20]}-{salt[20:32]}"
    blocks = size // VERITY_BLOCK
    run_logged(["veritysetup", "format", f"--data-blocks={blocks}", f"--hash-offset={size}", "--hash=sha256",
                f"--data-block-size={VERITY_BLOCK}", f"--hash-block-size={VERITY_BLOCK}", f"--salt={salt}",
                f"--uuid={uuid}", f"--root-hash-file={log.with_suffix('.hash')}", "--", str(squashfs),
                str(squashfs)], log, title="dm-verity hash tree of the root")
    root_hash = log.with_suffix(".hash").read_text().strip()
    return check_verity({"root_hash": root_hash, "salt": salt, "data_blocks": blocks, "algorithm": "sha256"},
                        str(squashfs), EngineError)


def read_artifacts(folder: Path) -> tuple[Path, dict[str, object]]:
    """A netboot set made elsewhere (pulled from a registry): its folder and manifest."""
    try:
        manifest = check_set_manifest(json.loads((folder / "manifest.json").read_text()), str(folder))
    except (OSError, ValueError) as exc:
        raise RecipeError(f"{folder}: no readable manifest.json ({exc})",
                          "pull the set first: builder pxe pull HOST/REPO:netboot-TARGET-VARIANT --dest DIR") from None
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise RecipeError(f"{folder}: incomplete netboot set (missing {', '.join(missing)})")
    # what publish puts into paths, URLs and iPXE lines, stricter than check_set_manifest
    for field, pattern in (("target", r"[a-z0-9][a-z0-9-]*"), ("variant", r"[a-z0-9][a-z0-9-]*"),
                           ("image_digest", r"(sha256:)?[0-9a-f]{64}")):
        if not re.fullmatch(pattern, str(manifest[field])):
            raise RecipeError(f"{folder}/manifest.json: {field}: not a plain {field.replace('_', ' ')}")
    return folder.resolve(), manifest
