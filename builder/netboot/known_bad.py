"""Kernels and firmware the field reports broken for a target: `pxe build` refuses a pinned version they name.

Each rule covers a range of Debian versions of one package (`first` included, `fixed` excluded; a rule
without `first` is a floor). A Debian version is compared with dpkg's own rules, so `6.16.9~` admits
6.16.9-1 and every later revision, and `20251125~` takes in every Debian revision of that release. The
comment above each rule names where the fact comes from; docs/netboot.md repeats them for users. `builder
doctor` applies the kernel rules to a host's running kernel too.
"""

from dataclasses import dataclass

from builder.core.run import run

KERNEL_PACKAGE = "linux-image-amd64"  # rules on it hold for a running kernel of that upstream version too


@dataclass(frozen=True)
class KnownBad:
    target: str
    package: str  # the Debian package whose pinned version is checked
    first: str | None  # the first bad version (None: every version before `fixed`)
    fixed: str | None  # the first version past the problem (None: no fixed version known)
    why: str  # what breaks, in a user's words
    fix: str  # what the target needs instead


KNOWN_BAD: tuple[KnownBad, ...] = (
    # whylucian/softab, docs/troubleshooting.md ("VRAM Visibility Bug"): on Strix Halo, ROCm sees only ~15.5 GB
    # of the allocated memory until kernel 6.16.9. It also raises FIELD-NOTES' "6.16 or later recommended".
    KnownBad("strix-halo", "linux-image-amd64", None, "6.16.9~",
             "before 6.16.9 ROCm sees only about 15.5 GB of the board's unified memory",
             "a kernel of 6.16.9 or later"),
    # kyuz0/amd-strix-halo-toolboxes, docs/troubleshooting-firmware.md (2026-01-08), and whylucian/softab,
    # docs/troubleshooting.md ("Bad Firmware"): linux-firmware 20251125 breaks ROCm on Strix Halo (AMD recalled
    # the update); 20251111 is the release they name as stable.
    KnownBad("strix-halo", "firmware-amd-graphics", "20251125~", "20251126~",
             "linux-firmware 20251125 breaks ROCm on Strix Halo (AMD recalled it)",
             "a firmware-amd-graphics other than 20251125 (20251111 is the release named stable)"),
    # wyns.dev, "Debugging a boot crash on Linux 7.0 rc1 and rc2 (Strix Halo)": a Ryzen AI Max+ 395 board hangs
    # in amdgpu's initialisation on 7.0-rc1 and rc2 (Debian: experimental's 7.0~rcN); no other version is named.
    KnownBad("strix-halo", "linux-image-amd64", "7.0~rc1~", "7.0~rc3~",
             "Linux 7.0-rc1 and rc2 hang at amdgpu's start on Strix Halo boards",
             "a kernel other than 7.0-rc1 and rc2 (sid's released ones)"),
)


def version_less(a: str, b: str) -> bool:
    """Whether Debian version `a` sorts before `b`, by dpkg itself."""
    return run(["dpkg", "--compare-versions", "--", a, "lt", b], check=False, timeout=30).returncode == 0


def applies(rule: KnownBad, version: str) -> bool:
    if rule.first is not None and version_less(version, rule.first):
        return False
    return rule.fixed is None or version_less(version, rule.fixed)


def refusals(target: str, versions: dict[str, str], rules: tuple[KnownBad, ...] = KNOWN_BAD) -> list[KnownBad]:
    """The rules that refuse `versions` (package -> pinned Debian version) for a node of `target`."""
    return [rule for rule in rules if rule.target == target and rule.package in versions
            and applies(rule, versions[rule.package])]
