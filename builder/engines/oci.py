"""OCI image layouts on disk: read one image from a layout, and make one from `docker save` output.

Engines write the image they hold as an OCI layout (podman directly, docker through its save archive);
publishing reads the manifest and blobs from there. The manifest's digest is known before anything is
sent, so the image can be pushed by digest and tagged only after the registry agrees.
"""

import gzip
import json
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from builder.core.digests import sha256_digest, sha256_file
from builder.core.errors import EngineError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    media_type: str
    path: Path


@dataclass(frozen=True)
class LocalImage:
    """One image manifest with the blobs it names, all on disk."""

    manifest: bytes
    media_type: str
    digest: str
    config: Blob
    layers: tuple[Blob, ...]

    @property
    def blobs(self) -> tuple[Blob, ...]:
        return (self.config, *self.layers)


def _blob_path(root: Path, digest: str) -> Path:
    algo, _, hexpart = digest.partition(":")
    return root / "blobs" / algo / hexpart


def _write_blob(root: Path, data: bytes) -> tuple[str, int]:
    digest = sha256_digest(data)
    path = _blob_path(root, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest, len(data)


def _gzip_blob(root: Path, source: Path) -> tuple[str, int]:
    """Compress a layer tar into a new blob (mtime 0, so the same layer gives the same digest)."""
    tmp = root / "blobs" / ".gzip.tmp"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as src, open(tmp, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0, filename="") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    digest = "sha256:" + sha256_file(tmp)
    final = _blob_path(root, digest)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)
    return digest, final.stat().st_size


def read_layout(root: Path) -> LocalImage:
    """The single image manifest of an OCI layout, with uncompressed layers gzip-compressed first."""
    try:
        index = json.loads((root / "index.json").read_text())
        descriptor = index["manifests"][0]
        manifest = json.loads(_blob_path(root, descriptor["digest"]).read_bytes())
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise EngineError(f"{root}: not an OCI layout with an image: {exc}") from None
    changed = False
    for layer in manifest["layers"]:
        if layer["mediaType"] in (LAYER_TAR, DOCKER_LAYER_TAR):
            layer["digest"], layer["size"] = _gzip_blob(root, _blob_path(root, layer["digest"]))
            layer["mediaType"] = LAYER_GZIP
            changed = True
    # Unchanged manifests keep their exact bytes: those are what the digest names.
    data = json.dumps(manifest, separators=(",", ":")).encode() if changed else \
        _blob_path(root, descriptor["digest"]).read_bytes()
    media_type = manifest.get("mediaType") or descriptor.get("mediaType") or OCI_MANIFEST

    def blob(d: dict[str, object]) -> Blob:
        digest = str(d["digest"])
        return Blob(digest, int(str(d["size"])), str(d["mediaType"]), _blob_path(root, digest))

    return LocalImage(data, media_type, sha256_digest(data), blob(manifest["config"]),
                      tuple(blob(layer) for layer in manifest["layers"]))


def layout_from_docker_archive(archive: Path, root: Path) -> None:
    """Turn `docker save` output into an OCI layout: newer dockers write one already, older ones
    (Debian's 20.10) write manifest.json with <id>.json and <layer>/layer.tar, converted here."""
    extracted = root / ".archive"
    with tarfile.open(archive) as tar:
        tar.extractall(extracted, filter="data")
    if (extracted / "index.json").is_file() and (extracted / "oci-layout").is_file():
        for name in ("index.json", "oci-layout", "blobs"):
            os.replace(extracted / name, root / name)
        shutil.rmtree(extracted)
        return
    try:
        entry = json.loads((extracted / "manifest.json").read_text())[0]
        config = (extracted / entry["Config"]).read_bytes()
        layer_paths = [extracted / layer for layer in entry["Layers"]]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise EngineError(f"{archive}: not a docker image archive: {exc}") from None
    config_digest, config_size = _write_blob(root, config)
    layers = []
    for path in layer_paths:
        digest, size = _gzip_blob(root, path)
        layers.append({"mediaType": LAYER_GZIP, "digest": digest, "size": size})
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
                "layers": layers}
    digest, size = _write_blob(root, json.dumps(manifest, separators=(",", ":")).encode())
    index = {"schemaVersion": 2, "manifests": [{"mediaType": OCI_MANIFEST, "digest": digest, "size": size}]}
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    shutil.rmtree(extracted)
