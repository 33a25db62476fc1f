"""An SPDX 2.3 (JSON) bill of materials per image, from what the image itself holds.

The operating system comes from the image's /etc/os-release (an Ubuntu base is named Ubuntu, its packages
`pkg:deb/ubuntu/...`), the packages from its dpkg database, Python packages from the dist-info folders of
its site-packages (vLLM's virtual environment), so the document names what ships, not what the recipe
asked for. The recipe adds what the image cannot say about itself: llama.cpp or vLLM, the SDK wheels and
vendor .deb files with their sha256. The document is deterministic for one image: its dates come from
the image's `created` label and its namespace from the image digest.
"""

import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from builder import __version__
from builder.core.run import run
from builder.engines import Engine
from builder.fetch.debian import stanzas
from builder.recipe.models import BaseSpec, BuildPlan, ImageBase
from builder.recipe.vllm_models import VllmPlan

MEDIA_TYPE = "application/spdx+json"
MARK = "@@builder-sbom "
# Run inside the image (its own shell and sed): os-release, the dpkg database, then Name and Version of
# every installed Python distribution. A constant: nothing from a recipe is spliced in.
SCRIPT = r"""
cat /etc/os-release 2>/dev/null || cat /usr/lib/os-release 2>/dev/null
echo "@@builder-sbom dpkg"
cat /var/lib/dpkg/status 2>/dev/null
echo "@@builder-sbom python"
for f in /opt/*/lib/python3*/site-packages/*.dist-info/METADATA \
         /usr/local/lib/python3*/*-packages/*.dist-info/METADATA \
         /usr/lib/python3/dist-packages/*.dist-info/METADATA; do
  [ -f "$f" ] || continue
  echo "@@builder-sbom file $f"
  sed -n -e '/^$/q' -e '/^Name: /p' -e '/^Version: /p' "$f"
done
"""


@dataclass(frozen=True)
class ImageContents:
    """What an image says about itself."""

    os: dict[str, str] = field(default_factory=dict)  # os-release fields
    packages: list[dict[str, str]] = field(default_factory=list)  # dpkg: name, version, arch, source
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


def parse_dpkg_status(text: str) -> list[dict[str, str]]:
    """Installed packages from a dpkg status file: name, version, architecture, source."""
    packages = []
    for fields in stanzas(text):
        if fields.get("Package") and fields.get("Status", "").endswith(" installed"):
            source = fields.get("Source", fields["Package"]).split(" ")[0]
            packages.append({"name": fields["Package"], "version": fields.get("Version", ""),
                             "arch": fields.get("Architecture", ""), "source": source})
    return sorted(packages, key=lambda p: (p["name"], p["arch"]))


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
    os_part, _, rest = output.partition(MARK + "dpkg\n")
    dpkg_part, _, python_part = rest.partition(MARK + "python\n")
    return ImageContents(parse_os_release(os_part), parse_dpkg_status(dpkg_part), parse_python(python_part))


def read_contents(engine: Engine, ref: str) -> ImageContents:
    """Run the image once (no network, its entrypoint bypassed) to read what it holds."""
    proc = run([*engine.run_argv(), "--rm", "--network", "none", "--entrypoint", "sh", "--", ref, "-c", SCRIPT],
               timeout=300)
    return parse_contents(proc.stdout)


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


def _os_packages(contents: ImageContents) -> list[tuple[dict[str, Any], str]]:
    """(SPDX package, relationship to the image) for the operating system and its dpkg packages."""
    distro, name = contents.distro, contents.distro_name
    version = contents.os.get("VERSION_ID", "")
    out: list[tuple[dict[str, Any], str]] = [({
        "SPDXID": "SPDXRef-os", "name": distro, "versionInfo": version or "NOASSERTION",
        "downloadLocation": "NOASSERTION", "filesAnalyzed": False, "primaryPackagePurpose": "OPERATING-SYSTEM",
        "supplier": f"Organization: {name}", "comment": contents.os.get("PRETTY_NAME", f"{name} {version}").strip()
        + " (from the image's /etc/os-release)",
    }, "CONTAINS")]
    qualifier = f"{distro}-{version}" if version else ""
    for pkg in contents.packages:
        out.append(({
            "SPDXID": _spdx_id(f"SPDXRef-deb-{pkg['name']}-{pkg['arch']}"), "name": pkg["name"],
            "versionInfo": pkg["version"], "downloadLocation": "NOASSERTION", "filesAnalyzed": False,
            "supplier": f"Organization: {name}", "sourceInfo": f"{name} source package {pkg['source']}",
            "externalRefs": [_purl("deb", distro, pkg["name"], pkg["version"], arch=pkg["arch"], distro=qualifier)],
        }, "CONTAINS"))
    return out


def _python_packages(contents: ImageContents) -> list[tuple[dict[str, Any], str]]:
    return [({
        "SPDXID": _spdx_id(f"SPDXRef-pypi-{_pypi_name(p['name'])}-{p['path']}"), "name": p["name"],
        "versionInfo": p["version"], "downloadLocation": "NOASSERTION", "filesAnalyzed": False,
        "sourceInfo": f"installed in {p['path']}", "externalRefs": [_purl("pypi", "", _pypi_name(p["name"]),
                                                                          p["version"])],
    }, "CONTAINS") for p in contents.python]


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
            "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                              "referenceLocator": f"pkg:oci/{_spdx_id(image.rsplit('/', 1)[-1].split(':')[0])}"
                                                  f"@{digest.replace(':', '%3A')}"}]}


def _document(name: str, namespace: str, created: str, image: dict[str, Any],
              parts: list[tuple[dict[str, Any], str]]) -> dict[str, Any]:
    packages = [image]
    relationships = [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                      "relatedSpdxElement": "SPDXRef-image"}]
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
    return {
        "spdxVersion": "SPDX-2.3", "dataLicense": "CC0-1.0", "SPDXID": "SPDXRef-DOCUMENT", "name": name,
        "documentNamespace": namespace,
        "creationInfo": {"created": created, "creators": [f"Tool: builder-{__version__}"]},
        "packages": packages, "relationships": relationships,
    }


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
    return _image_document(plan, plan.variant, image, digest, comment, parts, contents)


def make_vllm_sbom(plan: VllmPlan, image: str, digest: str, contents: ImageContents) -> dict[str, Any]:
    """A vLLM image: vLLM and every Python package installed in it, vendor .debs, the OS and its packages."""
    parts = _vendor_debs(plan.base, True) + _vendor_debs(plan.toolchain, False)
    comment = f"vLLM {plan.vllm_version} for {plan.device}; base {plan.base_ref}; lock {plan.lock_file or 'none'}"
    return _image_document(plan, f"vllm-{plan.variant}", image, digest, comment, parts, contents)


def _image_document(plan: BuildPlan | VllmPlan, variant: str, image: str, digest: str, comment: str,
                    parts: list[tuple[dict[str, Any], str]], contents: ImageContents) -> dict[str, Any]:
    """The document of one image: the recipe's parts, then what the image holds (OS and Python packages)."""
    parts = parts + _os_packages(contents) + _python_packages(contents)
    created = plan.labels.get("org.opencontainers.image.created", "1970-01-01T00:00:00Z")
    return _document(f"builder-{plan.target}-{variant}", f"urn:builder:sbom:{plan.target}:{variant}:{digest}",
                     created, _image_package(image, digest, f"builder {plan.target}/{variant}; {comment}"), parts)


def sbom_bytes(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
