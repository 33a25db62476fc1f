"""An SPDX 2.3 (JSON) bill of materials per image, from what the image itself holds: debsbom's document of its
dpkg database, merged with what builder adds (the image, llama.cpp or vLLM, the Python distributions of its
site-packages, SDK wheels and vendor .debs), validated by spdx-tools (docs/design.md, "The SBOM"). It is
deterministic for one image: its date comes from the image's `created` label and its namespace from the digest.
"""

import json
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from packaging.version import InvalidVersion, Version

from builder import __version__
from builder.core.errors import BuilderError
from builder.core.run import run
from builder.engines import Engine
from builder.fetch.wheels import pins_from_lines
from builder.plan.bases import host_arch
from builder.recipe.models import BaseSpec, BuildPlan, ImageBase
from builder.recipe.vllm_models import VllmPlan

MEDIA_TYPE = "application/spdx+json"
MARK = "@@builder-sbom "
# Run inside the image (its own shell and sed): os-release, the dpkg database and apt's record of what was
# installed by hand, then Name and Version of every installed Python distribution. A constant: nothing from
# a recipe is spliced in.
SCRIPT = r"""
cat /etc/os-release 2>/dev/null || cat /usr/lib/os-release 2>/dev/null
echo "@@builder-sbom dpkg"
cat /var/lib/dpkg/status 2>/dev/null
echo "@@builder-sbom apt-states"
cat /var/lib/apt/extended_states 2>/dev/null
echo "@@builder-sbom arch"
cat /var/lib/dpkg/arch-native 2>/dev/null
echo "@@builder-sbom python"
for f in /opt/*/lib/python3*/site-packages/*.dist-info/METADATA \
         /usr/local/lib/python3*/*-packages/*.dist-info/METADATA \
         /usr/lib/python3/dist-packages/*.dist-info/METADATA; do
  [ -f "$f" ] || continue
  echo "@@builder-sbom file $f"
  sed -n -e '/^$/q' -e '/^Name: /p' -e '/^Version: /p' "$f"
done
"""
_SECTIONS = ("dpkg", "apt-states", "arch", "python")
_VENDORS = ("debian", "ubuntu")  # the purl namespaces debsbom writes


class SbomError(BuilderError):
    """debsbom failed, or spdx-tools found the document invalid."""


@dataclass(frozen=True)
class ImageContents:
    """What an image says about itself."""

    os: dict[str, str] = field(default_factory=dict)  # os-release fields
    dpkg_status: str = ""  # /var/lib/dpkg/status as the image holds it
    apt_states: str = ""  # /var/lib/apt/extended_states: which packages were installed by hand
    arch: str = ""  # /var/lib/dpkg/arch-native (trixie on)
    python: list[dict[str, str]] = field(default_factory=list)  # name, version, path of METADATA

    @property
    def distro(self) -> str:
        """os-release's ID ("debian", "ubuntu"), the purl namespace of its packages."""
        return re.sub(r"[^a-z0-9._-]", "", self.os.get("ID", "linux").lower()) or "linux"

    @property
    def distro_name(self) -> str:
        return self.os.get("NAME") or self.distro


def parse_os_release(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if not sep or not re.match(r"^[A-Z][A-Z0-9_]*$", key):
            continue
        try:
            words = shlex.split(value)
        except ValueError:
            words = [value.strip("\"'")]
        fields[key] = words[0] if words else ""
    return fields


def parse_python(text: str) -> list[dict[str, str]]:
    found: dict[tuple[str, str], dict[str, str]] = {}
    entry: dict[str, str] = {}
    for line in [*text.splitlines(), MARK + "file "]:
        if line.startswith(MARK + "file "):
            if entry.get("name") and entry.get("version"):
                found.setdefault((entry["name"].lower(), entry["path"]), entry)
            entry = {"path": line[len(MARK + "file "):].rsplit("/", 2)[0]}
        elif line.startswith("Name: "):
            entry["name"] = line[6:].strip()
        elif line.startswith("Version: "):
            entry["version"] = line[9:].strip()
    return sorted(found.values(), key=lambda p: (p["name"].lower(), p["path"]))


def parse_contents(output: str) -> ImageContents:
    """SCRIPT's output: os-release first, then one section per `@@builder-sbom NAME` line."""
    parts: dict[str, list[str]] = {"os": []}
    current = "os"
    for line in output.splitlines(keepends=True):
        marker = line.rstrip("\n")
        if marker.startswith(MARK) and marker[len(MARK):] in _SECTIONS and marker[len(MARK):] not in parts:
            current = marker[len(MARK):]
            parts[current] = []
        else:
            parts.setdefault(current, []).append(line)
    text = {name: "".join(lines) for name, lines in parts.items()}
    return ImageContents(parse_os_release(text["os"]), text.get("dpkg", ""), text.get("apt-states", ""),
                         text.get("arch", "").strip(), parse_python(text.get("python", "")))


def read_contents(engine: Engine, ref: str) -> ImageContents:
    """Run the image once (no network, its entrypoint bypassed) to read what it holds."""
    proc = run([*engine.run_argv(), "--rm", "--network", "none", "--entrypoint", "sh", "--", ref, "-c", SCRIPT],
               timeout=300)
    return parse_contents(proc.stdout)


# --- the Debian half: debsbom ----------------------------------------------------------------------------

def debian_document(contents: ImageContents, created: str) -> dict[str, Any]:
    """debsbom's SPDX document (as JSON) of the image's dpkg database, written into a scratch root folder.

    debsbom reads only the files it is given (no apt lists: the images keep none), offline.
    """
    vendor = contents.distro if contents.distro in _VENDORS else "debian"
    has_dpkg = re.search(r"^Package: dpkg$", contents.dpkg_status, re.MULTILINE) is not None
    with tempfile.TemporaryDirectory(prefix="builder-sbom-") as folder:
        root = Path(folder)
        (root / "var/lib/dpkg").mkdir(parents=True)
        (root / "var/lib/dpkg/status").write_text(contents.dpkg_status, encoding="utf-8")
        if contents.arch:
            (root / "var/lib/dpkg/arch-native").write_text(contents.arch + "\n")
        if contents.apt_states:
            (root / "var/lib/apt").mkdir(parents=True)
            (root / "var/lib/apt/extended_states").write_text(contents.apt_states, encoding="utf-8")
        argv = [sys.executable, "-m", "debsbom.cli", "generate", "--sbom-type", "spdx", "--root", str(root),
                "--distro-name", contents.distro, "--distro-supplier", contents.distro_name,
                "--base-distro-vendor", vendor, "--spdx-namespace", "https://spdx.invalid/builder-debsbom",
                "--timestamp", created, "--out", "-"]
        if contents.os.get("VERSION_ID"):
            argv += ["--distro-version", contents.os["VERSION_ID"]]
        if not contents.arch and not has_dpkg:  # no dpkg to say it (an image without dpkg's own package)
            argv += ["--distro-arch", host_arch()]
        proc = run(argv, timeout=600)
    try:
        doc: dict[str, Any] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise SbomError("debsbom printed no SPDX document", "run it with -v to see why") from None
    return doc


# --- the document --------------------------------------------------------------------------------------

def _spdx_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", text)


def _purl(kind: str, namespace: str, name: str, version: str, **qualifiers: str) -> dict[str, str]:
    path = f"{namespace}/{name}" if namespace else name
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in sorted(qualifiers.items()) if v)
    locator = f"pkg:{kind}/{path}@{quote(version, safe='.-_~')}" + (f"?{query}" if query else "")
    return {"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl", "referenceLocator": locator}


def _pypi_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _normal_version(text: str) -> str:
    try:
        return str(Version(text))
    except InvalidVersion:
        return text


def _python_packages(contents: ImageContents, lock: list[str] | None = None,
                     lock_file: str | None = None) -> list[tuple[dict[str, Any], str]]:
    """The Python distributions installed in the image; those a wheel lock pinned get its sha256."""
    pinned = {(_pypi_name(pin.name), _normal_version(pin.version)): pin.sha256 for pin in pins_from_lines(lock or [])}
    out: list[tuple[dict[str, Any], str]] = []
    for p in contents.python:
        package: dict[str, Any] = {
            "SPDXID": _spdx_id(f"SPDXRef-pypi-{_pypi_name(p['name'])}-{p['path']}"), "name": p["name"],
            "versionInfo": p["version"], "downloadLocation": "NOASSERTION", "filesAnalyzed": False,
            "sourceInfo": f"installed in {p['path']}",
            "externalRefs": [_purl("pypi", "", _pypi_name(p["name"]), p["version"])],
        }
        sha256 = pinned.get((_pypi_name(p["name"]), _normal_version(p["version"])))
        if sha256:
            package["checksums"] = [{"algorithm": "SHA256", "checksumValue": sha256}]
            package["comment"] = f"installed from the wheel {lock_file} pins by this sha256"
        out.append((package, "CONTAINS"))
    return out


def _vendor_debs(base: BaseSpec | None, shipped: bool) -> list[tuple[dict[str, Any], str]]:
    """The recipe's .deb files: in the runtime base they ship; in the toolchain base they build."""
    if not isinstance(base, ImageBase):
        return []
    out = []
    for deb in base.debs:
        file_name = deb.url.rsplit("/", 1)[-1]
        out.append(({
            "SPDXID": _spdx_id(f"SPDXRef-vendor-{deb.sha256[:16]}"), "name": file_name.removesuffix(".deb"),
            "packageFileName": file_name, "versionInfo": "NOASSERTION", "downloadLocation": deb.url,
            "filesAnalyzed": False, "checksums": [{"algorithm": "SHA256", "checksumValue": deb.sha256}],
            "comment": "vendor .deb named by the recipe" + ("" if shipped else " (toolchain stage, not shipped)"),
        }, "CONTAINS" if shipped else "BUILD_DEPENDENCY_OF"))
    return out


def _image_package(image: str, digest: str, comment: str) -> dict[str, Any]:
    return {"SPDXID": "SPDXRef-image", "name": image.rsplit(":", 1)[0], "versionInfo": digest,
            "downloadLocation": "NOASSERTION", "filesAnalyzed": False, "primaryPackagePurpose": "CONTAINER",
            "comment": comment,
            "externalRefs": [_purl("oci", "", _spdx_id(image.rsplit("/", 1)[-1].split(":")[0]), digest)]}


def _document(name: str, namespace: str, created: str, image: dict[str, Any], debian: dict[str, Any],
              parts: list[tuple[dict[str, Any], str]]) -> dict[str, Any]:
    """The image describes the document; it contains the OS (and each installed .deb) from debsbom's
    document, whose own edges (sources, dependencies) stay, and builder's parts."""
    relationships = [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                      "relatedSpdxElement": "SPDXRef-image"}]
    relationships += [r for r in debian.get("relationships", []) if r.get("spdxElementId") != "SPDXRef-DOCUMENT"]
    for package in debian.get("packages", []):
        if package.get("primaryPackagePurpose") != "SOURCE":  # the OS and the binary packages are in the image
            parts.append((package, "CONTAINS"))
    packages = [image]
    seen = {"SPDXRef-image"}
    for package, relation in parts:
        if package["SPDXID"] in seen:
            continue
        seen.add(package["SPDXID"])
        packages.append(package)
        if relation == "CONTAINS":
            relationships.append({"spdxElementId": "SPDXRef-image", "relationshipType": "CONTAINS",
                                  "relatedSpdxElement": package["SPDXID"]})
        else:
            relationships.append({"spdxElementId": package["SPDXID"], "relationshipType": relation,
                                  "relatedSpdxElement": "SPDXRef-image"})
    packages += [p for p in debian.get("packages", []) if p["SPDXID"] not in seen]  # the source packages
    creators = [f"Tool: builder-{__version__}", *(c for c in debian.get("creationInfo", {}).get("creators", [])
                                                  if c.startswith("Tool: "))]
    return {
        "spdxVersion": "SPDX-2.3", "dataLicense": "CC0-1.0", "SPDXID": "SPDXRef-DOCUMENT", "name": name,
        "documentNamespace": namespace, "creationInfo": {"created": created, "creators": creators},
        "packages": sorted(packages, key=lambda p: (p["SPDXID"] != "SPDXRef-image", p["SPDXID"])),
        "relationships": sorted(relationships, key=lambda r: (r["relationshipType"] != "DESCRIBES",
                                                              r["spdxElementId"], r["relationshipType"],
                                                              r["relatedSpdxElement"], r.get("comment", ""))),
    }


def validated(doc: dict[str, Any]) -> dict[str, Any]:
    """The document as spdx-tools parses, validates and writes it; the first problem it finds is an error."""
    from spdx_tools.spdx.jsonschema.document_converter import DocumentConverter
    from spdx_tools.spdx.parser.error import SPDXParsingError
    from spdx_tools.spdx.parser.jsonlikedict.json_like_dict_parser import JsonLikeDictParser
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

    try:
        document = JsonLikeDictParser().parse(doc)  # type: ignore[no-untyped-call]
    except SPDXParsingError as exc:
        raise SbomError(f"SBOM {doc.get('name')}: spdx-tools cannot parse it: {exc.get_messages()[:1]}") from None  # type: ignore[no-untyped-call]
    problems = validate_full_spdx_document(document)
    if problems:
        raise SbomError(f"SBOM {doc.get('name')}: not valid SPDX ({len(problems)} problems): "
                        f"{problems[0].validation_message}")
    out: dict[str, Any] = DocumentConverter().convert(document)  # type: ignore[no-untyped-call]
    return out


def make_sbom(plan: BuildPlan, image: str, digest: str, contents: ImageContents) -> dict[str, Any]:
    """A llama.cpp image: llama.cpp, its SDK wheels and vendor .debs, the OS and everything installed."""
    source = plan.source
    llama: dict[str, Any] = {
        "SPDXID": "SPDXRef-llama.cpp", "name": "llama.cpp", "versionInfo": source.version,
        "downloadLocation": source.locator if "://" in source.locator else "NOASSERTION",
        "sourceInfo": f"built from {source.locator}", "filesAnalyzed": False,
        "comment": f"source identity {source.identity}; cmake " +
                   " ".join(f"-D{k}={v}" for k, v in sorted(plan.cmake.items())),
    }
    if source.identity.startswith("sha256:"):
        llama["checksums"] = [{"algorithm": "SHA256", "checksumValue": source.identity.split(":", 1)[1]}]
    parts: list[tuple[dict[str, Any], str]] = [(llama, "CONTAINS")]
    for sdk_name, sdk in sorted(plan.sdks.items()):
        parts.append(({
            "SPDXID": _spdx_id(f"SPDXRef-sdk-{sdk_name}"), "name": sdk.package, "versionInfo": sdk.version,
            "packageFileName": sdk.file, "downloadLocation": "NOASSERTION", "filesAnalyzed": False,
            "checksums": [{"algorithm": "SHA256", "checksumValue": sdk.sha256}],
            "externalRefs": [_purl("pypi", "", _pypi_name(sdk.package), sdk.version)],
            "comment": f"SDK wheel, built against in /opt/sdk/{sdk_name}" +
                       (f"; shipped: {', '.join(sdk.ship)}" if sdk.ship else "; nothing of it shipped"),
        }, "CONTAINS" if sdk.ship else "BUILD_DEPENDENCY_OF"))
    parts += _vendor_debs(plan.runtime, True) + _vendor_debs(plan.toolchain, False)
    comment = f"runtime base {plan.runtime_ref}; toolchain base {plan.toolchain_ref}"
    return _image_document(plan, plan.variant, image, digest, comment, parts, contents, _python_packages(contents))


def make_vllm_sbom(plan: VllmPlan, image: str, digest: str, contents: ImageContents) -> dict[str, Any]:
    """A vLLM image: vLLM and every Python package installed in it, vendor .debs, the OS and its packages."""
    parts = _vendor_debs(plan.base, True) + _vendor_debs(plan.toolchain, False)
    comment = f"vLLM {plan.vllm_version} for {plan.device}; base {plan.base_ref}; lock {plan.lock_file or 'none'}"
    return _image_document(plan, f"vllm-{plan.variant}", image, digest, comment, parts, contents,
                           _python_packages(contents, plan.lock_pins, plan.lock_file))


def _image_document(plan: BuildPlan | VllmPlan, variant: str, image: str, digest: str, comment: str,
                    parts: list[tuple[dict[str, Any], str]], contents: ImageContents,
                    python: list[tuple[dict[str, Any], str]]) -> dict[str, Any]:
    """The document of one image: the recipe's parts, the Python packages, debsbom's Debian half; validated."""
    created = plan.labels.get("org.opencontainers.image.created", "1970-01-01T00:00:00Z")
    debian = debian_document(contents, created)
    doc = _document(f"builder-{plan.target}-{variant}", f"urn:builder:sbom:{plan.target}:{variant}:{digest}",
                    created, _image_package(image, digest, f"builder {plan.target}/{variant}; {comment}"), debian,
                    parts + python)
    return validated(doc)


def sbom_bytes(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
