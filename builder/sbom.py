"""An SPDX 2.3 (JSON) bill of materials per image: its Debian packages, llama.cpp and its bases.

The package list is read from the image's own dpkg database, so it names what the image ships, not what
the recipe asked for. The document is deterministic for one image: its dates come from the image's
`created` label and its namespace from the image digest.
"""

import json
import re
from typing import Any

from builder import __version__
from builder.engines import Engine
from builder.models import BuildPlan
from builder.run import run

MEDIA_TYPE = "application/spdx+json"
DPKG_STATUS = "/var/lib/dpkg/status"


def _spdx_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", text)


def parse_dpkg_status(text: str) -> list[dict[str, str]]:
    """Installed packages from a dpkg status file: name, version, architecture, source."""
    packages = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields.get("Package") and fields.get("Status", "").endswith(" installed"):
            source = fields.get("Source", fields["Package"]).split(" ")[0]
            packages.append({"name": fields["Package"], "version": fields.get("Version", ""),
                             "arch": fields.get("Architecture", ""), "source": source})
    return sorted(packages, key=lambda p: (p["name"], p["arch"]))


def read_packages(engine: Engine, ref: str) -> list[dict[str, str]]:
    """The image's installed Debian packages (its entrypoint is a role dispatcher, so bypass it)."""
    proc = run([*engine.run_argv(), "--rm", "--network", "none", "--entrypoint", "cat", "--", ref, DPKG_STATUS],
               timeout=300)
    return parse_dpkg_status(proc.stdout)


def make_sbom(plan: BuildPlan, image: str, digest: str, packages: list[dict[str, str]]) -> dict[str, Any]:
    created = plan.labels.get("org.opencontainers.image.created", "1970-01-01T00:00:00Z")
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
    doc_packages: list[dict[str, Any]] = [
        {"SPDXID": "SPDXRef-image", "name": image.rsplit(":", 1)[0], "versionInfo": digest,
         "downloadLocation": "NOASSERTION", "filesAnalyzed": False, "primaryPackagePurpose": "CONTAINER",
         "comment": f"builder {plan.target}/{plan.variant}; runtime base {plan.runtime_ref}; "
                    f"toolchain base {plan.toolchain_ref}",
         "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                           "referenceLocator": f"pkg:oci/{_spdx_id(image.rsplit('/', 1)[-1].split(':')[0])}"
                                               f"@{digest.replace(':', '%3A')}"}]},
        llama,
    ]
    relationships = [
        {"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES", "relatedSpdxElement": "SPDXRef-image"},
        {"spdxElementId": "SPDXRef-image", "relationshipType": "CONTAINS", "relatedSpdxElement": "SPDXRef-llama.cpp"},
    ]
    for pkg in packages:
        spdx_id = _spdx_id(f"SPDXRef-deb-{pkg['name']}-{pkg['arch']}")
        doc_packages.append({
            "SPDXID": spdx_id, "name": pkg["name"], "versionInfo": pkg["version"],
            "downloadLocation": "NOASSERTION", "filesAnalyzed": False, "supplier": "Organization: Debian",
            "sourceInfo": f"Debian source package {pkg['source']}",
            "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                              "referenceLocator": f"pkg:deb/debian/{pkg['name']}@{pkg['version']}"
                                                  f"?arch={pkg['arch']}"}],
        })
        relationships.append({"spdxElementId": "SPDXRef-image", "relationshipType": "CONTAINS",
                              "relatedSpdxElement": spdx_id})
    return {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"builder-{plan.target}-{plan.variant}",
        "documentNamespace": f"urn:builder:sbom:{plan.target}:{plan.variant}:{digest}",
        "creationInfo": {"created": created, "creators": [f"Tool: builder-{__version__}"]},
        "packages": doc_packages,
        "relationships": relationships,
    }


def sbom_bytes(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
