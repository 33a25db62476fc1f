"""`builder doctor`: is this host ready to run a target's image? One pass/fail line per check, with the fix.
It also names the kernel and firmware builder.lock pins for the target's netbooted nodes.

Everything is read through a root folder (default /), so tests point it at fixture trees of each kind of node.
"""

import grp
import os
import re
from dataclasses import dataclass
from pathlib import Path

from builder.core.errors import BuilderError
from builder.engines.host import find_driver, firmware_files
from builder.flavours import lock as lockfile
from builder.netboot.kernels import KERNELS, pinned_kernel
from builder.netboot.known_bad import KERNEL_PACKAGE, KNOWN_BAD, refusals
from builder.recipe.load import display_path
from builder.recipe.targets import Host, HostDriver, Target, Variant

# Strix Halo unified memory: GTT of ~124 GiB (in MiB) and the matching TTM page limit (4 KiB pages).
STRIX_HALO_PARAMS = "amdgpu.gttsize=126976 ttm.pages_limit=32505856"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True

    def line(self) -> str:
        state = "PASS" if self.ok else ("FAIL" if self.required else "WARN")
        fix = f" -> fix: {self.fix}" if not self.ok and self.fix else ""
        return f"{state}  {self.name}: {self.detail}{fix}"


def _read(root: Path, path: str) -> str:
    try:
        return (root / path.lstrip("/")).read_text()
    except OSError:
        return ""


def _major_minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _kernel(root: Path, need: tuple[int, int]) -> Check:
    release = _read(root, "/proc/sys/kernel/osrelease").strip()
    have = _major_minor(release)
    if have is None:
        return Check("kernel", False, "cannot read /proc/sys/kernel/osrelease")
    want = f"{need[0]}.{need[1]}"
    return Check("kernel", have >= need, f"{release} (need >= {want})",
                 f"install a kernel >= {want} (Debian: linux-image-amd64 from backports) and reboot")


def _known_bad_kernel(root: Path, target: str) -> list[Check]:
    """The running kernel against the versions the field reports broken for the target (netboot/known_bad.py)."""
    match = re.match(r"\d+(\.\d+)+", _read(root, "/proc/sys/kernel/osrelease").strip())
    if not match or not any(rule.target == target and rule.package == KERNEL_PACKAGE for rule in KNOWN_BAD):
        return []
    refused = refusals(target, {KERNEL_PACKAGE: match.group(0)})
    if refused:
        return [Check("kernel known issues", False, f"{match.group(0)} is known bad for {target}: {refused[0].why}",
                      f"install {refused[0].fix} and reboot")]
    return [Check("kernel known issues", True, f"{match.group(0)}: none of those reported for {target}")]


def _modules(root: Path, groups: tuple[tuple[str, ...], ...]) -> list[Check]:
    checks = []
    for names in groups:
        loaded = [m for m in names if (root / "sys/module" / m).is_dir()]
        label = " or ".join(names)
        checks.append(Check(f"module {label}", bool(loaded), f"{', '.join(loaded)} loaded" if loaded else "not loaded",
                            f"modprobe {names[0]} (and install its firmware / driver package)"))
    return checks


def _kernel_driver(root: Path, module: str, need: tuple[int, int]) -> Check:
    """The loaded kernel driver's version (NVIDIA: /sys/module/nvidia/version) against what the toolkit needs."""
    version = _read(root, f"/sys/module/{module}/version").strip()
    want = f"{need[0]}.{need[1]}"
    fix = f"install {module} driver >= {want} on the host (Debian: nvidia-driver from non-free) and reboot"
    have = _major_minor(version)
    if have is None:
        return Check(f"{module} driver", False, f"no version in /sys/module/{module}/version (not loaded?)", fix)
    return Check(f"{module} driver", have >= need, f"{version} (need >= {want})", fix)


def _device_nodes(root: Path, device: str) -> list[Path]:
    path = root / device.lstrip("/")
    if path.is_dir():
        return sorted(p for p in path.iterdir() if not p.is_dir())
    return [path] if path.exists() else []


def _group_name(gid: int, root: Path) -> str:
    for line in _read(root, "/etc/group").splitlines():
        parts = line.split(":")
        if len(parts) > 2 and parts[2] == str(gid):
            return parts[0]
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _devices(root: Path, host: Host, uid: int, groups: set[int]) -> list[Check]:
    checks = []
    for device in host.devices:
        nodes = _device_nodes(root, device)
        if not nodes:
            checks.append(Check(f"device {device}", False, "missing",
                                "load the driver (see the module check) or pass the device into this VM/container"))
            continue
        blocked = [n for n in nodes if not (uid == 0 or n.stat().st_gid in groups or n.stat().st_uid == uid)]
        if blocked:
            gid = blocked[0].stat().st_gid
            name = _group_name(gid, root)
            fix = f"sudo usermod -aG {name} $USER, then log in again"
            if gid == 0 and host.device_rule:
                # Joining root's group is no answer: give the nodes to the render group with a udev rule.
                fix = (f"echo '{host.device_rule}' | sudo tee /etc/udev/rules.d/70-builder-accel.rules && "
                       "sudo udevadm trigger, then sudo usermod -aG render $USER and log in again")
            checks.append(Check(f"device {device}", False, f"{blocked[0].name} belongs to group {name} ({gid}), "
                                "which you are not in", fix))
        else:
            checks.append(Check(f"device {device}", True, f"{len(nodes)} node(s) accessible"))
    return checks


def _kernel_params(root: Path, keys: tuple[str, ...]) -> list[Check]:
    cmdline = _read(root, "/proc/cmdline").split()
    present = {arg.split("=", 1)[0]: arg for arg in cmdline}
    checks = [Check(f"kernel parameter {key}", key in present, present.get(key, "not set"),
                    f"add {STRIX_HALO_PARAMS} to GRUB_CMDLINE_LINUX in /etc/default/grub, update-grub, reboot")
              for key in keys]
    if keys:
        iommu = [a for a in cmdline if a in ("iommu=pt", "amd_iommu=off")]
        checks.append(Check("kernel parameter iommu", bool(iommu), iommu[0] if iommu else "default (translated)",
                            "add iommu=pt for faster GPU memory access (amd_iommu=off also works but disables the NPU)",
                            required=False))
    return checks


def _driver(root: Path, driver: HostDriver) -> list[Check]:
    """The user-space driver `builder run` mounts from this host: its libraries, their version, the firmware."""
    checks = []
    found = find_driver(driver, root)
    for name, lib in found.items():
        where = "/" + lib.path.relative_to(root).as_posix() if lib and lib.path.is_relative_to(root) else str(
            lib.path if lib else "")
        checks.append(Check(f"driver {name}", lib is not None,
                            where if lib else "not in ld.so.conf's folders nor the standard ones",
                            f"{driver.install}; or pass its folder with `builder run --driver-dir DIR`"))
    versions = sorted({lib.version for lib in found.values() if lib and lib.version})
    if any(found.values()):
        checks.append(Check("driver version", bool(versions), ", ".join(versions) if versions else
                            "unknown (the libraries' file names carry none)",
                            "check the installed package's version (dpkg -l, rpm -q) against the image's runtime",
                            required=False))
    if driver.firmware:
        blobs = firmware_files(driver, root)
        checks.append(Check("driver firmware", bool(blobs),
                            ", ".join(b.name for b in blobs[:3]) + (" …" if len(blobs) > 3 else "") if blobs else
                            f"none of {', '.join(driver.firmware)} under /lib/firmware",
                            driver.firmware_install))
    return checks


def _gpu_firmware(root: Path, generations: tuple[tuple[str, str, str], ...]) -> list[Check]:
    """Which GPU generations this host has firmware for, and whether each Intel GPU has a driver bound."""
    folders = [root / "lib/firmware", root / "usr/lib/firmware"]
    have = [(name, driver) for name, driver, glob in generations if any(any(f.glob(glob)) for f in folders)]
    lacking = [f"{name} on {driver}" for name, driver, _ in generations if (name, driver) not in have]
    if have:
        detail = f"present for {', '.join(n for n, _ in have)}" + (f"; missing for {', '.join(lacking)}"
                                                                   if lacking else "")
    else:
        detail = f"missing for every generation ({', '.join(lacking)})"
    checks = [Check("GPU firmware", len(have) == len(generations), detail,
                    "apt-get install firmware-intel-graphics (Debian non-free-firmware; linux-firmware's i915/ and "
                    "xe/ elsewhere), then reboot", required=False)]
    drivers = " or ".join(dict.fromkeys(driver for _, driver, _ in generations))
    for card in sorted((root / "sys/class/drm").glob("card[0-9]*")):
        if "-" in card.name or _read(root, f"/sys/class/drm/{card.name}/device/vendor").strip() != "0x8086":
            continue
        pci = f"8086:{_read(root, f'/sys/class/drm/{card.name}/device/device').strip().removeprefix('0x')}"
        bound = card / "device/driver"
        driver = os.path.basename(os.readlink(bound)) if bound.is_symlink() else ""
        checks.append(Check(f"GPU {card.name}", bool(driver), f"{pci} bound to {driver}" if driver else
                            f"{pci}: no driver bound", f"modprobe {drivers}: Lunar Lake and Battlemage need xe, "
                            "the generations before them i915; the kernel log names any firmware it could not load"))
    return checks


def _netboot_kernel(target: str, lock: Path) -> list[Check]:
    """What builder.lock pins for this target's netbooted nodes (the same kernel for every variant)."""
    spec = KERNELS.get(target)
    if spec is None:
        return []
    try:
        entry = pinned_kernel(target, spec, lockfile.netboot_entry(target, lock), display_path(lock))
    except BuilderError as exc:
        return [Check("netboot kernel", False, exc.message, exc.hint.removeprefix("run "), required=False)]
    pinned = {deb.name: deb for deb in entry.resolved}
    kernel = pinned["linux-image-amd64"]
    parts = [f"linux-image-amd64 {kernel.version} ({kernel.suite})",
             *(f"{name} {pinned[name].version}" for name in spec.firmware_packages)]
    return [Check("netboot kernel", True, f"{', '.join(parts)}: what `builder pxe build` gives netbooted nodes "
                  f"(pinned in {display_path(lock)})", required=False)]


def _memory(root: Path, model: Path | None) -> Check:
    match = re.search(r"^MemAvailable:\s+(\d+) kB", _read(root, "/proc/meminfo"), re.M)
    if not match:
        return Check("memory", False, "cannot read MemAvailable from /proc/meminfo")
    available = int(match.group(1)) * 1024
    if model is None:
        return Check("memory", True, f"{available / 2**30:.1f} GiB available (pass --model to compare)")
    need = int(model.stat().st_size * 1.1)  # weights plus ~10 % for context and compute buffers
    return Check("memory", available >= need,
                 f"{available / 2**30:.1f} GiB available, model {model.name} needs ~{need / 2**30:.1f} GiB",
                 "use a smaller quantisation, split the model over RPC workers, or free memory")


def diagnose(target: Target, variant: Variant, *, root: Path = Path("/"), model: Path | None = None,
             uid: int | None = None, groups: set[int] | None = None, lock: Path = lockfile.LOCK_FILE) -> list[Check]:
    host = variant.host
    uid = os.getuid() if uid is None else uid
    groups = set(os.getgroups()) | {os.getgid()} if groups is None else groups
    checks: list[Check] = []
    if host.min_kernel:
        checks.append(_kernel(root, host.min_kernel))
    checks += _known_bad_kernel(root, target.name)
    checks += _modules(root, host.modules)
    if host.min_driver and host.modules:
        checks.append(_kernel_driver(root, host.modules[0][0], host.min_driver))
    checks += _devices(root, host, uid, groups)
    if host.driver:
        checks += _driver(root, host.driver)
    checks += _kernel_params(root, host.kernel_params)
    if host.gpu_generations:
        checks += _gpu_firmware(root, host.gpu_generations)
    if host.cdi:
        vendor = host.cdi.split("/")[0]
        specs = [p for d in ("etc/cdi", "var/run/cdi") for p in (root / d).glob("*.yaml")
                 if vendor in p.read_text(errors="replace")]
        checks.append(Check(f"CDI spec for {host.cdi}", bool(specs), str(specs[0].relative_to(root)) if specs
                            else "none in /etc/cdi or /var/run/cdi",
                            "install nvidia-container-toolkit; nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml"))
    checks.append(_memory(root, model))
    checks += _netboot_kernel(target.name, lock)
    return checks
