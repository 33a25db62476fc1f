"""`builder pin`: placeholder pins read from a real registry and a web server on 127.0.0.1 and written into
the recipe text, all or nothing."""

import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from registry import start_registry

from builder.registry.client import RegistryClient, Repository
from conftest import run_cli_inproc

ZEROS = "0" * 64
RECIPE = """\
# A vendor recipe whose pins were never read (comments must survive `builder pin`).
target: intel-arc
variants:
  sycl:
    base:
      toolchain:
        kind: image
        ref: {registry}/vendor/dle:2025.3@sha256:{zeros}   # the vendor's SDK image
        repositories:
          - &vendor
            name: vendor
            url: http://{web}/apt
            suite: stable
            key_url: http://{web}/key.gpg
            key_sha256: "{zeros}"
        packages: [cmake]
      runtime:
        kind: image
        ref: {registry}/vendor/dle:2025.3@sha256:{zeros}
        repositories: [*vendor]
        debs:
          - url: http://{web}/a_1.0_amd64.deb
            sha256: "{zeros}"
          - url: http://{web}/b_2.0_amd64.deb
            sha256: "{zeros}"  # second file
"""


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "web"
    root.mkdir()
    for name, data in {"key.gpg": b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n", "a_1.0_amd64.deb": b"!<arch>\na",
                       "b_2.0_amd64.deb": b"!<arch>\nb"}.items():
        (root / name).write_bytes(data)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    """A registry holding one small image, vendor/dle:2025.3."""
    with start_registry(tmp_path / "registry") as reg:
        client = RegistryClient(Repository(reg.host, "vendor/dle"), push=True)
        config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
        digest = "sha256:" + hashlib.sha256(config).hexdigest()
        client.push_blob(digest, len(config), config)
        manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                          "digest": digest, "size": len(config)},
                               "layers": []}).encode()
        client.put_manifest("2025.3", manifest, "application/vnd.oci.image.manifest.v1+json")
        yield reg.host


def write_recipe(tmp_path: Path, registry: str, web: str) -> Path:
    path = tmp_path / "vendor.yaml"
    path.write_text(RECIPE.format(registry=registry, web=web, zeros=ZEROS))
    return path


def test_pin_reads_every_placeholder_and_edits_only_them(tmp_path: Path, registry: str,
                                                         web: tuple[str, Path]) -> None:
    host, files = web
    path = write_recipe(tmp_path, registry, host)
    before = path.read_text()
    refused = run_cli_inproc("build", "--recipe", str(path))
    assert refused.returncode == 2 and "placeholder pin (all zeros)" in refused.stderr
    assert "`builder pin --target intel-arc`" in refused.stderr

    dry = run_cli_inproc("pin", "--recipe", str(path), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert path.read_text() == before and "--dry-run" in dry.stdout
    assert dry.stdout.count(" -> sha256:") == 4  # the image (used twice), the key (shared by an alias), two debs

    done = run_cli_inproc("pin", "--recipe", str(path))
    assert done.returncode == 0, done.stderr
    image = RegistryClient(Repository(registry, "vendor/dle")).manifest_digest("2025.3")
    sha = {name: hashlib.sha256((files / name).read_bytes()).hexdigest()
           for name in ("key.gpg", "a_1.0_amd64.deb", "b_2.0_amd64.deb")}
    expected = before.replace(f"dle:2025.3@sha256:{ZEROS}", f"dle:2025.3@{image}")
    for name in ("key.gpg", "a_1.0_amd64.deb", "b_2.0_amd64.deb"):
        expected = expected.replace(ZEROS, sha[name], 1)  # in file order: key, a, b
    assert path.read_text() == expected
    assert "# the vendor's SDK image" in expected and "# second file" in expected
    line = f"variants.sycl.base.runtime.debs[1].sha256: http://{host}/b_2.0_amd64.deb -> sha256:"
    assert line + sha["b_2.0_amd64.deb"] in done.stdout
    again = run_cli_inproc("pin", "--recipe", str(path))
    assert again.returncode == 0 and "no placeholder pins" in again.stdout


@pytest.mark.parametrize("broken", ["deb", "tag"])
def test_pin_writes_nothing_when_one_value_cannot_be_read(tmp_path: Path, registry: str,
                                                          web: tuple[str, Path], broken: str) -> None:
    host, files = web
    path = write_recipe(tmp_path, registry, host)
    if broken == "deb":
        (files / "b_2.0_amd64.deb").unlink()
        message = f"error: could not download http://{host}/b_2.0_amd64.deb: the server answered 404"
    else:
        path.write_text(path.read_text().replace("dle:2025.3@", "dle:2099.1@"))
        message = f"error: {registry}/vendor/dle:2099.1: the registry has no such tag"
    before = path.read_text()
    proc = run_cli_inproc("pin", "--recipe", str(path))
    assert proc.returncode != 0 and proc.stderr.splitlines()[0] == message, proc.stderr
    assert "Traceback" not in proc.stderr
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_docker_hub_references_reach_its_registry_host() -> None:
    assert Repository("docker.io", "library/ubuntu").base_url == "https://registry-1.docker.io/v2/library/ubuntu"
    assert Repository("quay.io", "a/b").base_url == "https://quay.io/v2/a/b"
