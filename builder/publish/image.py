"""Publish an image to a registry by digest, verify it there, then tag it; record it only when verified.

Order matters: blobs, the manifest by digest, a check that the registry serves that digest, the SBOM
(an artifact whose subject is the image), the floating tag, and the immutable content tag last. The
content tag existing therefore means everything before it is in place, which is why publishing is
skipped when it exists.
"""

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from builder.core.errors import RegistryError
from builder.core.paths import cache_subdir
from builder.engines import Engine
from builder.engines.cleanup import temp_dir
from builder.engines.oci import LocalImage, read_layout
from builder.pipeline.build import build
from builder.pipeline.flavour import Prepared
from builder.publish.artifacts import push_artifact
from builder.publish.sbom import MEDIA_TYPE as SBOM_TYPE
from builder.publish.sbom import read_contents, sbom_bytes
from builder.registry.client import OCI_MANIFEST, RegistryClient, Repository, check_tag


@dataclass(frozen=True)
class Published:
    repository: str
    digest: str
    tags: tuple[str, ...]
    pushed: bool  # False: the content tag was already there, nothing was built or sent
    built: bool
    sbom: str | None
    seconds: float

    @property
    def reference(self) -> str:
        return f"{self.repository}@{self.digest}"


def verify(client: RegistryClient, ref: str, digest: str) -> None:
    served = client.manifest_digest(ref)
    if served != digest:
        raise RegistryError(f"registry {client.repo.host}: {client.repo.name}:{ref} serves {served}, "
                            f"but {digest} was pushed", "nothing was recorded as published; run it again")


SbomMaker = Callable[[str], bytes]  # image digest -> SBOM document


def push_image(engine: Engine, local_ref: str, client: RegistryClient, tags: list[str],
               sbom: SbomMaker | None = None) -> tuple[str, str | None]:
    """Push by digest, verify, attach the SBOM, then tag (the last tag last). Returns (digest, SBOM ref)."""
    with temp_dir(cache_subdir("oci")) as tmp:
        engine.export_oci(local_ref, tmp)
        image = read_layout(tmp)
        document = sbom(image.digest) if sbom else None  # before anything is sent: it may fail
        for blob in image.blobs:
            client.push_blob(blob.digest, blob.size, blob.path)
        client.put_manifest(image.digest, image.manifest, image.media_type)
        verify(client, image.digest, image.digest)
        attached = _attach_sbom(client, image, document) if document is not None else None
        for tag in tags:
            client.put_manifest(tag, image.manifest, image.media_type)
        for tag in tags:
            verify(client, tag, image.digest)
    return image.digest, attached


def _attach_sbom(client: RegistryClient, image: LocalImage, document: bytes) -> str:
    """The SBOM as an artifact whose subject is the image, also tagged sha256-<hex>.sbom for registries
    without the referrers API (Debian's distribution 2.8 has none)."""
    subject = {"mediaType": image.media_type, "digest": image.digest, "size": len(image.manifest)}
    digest, manifest = push_artifact(client, SBOM_TYPE, [(document, SBOM_TYPE, "sbom.spdx.json")], subject=subject)
    tag = image.digest.replace(":", "-") + ".sbom"
    client.put_manifest(tag, manifest, OCI_MANIFEST)
    verify(client, tag, digest)
    return f"{client.repo}:{tag}"


def record(result: Published, prep: Prepared) -> Path:
    """Append to the local record of publications; called only after the registry verified the digest."""
    path = cache_subdir("published") / "published.jsonl"
    doc = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "target": prep.plan.target,
           "variant": prep.plan.variant, "flavour": prep.flavour.name, "repository": result.repository,
           "digest": result.digest, "tags": list(result.tags), "sbom": result.sbom,
           "revision": prep.plan.labels["org.opencontainers.image.revision"]}
    with open(path, "a") as f:
        f.write(json.dumps(doc, sort_keys=True) + "\n")
    return path


def publish(prep: Prepared, engine: Engine, repo: Repository, *, sbom: bool = True) -> Published:
    """Build if needed and publish one image; nothing is built or sent when the content tag exists.

    The inputs must agree with builder.lock, and the image must have locked inputs (the flavour's rules)."""
    started = time.monotonic()
    prep.flavour.check(prep, prep.lock, strict=True)
    client = RegistryClient(repo, push=True)
    floating, immutable = (check_tag(tag) for tag in prep.flavour.publish_tags(prep))
    existing = client.manifest_digest(immutable)
    if existing is not None:
        return Published(str(repo), existing, (immutable,), False, False, None, time.monotonic() - started)
    built = build(prep, engine)

    def sbom_document(digest: str) -> bytes:
        return sbom_bytes(prep.flavour.sbom(prep, f"{repo}:{immutable}", digest, read_contents(engine, built.ref)))
    digest, attached = push_image(engine, built.ref, client, [floating, immutable],
                                  sbom_document if sbom else None)
    result = Published(str(repo), digest, (floating, immutable), True, built.built, attached,
                       time.monotonic() - started)
    record(result, prep)
    return result
