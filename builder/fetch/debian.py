"""The full package set of a bootstrapped base, resolved with apt in a throwaway directory.

`builder lock` records what mmdebstrap's minbase would install today: the Essential:yes packages, then apt,
the Priority:required packages and the recipe's packages, each with its exact version, its .deb's path in
the pool and its sha256 from the signed index. apt runs as it does inside mmdebstrap (same selection
patterns, same two steps, the same dummy usr-is-merged that keeps usrmerge and perl out) but only
simulates: nothing is downloaded but the package indexes, nothing is installed, no root is needed.
"""

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from builder.core.errors import CommandError, LockError
from builder.core.run import run
from builder.recipe.models import BootstrapBase, LockedDeb

DEFAULT_MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://security.debian.org/debian-security"
# Released suites get their -updates and -security sources when no mirror is given, as with mmdebstrap.
STABLE_SUITES = ("bullseye", "bookworm", "trixie")
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
SNAPSHOT_EXAMPLE = "https://snapshot.debian.org/archive/debian/20261101T000000Z/"

_INST = re.compile(r"^Inst (\S+) (?:\[[^\]]*\] )?\((\S+) ", re.MULTILINE)

# What mmdebstrap's merged-usr setup hook puts into the status file before the essential packages.
_DUMMY_USR_IS_MERGED = ("Package: usr-is-merged\nStatus: install ok installed\nPriority: optional\n"
                        "Architecture: all\nMulti-Arch: foreign\nVersion: 1\n"
                        "Description: dummy package of the merged-usr setup hook\n")


@dataclass(frozen=True)
class AptSource:
    """One `deb URI SUITE COMPONENTS` line of a base."""

    uri: str
    suite: str
    components: tuple[str, ...]

    def line(self, options: str = "") -> str:
        return " ".join(["deb", *([f"[{options}]"] if options else []), self.uri, self.suite, *self.components])

    def resolver_line(self) -> str:
        # A file:// mirror is a directory of one's own (tests, an offline copy): nothing stands between it
        # and us, so its index is taken unsigned. Every other source is checked against Debian's keyring.
        if self.uri.startswith("file:"):
            return self.line("trusted=yes")
        return self.line(f"signed-by={DEBIAN_KEYRING}" if DEBIAN_KEYRING.is_file() else "")


def suite_sources(suite: str, components: tuple[str, ...], mirror: str | None = None) -> list[AptSource]:
    """The sources of one suite: a released suite without a mirror of its own gets -updates and -security."""
    if mirror is not None and not re.match(r"^(https?|file)://\S+$", mirror):
        raise LockError(f"mirror: {mirror!r} is not an http(s):// or file:// URL",
                        f"give the archive's root URL, e.g. {DEFAULT_MIRROR} or {SNAPSHOT_EXAMPLE}")
    root = (mirror or DEFAULT_MIRROR).rstrip("/")
    sources = [AptSource(root, suite, components)]
    if mirror is None and suite in STABLE_SUITES:
        sources += [AptSource(root, f"{suite}-updates", components),
                    AptSource(SECURITY_MIRROR, f"{suite}-security", components)]
    return sources


def apt_sources(spec: BootstrapBase) -> list[AptSource]:
    """The sources a base installs from, and the ones its image keeps in /etc/apt/sources.list."""
    components = tuple(spec.components)
    sources = suite_sources(spec.suite, components, spec.mirror)
    mirror = (spec.mirror or DEFAULT_MIRROR).rstrip("/")
    # Extra suites (experimental on top of sid): apt preferences decide which packages come from them.
    sources += [AptSource(mirror, extra.suite, components) for extra in spec.extra_suites]
    return sources


def stanzas(text: str) -> list[dict[str, str]]:
    """The paragraphs of a Debian control file (Packages, dpkg status) as field dicts; continuation lines left out."""
    out = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            out.append(fields)
    return out


class _Apt:
    """apt-get and apt-cache over a private root: own sources, own lists, own (fake) dpkg status."""

    def __init__(self, root: Path, sources: list[AptSource], arch: str, preferences: str = "") -> None:
        self.root = root
        for sub in ("etc/apt/apt.conf.d", "etc/apt/preferences.d", "etc/apt/sources.list.d",
                    "var/lib/apt/lists/partial", "var/cache/apt/archives/partial", "var/lib/dpkg"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        if preferences:
            (root / "etc/apt/preferences.d/builder.pref").write_text(preferences)
        (root / "etc/apt/sources.list").write_text("".join(s.resolver_line() + "\n" for s in sources))
        self.status = root / "var/lib/dpkg/status"
        self.status.write_text("")
        trusted = "" if DEBIAN_KEYRING.is_file() else 'Dir::Etc::TrustedParts "/etc/apt/trusted.gpg.d/";\n'
        (root / "apt.conf").write_text(
            f'Dir "{root}/";\nDir::State::status "{self.status}";\nAPT::Architecture "{arch}";\n'
            f'APT::Architectures {{ "{arch}"; }};\nAcquire::Languages "none";\nAPT::Install-Recommends "false";\n'
            f'Acquire::Check-Valid-Until "false";\nAcquire::Retries "3";\n{trusted}')
        self.env = {**os.environ, "APT_CONFIG": str(root / "apt.conf")}

    def __call__(self, *argv: str, timeout: float = 120) -> str:
        return run(argv, env=self.env, timeout=timeout).stdout

    def update(self, where: str, hint: str) -> None:
        try:
            self("apt-get", "update", "--error-on=any", timeout=900)
        except CommandError as exc:
            raise LockError(f"cannot read the package index of {where}: {exc.last_line}", hint) from None

    def installs(self, installed: dict[str, str], *patterns: str) -> dict[str, str]:
        """name -> version of what `apt-get install PATTERNS` would install on top of `installed` (stanzas)."""
        self.status.write_text("\n".join(installed.values()))
        out = self("apt-get", "install", "--simulate", "--yes", "--", *patterns)
        return {name.split(":")[0]: version for name, version in _INST.findall(out)}

    def show(self, chosen: dict[str, str]) -> dict[str, dict[str, str]]:
        """name -> the index stanza of exactly that version."""
        text = self("apt-cache", "show", "--", *(f"{n}={v}" for n, v in sorted(chosen.items())))
        found: dict[str, dict[str, str]] = {}
        for fields in stanzas(text):
            found.setdefault(fields["Package"], fields)
        return found

    def locked(self, chosen: dict[str, str], suite: str) -> list[LockedDeb]:
        """The chosen versions as lock entries, sorted by name; `suite` for those madison names no suite of."""
        found = self.show(chosen)
        origins = self.origins(chosen)
        return [LockedDeb(name=name, version=version, arch=found[name]["Architecture"],
                          suite=origins.get(name, suite), filename=found[name]["Filename"],
                          sha256=found[name]["SHA256"], size=int(found[name]["Size"]),
                          priority=found[name].get("Priority", "optional"))
                for name, version in sorted(chosen.items())]

    def origins(self, chosen: dict[str, str]) -> dict[str, str]:
        """name -> the suite (as the sources name it) its chosen version comes from."""
        out: dict[str, str] = {}
        for line in self("apt-cache", "madison", "--", *sorted(chosen)).splitlines():
            parts = [p.strip() for p in line.split("|")]
            if len(parts) == 3 and chosen.get(parts[0]) == parts[1] and parts[2].endswith(" Packages"):
                out.setdefault(parts[0], parts[2].split()[1].split("/")[0])
        return out


def _installed(chosen: dict[str, str], text: str) -> dict[str, str]:
    """Status-file stanzas for `chosen`, cut from apt-cache show's `text` blocks."""
    blocks: dict[str, str] = {}
    for block in text.split("\n\n"):
        fields = stanzas(block)
        if fields and chosen.get(fields[0]["Package"]) == fields[0].get("Version"):
            blocks.setdefault(fields[0]["Package"], "Status: install ok installed\n" + block.strip() + "\n")
    missing = sorted(set(chosen) - set(blocks))
    assert not missing, f"apt-cache show gave no stanza for {missing}"
    return blocks


def resolve(spec: BootstrapBase, arch: str, preferences: str = "") -> list[LockedDeb]:
    """Every package a minbase bootstrap of `spec` installs from the archive as it is now, sorted by name.

    `preferences`: apt preferences the bootstrap uses too (e.g. which packages come from an extra suite)."""
    sources = apt_sources(spec)
    where = f"{spec.suite} from {sources[0].uri}"
    narrow = f"?or(?archive(^{spec.suite}$),?codename(^{spec.suite}$)),?architecture({arch})"
    with tempfile.TemporaryDirectory(prefix="builder-resolve-") as tmp:
        apt = _Apt(Path(tmp), sources, arch, preferences)
        apt.update(where, "check the suite, components and mirror of the base, and that the mirror is reachable")
        merged_usr = run(["apt-cache", "show", "--no-all-versions", "--", "usr-is-merged"], env=apt.env,
                         check=False).returncode == 0
        status = {"usr-is-merged": _DUMMY_USR_IS_MERGED} if merged_usr else {}
        chosen: dict[str, str] = {}
        steps = [[f"?narrow({narrow},?essential)"],
                 ["usr-is-merged"] if merged_usr else [],
                 ["apt", f"?narrow({narrow},?and(?priority(required),?not(?essential)))", *spec.packages]]
        for patterns in steps:
            if not patterns:
                continue
            try:
                new = apt.installs(status, *patterns)
            except CommandError as exc:
                raise LockError(f"packages of the {spec.suite} base cannot be installed together: {exc.last_line}",
                                "check the base's packages against the suite (apt-cache policy NAME)") from None
            chosen.update(new)
            text = apt("apt-cache", "show", "--", *(f"{n}={v}" for n, v in sorted(new.items())))
            status.update(_installed(new, text))
        return apt.locked(chosen, spec.suite)


def resolve_packages(sources: list[AptSource], arch: str, packages: tuple[str, ...]) -> list[LockedDeb]:
    """The packages and everything they depend on, installed on an empty system, as the archive has them now:
    what mmdebstrap's `extract` variant unpacks (no Essential set, no maintainer scripts), sorted by name."""
    where = f"{sources[0].suite} from {sources[0].uri}"
    with tempfile.TemporaryDirectory(prefix="builder-resolve-") as tmp:
        apt = _Apt(Path(tmp), sources, arch)
        apt.update(where, "check the suite, components and mirror, and that the mirror is reachable")
        try:
            chosen = apt.installs({}, *packages)
        except CommandError as exc:
            raise LockError(f"{', '.join(packages)} cannot be installed together from {where}: {exc.last_line}",
                            "check the packages against the suite (apt-cache policy NAME)") from None
        return apt.locked(chosen, sources[0].suite)
