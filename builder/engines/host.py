"""Finding a device's user-space driver on a host (or in a root folder) and mounting it into containers.

The same lookup serves `builder run` and `toolbox` (the host is /), `doctor` (a fixture tree in tests) and
netboot (the image's own root, which must carry the driver itself). It reads what the dynamic loader reads:
the folders named in /etc/ld.so.conf (and its includes), then the standard ones.
"""

import glob
import platform
import re
from dataclasses import dataclass
from pathlib import Path

from builder.recipe.targets import HostDriver

# Debian's multiarch folder for this machine; also where the driver goes inside our Debian-based images,
# because ld.so searches it by default (no ld.so.cache entry and no LD_LIBRARY_PATH needed).
MULTIARCH = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(platform.machine(), "x86_64-linux-gnu")
CONTAINER_LIB_DIR = f"/usr/lib/{MULTIARCH}"
STANDARD_DIRS = (f"/usr/lib/{MULTIARCH}", f"/lib/{MULTIARCH}", "/usr/lib64", "/lib64", "/usr/lib", "/lib",
                 "/usr/local/lib")


@dataclass(frozen=True)
class Found:
    """A driver library on the host: the name the loader asks for, and the file it resolves to."""

    name: str
    path: Path  # the real file (symlinks followed inside the root)
    version: str  # from the real file's name (libfoo.so.1.38.0 -> 1.38.0), "" when it carries none


def _inside(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def _conf_dirs(root: Path, conf: str, seen: set[str]) -> list[str]:
    """Folders listed in an ld.so.conf file, following `include` globs (relative to the root)."""
    if conf in seen:
        return []
    seen.add(conf)
    try:
        lines = _inside(root, conf).read_text(errors="replace").splitlines()
    except OSError:
        return []
    dirs: list[str] = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line.startswith("include "):
            pattern = line.split(None, 1)[1]
            if not pattern.startswith("/"):
                pattern = str(Path(conf).parent / pattern)
            for match in sorted(glob.glob(str(_inside(root, pattern)))):
                dirs += _conf_dirs(root, "/" + str(Path(match).relative_to(root)), seen)
        elif line.startswith("/"):
            dirs.append(line)
    return dirs


def library_dirs(root: Path, extra: tuple[Path, ...] = ()) -> list[Path]:
    """Where to look, in order: folders given by the user, ld.so.conf's, then the standard ones (inside root)."""
    names = _conf_dirs(root, "/etc/ld.so.conf", set()) + list(STANDARD_DIRS)
    return [*extra, *(_inside(root, name) for name in dict.fromkeys(names))]


def _resolve(root: Path, path: Path) -> Path:
    """Follow symlinks the way they read inside `root` (an absolute link target stays inside it)."""
    for _ in range(40):
        if not path.is_symlink():
            return path
        target = path.readlink()
        path = _inside(root, str(target)) if target.is_absolute() else path.parent / target
    return path


def _version(name: str, real: Path) -> str:
    match = re.match(re.escape(name.split(".so", 1)[0]) + r"\.so\.(\d+(?:\.\d+)+)$", real.name)
    return match.group(1) if match else ""


def find_driver(driver: HostDriver, root: Path = Path("/"), extra: tuple[Path, ...] = ()) -> dict[str, Found | None]:
    """Each of the driver's libraries, found in the first folder that has it (None when none has)."""
    dirs = library_dirs(root, extra)
    found: dict[str, Found | None] = {}
    for name in driver.libraries:
        real = next((path for path in (_resolve(root, folder / name) for folder in dirs) if path.is_file()), None)
        found[name] = Found(name, real, _version(name, real)) if real else None
    return found


def firmware_files(driver: HostDriver, root: Path = Path("/")) -> list[Path]:
    """Firmware files the driver's device loads, under lib/firmware or usr/lib/firmware of the root."""
    files: list[Path] = []
    for base in ("lib/firmware", "usr/lib/firmware"):
        for pattern in driver.firmware:
            files += sorted(Path(p) for p in glob.glob(str(root / base / pattern)))
    return list(dict.fromkeys(files))


def driver_volumes(driver: HostDriver, extra: tuple[Path, ...] = ()) -> tuple[list[str], list[str]]:
    """`--volume` values that mount the host's driver read-only where the image's loader finds it,
    and the names of the libraries this host lacks."""
    volumes, missing = [], []
    for name, found in find_driver(driver, Path("/"), extra).items():
        if found is None:
            missing.append(name)
        else:
            volumes.append(f"{found.path}:{CONTAINER_LIB_DIR}/{name}:ro")
    return volumes, missing
