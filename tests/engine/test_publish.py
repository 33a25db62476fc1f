"""Publishing the cpu image to a real registry (Debian's docker-registry on 127.0.0.1) with podman.

Push -> pull back -> digests equal; the content tag makes a second publish a no-op; credentials come from
the standard auth file and never show in output; a registry that answers 500, refuses credentials or goes
away mid-push gives one clear error after bounded retries, and nothing is tagged or recorded as published.
"""

import base64
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from registry import Proxy, Registry, start_registry

from builder.core.paths import cache_dir
from builder.registry.client import ATTEMPTS
from conftest import require_engine, run_cli

pytestmark = pytest.mark.engine

PUBLISHED = cache_dir() / "published" / "published.jsonl"
USER, PASSWORD = "ci-user", "s3cret-Pa55-word"


@pytest.fixture(scope="module", autouse=True)
def _podman_and_image() -> None:
    require_engine("podman")
    proc = run_cli("build", "--target", "cpu", "--engine", "podman", "--json", timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with start_registry(tmp_path) as reg:
        yield reg


def records(host: str) -> list[dict[str, object]]:
    if not PUBLISHED.is_file():
        return []
    lines = [json.loads(line) for line in PUBLISHED.read_text().splitlines() if line.strip()]
    return [r for r in lines if str(r["repository"]).startswith(host + "/")]


def publish(host: str, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli("publish", "--target", "cpu", "--engine", "podman", "--registry", f"{host}/builder", "--json",
                   *extra, env=env, timeout=600)


def auth_file(tmp_path: Path, host: str, user: str, password: str) -> dict[str, str]:
    path = tmp_path / "auth.json"
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": token}}}))
    return {"REGISTRY_AUTH_FILE": str(path)}


def test_push_pull_back_digests_equal_and_second_publish_is_a_noop(registry: Registry, tmp_path: Path) -> None:
    proc = publish(registry.host)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    digest = doc["digest"]
    assert doc["pushed"] is True
    floating, immutable = doc["tags"]
    assert floating == "cpu-cpu"
    assert immutable.startswith("cpu-cpu-llama0.3.36-") and len(immutable.rsplit("-", 1)[1]) == 16
    # The registry itself (read without builder's client) serves the pushed digest under both tags.
    assert registry.digest("builder", floating) == digest
    assert registry.digest("builder", immutable) == digest

    # Pull it back with podman: the same manifest digest and the same image (config) as the local one.
    pulled = f"{registry.host}/builder:{immutable}"
    subprocess.run(["podman", "pull", "--tls-verify=false", "-q", pulled], check=True, capture_output=True)
    try:
        out = subprocess.run(["podman", "image", "inspect", pulled], check=True, capture_output=True, text=True)
        info = json.loads(out.stdout)[0]
        local = json.loads(subprocess.run(["podman", "image", "inspect", "localhost/builder/cpu:cpu"], check=True,
                                          capture_output=True, text=True).stdout)[0]
        assert f"{registry.host}/builder@{digest}" in info["RepoDigests"]
        assert info["Id"] == local["Id"]
    finally:
        subprocess.run(["podman", "rmi", pulled], capture_output=True)  # untags only: the image has other names

    [record] = records(registry.host)
    assert record["digest"] == digest and record["tags"] == [floating, immutable]

    again = publish(registry.host)
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads(again.stdout)
    assert second["pushed"] is False and second["built"] is False and second["digest"] == digest
    assert len(records(registry.host)) == 1


def test_sbom_is_attached_to_the_image(registry: Registry) -> None:
    proc = publish(registry.host)
    assert proc.returncode == 0, proc.stderr[-3000:]
    digest = json.loads(proc.stdout)["digest"]
    tag = digest.replace(":", "-") + ".sbom"
    manifest = requests.get(registry.url(f"builder/manifests/{tag}"),
                            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}, timeout=10).json()
    assert manifest["artifactType"] == "application/spdx+json"
    assert manifest["subject"]["digest"] == digest
    [layer] = manifest["layers"]
    sbom = requests.get(registry.url(f"builder/blobs/{layer['digest']}"), timeout=10).json()
    assert sbom["spdxVersion"] == "SPDX-2.3"
    names = {p["name"]: p for p in sbom["packages"]}
    # From the image's own dpkg database: the runtime base's packages with their versions.
    assert names["libgomp1"]["versionInfo"] and names["libc6"]["versionInfo"]
    assert names["llama.cpp"]["versionInfo"] == "0.3.36"
    assert names["llama.cpp"]["checksums"][0]["checksumValue"].startswith("832db069")
    image = next(p for p in sbom["packages"] if p["SPDXID"] == "SPDXRef-image")
    assert image["versionInfo"] == digest
    assert "build-essential" not in names  # the toolchain stage is not shipped


def test_htpasswd_registry_needs_the_right_credentials(tmp_path: Path) -> None:
    with start_registry(tmp_path / "reg", auth=(USER, PASSWORD)) as registry:
        empty = {"REGISTRY_AUTH_FILE": str(tmp_path / "none.json"), "DOCKER_CONFIG": str(tmp_path / "nodocker"),
                 "XDG_RUNTIME_DIR": str(tmp_path / "run"), "XDG_CONFIG_HOME": str(tmp_path / "config")}
        anonymous = publish(registry.host, env=empty)
        assert anonymous.returncode == 1
        assert "needs credentials" in anonymous.stderr and "podman login" in anonymous.stderr
        assert "Traceback" not in anonymous.stderr

        wrong = publish(registry.host, env={**empty, **auth_file(tmp_path, registry.host, USER, "not-it")})
        assert wrong.returncode == 1
        assert "refused the credentials" in wrong.stderr and USER in wrong.stderr
        assert "not-it" not in wrong.stdout + wrong.stderr

        env = {**empty, **auth_file(tmp_path, registry.host, USER, PASSWORD)}
        good = run_cli("--debug", "publish", "--target", "cpu", "--engine", "podman", "--registry",
                       f"{registry.host}/builder", "--json", env=env, timeout=600)
        assert good.returncode == 0, good.stderr[-3000:]
        digest = json.loads(good.stdout[good.stdout.index("{"):])["digest"]
        assert registry.digest("builder", "cpu-cpu") == digest
        output = good.stdout + good.stderr
        assert PASSWORD not in output and base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode() not in output
        assert records(registry.host)[-1]["digest"] == digest
    assert not records(registry.host)[:-1]  # the refused attempts recorded nothing


def test_registry_500_is_retried_a_bounded_number_of_times_and_nothing_is_tagged(registry: Registry) -> None:
    proxy = Proxy(registry.host, fault=lambda method, path, _: "500" if method == "PUT" and "/manifests/" in path
                  else None)
    try:
        proc = publish(proxy.host)
    finally:
        proxy.close()
    assert proc.returncode == 1
    assert "500 Internal Server Error" in proc.stderr and f"failed after {ATTEMPTS} attempts" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len([s for s in proxy.seen if s[2] == "500"]) == ATTEMPTS
    assert registry.tags("builder") == []
    assert records(proxy.host) == []


def test_a_transient_500_is_retried_and_the_publish_succeeds(registry: Registry) -> None:
    failed: list[str] = []

    def once(method: str, path: str, length: int) -> str | None:
        if method == "PUT" and "/blobs/uploads/" in path and not failed:
            failed.append(path)
            return "500"
        return None
    proxy = Proxy(registry.host, fault=once)
    try:
        proc = publish(proxy.host)
    finally:
        proxy.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert failed and registry.digest("builder", "cpu-cpu") == json.loads(proc.stdout)["digest"]


def test_registry_stopped_mid_push_gives_a_clear_error_and_records_nothing(registry: Registry) -> None:
    # Cut the connection inside the first large layer upload, and stop the registry at that moment.
    proxy = Proxy(registry.host, on_cut=registry.stop,
                  fault=lambda method, path, length: "cut" if method == "PUT" and length > 1 << 20 else None)
    try:
        proc = publish(proxy.host)
    finally:
        proxy.close()
    assert proc.returncode == 1
    assert f"failed after {ATTEMPTS} attempts" in proc.stderr and "uploading blob" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert records(proxy.host) == []
    assert [s for s in proxy.seen if s[2].startswith("cut")][0][2].startswith("cut after ")
    tags = registry.root / "storage" / "docker" / "registry" / "v2" / "repositories" / "builder" / "_manifests"
    assert not (tags / "tags").exists()


def test_docker_push_pull_back_gives_the_same_image(registry: Registry) -> None:
    require_engine("docker")
    built = run_cli("build", "--target", "cpu", "--engine", "docker", "--json", timeout=3600)
    assert built.returncode == 0, built.stderr[-3000:]
    local_id = json.loads(built.stdout)["digest"]
    proc = run_cli("publish", "--target", "cpu", "--engine", "docker", "--registry", f"{registry.host}/builder",
                   "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    digest = json.loads(proc.stdout)["digest"]
    assert registry.digest("builder", "cpu-cpu") == digest
    pulled = f"{registry.host}/builder:cpu-cpu"
    subprocess.run(["docker", "pull", "-q", pulled], check=True, capture_output=True)
    try:
        info = json.loads(subprocess.run(["docker", "image", "inspect", pulled], check=True, capture_output=True,
                                         text=True).stdout)[0]
        assert info["Id"] == local_id and f"{registry.host}/builder@{digest}" in info["RepoDigests"]
    finally:
        subprocess.run(["docker", "rmi", pulled], capture_output=True)
