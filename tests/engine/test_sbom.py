"""The SBOM names what the image holds: its distribution from /etc/os-release (an Ubuntu base is not
Debian), its dpkg packages with that distribution's purls (debsbom), its Python packages, and the recipe's
SDK wheels and vendor .debs with their sha256."""

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builder.engines import ENGINES
from builder.fetch.bootstrap import ensure_base
from builder.pipeline.build import Prepared
from builder.plan.make import make_plan
from builder.publish.sbom import make_sbom, parse_contents, read_contents
from builder.recipe.load import load_recipe, recipe_path_for
from builder.recipe.models import DebFile, ImageBase, SourceInfo
from conftest import ROOT, require_engine, run_cli

UBUNTU_OS_RELEASE = """PRETTY_NAME="Ubuntu 24.04.1 LTS"
NAME="Ubuntu"
VERSION_ID="24.04"
VERSION="24.04.1 LTS (Noble Numbat)"
VERSION_CODENAME=noble
ID=ubuntu
ID_LIKE=debian
HOME_URL="https://www.ubuntu.com/"
UBUNTU_CODENAME=noble
"""

# The real format of /var/lib/dpkg/status: stanzas, continuation lines, Source with a version, and a
# package that was removed but left its configuration (not installed, so not in the SBOM).
UBUNTU_DPKG_STATUS = """Package: libc6
Status: install ok installed
Priority: optional
Section: libs
Installed-Size: 12345
Maintainer: Ubuntu Developers <ubuntu-devel-discuss@lists.ubuntu.com>
Architecture: amd64
Multi-Arch: same
Source: glibc
Version: 2.39-0ubuntu8.3
Depends: libgcc-s1
Description: GNU C Library: Shared libraries
 Contains the standard libraries that are used by nearly all programs on
 the system.

Package: libgomp1
Status: install ok installed
Architecture: amd64
Source: gcc-14 (14.2.0-4ubuntu2~24.04)
Version: 14.2.0-4ubuntu2~24.04
Description: GCC OpenMP (GOMP) support library

Package: old-tool
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0-1ubuntu1
Description: removed, configuration kept
"""

TORCH_METADATA = """Metadata-Version: 2.1
Name: torch
Version: 2.5.1+cpu
Summary: Tensors and Dynamic neural networks in Python with strong GPU acceleration

Name: not-a-header-after-the-blank-line
"""


def purls(package: dict[str, Any]) -> list[str]:
    return [ref["referenceLocator"] for ref in package.get("externalRefs", [])]


@pytest.fixture(scope="module")
def ubuntu_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A small image whose os-release, dpkg database and site-packages are an Ubuntu system's, on top
    of the cpu recipe's bootstrapped base (nothing is pulled)."""
    require_engine("podman")
    engine = ENGINES["podman"]()
    base = ensure_base(engine, load_recipe(recipe_path_for("cpu")).variants["cpu"].base.runtime)
    context = tmp_path_factory.mktemp("ubuntu-context")
    (context / "os-release").write_text(UBUNTU_OS_RELEASE)
    (context / "status").write_text(UBUNTU_DPKG_STATUS)
    (context / "METADATA").write_text(TORCH_METADATA)
    (context / "Containerfile").write_text(
        f"FROM {base}\n"
        "RUN rm -f /etc/os-release /usr/lib/os-release\n"
        "COPY os-release /usr/lib/os-release\n"
        "RUN ln -s ../usr/lib/os-release /etc/os-release\n"
        "COPY status /var/lib/dpkg/status\n"
        "COPY METADATA /opt/vllm/lib/python3.12/site-packages/torch-2.5.1+cpu.dist-info/METADATA\n")
    ref = "localhost/builder-test/sbom-ubuntu:latest"
    subprocess.run(["podman", "build", "-q", "-t", ref, "--", str(context)], check=True, capture_output=True)
    try:
        yield ref
    finally:
        subprocess.run(["podman", "rmi", "--", ref], capture_output=True)


@pytest.mark.engine
def test_an_ubuntu_based_image_is_described_as_ubuntu(ubuntu_image: str, cpu_prepared: Prepared) -> None:
    engine = ENGINES["podman"]()
    contents = read_contents(engine, ubuntu_image)
    doc = make_sbom(cpu_prepared.plan, ubuntu_image, "sha256:" + "c" * 64, contents)
    system = next(p for p in doc["packages"] if p.get("primaryPackagePurpose") == "OPERATING_SYSTEM")
    assert (system["name"], system["versionInfo"], system["supplier"]) == ("ubuntu", "24.04", "Organization: Ubuntu")
    debs = {p["name"]: p for p in doc["packages"] if any(u.startswith("pkg:deb/") for u in purls(p))}
    assert sorted(debs) == ["gcc-14", "glibc", "libc6", "libgomp1"]  # old-tool is only configuration, not installed
    assert purls(debs["libc6"]) == ["pkg:deb/ubuntu/libc6@2.39-0ubuntu8.3?arch=amd64"]
    assert purls(debs["libgomp1"]) == ["pkg:deb/ubuntu/libgomp1@14.2.0-4ubuntu2~24.04?arch=amd64"]
    assert debs["gcc-14"]["primaryPackagePurpose"] == "SOURCE"
    assert {"spdxElementId": debs["gcc-14"]["SPDXID"], "relationshipType": "GENERATES",
            "relatedSpdxElement": debs["libgomp1"]["SPDXID"]} in doc["relationships"]
    # debsbom's summary of a source package says "Debian source code package", whatever the distribution
    assert "debian" not in json.dumps([[purls(p), p.get("supplier")] for p in [*debs.values(), system]]).lower()
    [torch] = [p for p in doc["packages"] if p["name"] == "torch"]
    assert torch["versionInfo"] == "2.5.1+cpu" and purls(torch) == ["pkg:pypi/torch@2.5.1%2Bcpu"]
    assert torch["sourceInfo"] == "installed in /opt/vllm/lib/python3.12/site-packages"
    contained = {r["relatedSpdxElement"] for r in doc["relationships"] if r["relationshipType"] == "CONTAINS"}
    assert {system["SPDXID"], debs["libc6"]["SPDXID"], torch["SPDXID"], "SPDXRef-llama.cpp"} <= contained


@pytest.mark.engine
def test_the_cpu_base_is_still_debian(cpu_prepared: Prepared) -> None:
    require_engine("podman")
    engine = ENGINES["podman"]()
    base = ensure_base(engine, load_recipe(recipe_path_for("cpu")).variants["cpu"].base.runtime)
    doc = make_sbom(cpu_prepared.plan, base, "sha256:" + "d" * 64, read_contents(engine, base))
    system = next(p for p in doc["packages"] if p.get("primaryPackagePurpose") == "OPERATING_SYSTEM")
    assert (system["name"], system["versionInfo"]) == ("debian", "13")  # trixie
    libc = next(p for p in doc["packages"] if p["name"] == "libc6")
    assert purls(libc)[0].startswith("pkg:deb/debian/libc6@") and purls(libc)[0].endswith("?arch=amd64")


def test_sdk_wheels_and_vendor_debs_are_listed_with_their_sha256() -> None:
    recipe = load_recipe(recipe_path_for("intel-npu"))
    source = SourceInfo(locator="https://example.invalid/llama.cpp.tar.gz", identity="sha256:" + "1" * 64,
                        version="0.0.0", epoch=0)
    plan = make_plan(recipe, "recipes/intel-npu.yaml", source)
    deb = DebFile(url="https://vendor.example.invalid/pool/npu-driver_1.2.3_amd64.deb", sha256="2" * 64)
    plan = plan.model_copy(update={"runtime": ImageBase(kind="image", ref="debian@sha256:" + "3" * 64, debs=[deb])})
    doc = make_sbom(plan, "localhost/builder/intel-npu:x", "sha256:" + "e" * 64,
                    parse_contents('ID=debian\nVERSION_ID="12"\nNAME="Debian GNU/Linux"\n'
                                   "@@builder-sbom dpkg\n@@builder-sbom python\n"))
    [wheel] = [p for p in doc["packages"] if p["SPDXID"] == "SPDXRef-sdk-openvino"]
    sdk = plan.sdks["openvino"]
    assert wheel["packageFileName"] == sdk.file and wheel["checksums"][0]["checksumValue"] == sdk.sha256
    assert purls(wheel) == [f"pkg:pypi/openvino@{sdk.version}"]
    [vendor] = [p for p in doc["packages"] if p.get("packageFileName") == "npu-driver_1.2.3_amd64.deb"]
    assert vendor["downloadLocation"] == deb.url and vendor["checksums"][0]["checksumValue"] == deb.sha256
    contains = {r["relatedSpdxElement"] for r in doc["relationships"] if r["relationshipType"] == "CONTAINS"}
    assert {wheel["SPDXID"], vendor["SPDXID"]} <= contains


@pytest.mark.engine
def test_the_vllm_image_lists_its_python_packages(tmp_path: Path) -> None:
    require_engine("podman")
    listed = subprocess.run(["podman", "image", "exists", "localhost/builder/cpu:vllm-cpu"], capture_output=True)
    if listed.returncode != 0:
        build = run_cli("build", "--flavour", "vllm", "--target", "cpu", "--engine", "podman", timeout=3600)
        assert build.returncode == 0, build.stderr[-3000:]
    out = tmp_path / "sbom.json"
    proc = run_cli("sbom", "--flavour", "vllm", "--target", "cpu", "--engine", "podman", "--out", str(out),
                   timeout=600)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    python = {p["name"].lower(): p for p in doc["packages"] if p["SPDXID"].startswith("SPDXRef-pypi-")}
    assert "vllm" in python and "torch" in python and len(python) > 50
    assert purls(python["vllm"])[0].startswith("pkg:pypi/vllm@")
    assert python["vllm"]["sourceInfo"].startswith("installed in /opt/vllm/lib/python3")
    lock = (ROOT / "recipes" / "vllm" / "cpu-cpu.lock").read_text()
    torch = python["torch"]
    pin = f"torch==={torch['versionInfo']} --hash=sha256:{torch['checksums'][0]['checksumValue']}"
    assert pin in lock  # the installed torch is the wheel its lock pinned
    image = next(p for p in doc["packages"] if p["SPDXID"] == "SPDXRef-image")
    assert python["vllm"]["versionInfo"].split("+")[0] in image["comment"]
    system = next(p for p in doc["packages"] if p.get("primaryPackagePurpose") == "OPERATING_SYSTEM")
    assert system["name"] == "debian"
