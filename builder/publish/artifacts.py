"""OCI artifacts: files pushed as a manifest with an artifactType (SBOMs, netboot sets), and netboot pull.

A netboot set is the folder `builder pxe build` writes: vmlinuz, initrd.img, root.squashfs, SHA256SUMS
and manifest.json ({"schema": 1, "target", "variant", "image", "image_digest", "kernel_version",
"files": {name: {"sha256", "size"}}}). It is pushed with one media type per file and annotations naming
the image digest; `pull` checks every byte against the manifest before anything is placed.

Written on our own registry client rather than the oras SDK: one implementation of credentials, retries
and error messages for images and artifacts alike, and no second HTTP stack to keep quiet about secrets.
"""

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.core.digests import sha256_digest, sha256_file
from builder.core.errors import BuilderError, RecipeError, RegistryError, raise_if_stopped
from builder.core.paths import inside
from builder.netboot.artifacts import check_set_manifest
from builder.registry.client import OCI_MANIFEST, RegistryClient, Repository, check_tag, parse_reference

EMPTY_CONFIG = b"{}"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
TITLE = "org.opencontainers.image.title"

NETBOOT_TYPE = "application/vnd.dev.builder.netboot.v1"
NETBOOT_FILES = {
    "vmlinuz": "application/vnd.dev.builder.netboot.kernel",
    "initrd.img": "application/vnd.dev.builder.netboot.initrd",
    "root.squashfs": "application/vnd.dev.builder.netboot.squashfs",
    "manifest.json": "application/vnd.dev.builder.netboot.manifest.v1+json",
    "SHA256SUMS": "application/vnd.dev.builder.netboot.sha256sums",
}
PAYLOAD = ("vmlinuz", "initrd.img", "root.squashfs")  # the files manifest.json describes
ANNOTATION = "dev.builder"

Content = bytes | Path


def _digest_of(content: Content) -> tuple[str, int]:
    if isinstance(content, bytes):
        return sha256_digest(content), len(content)
    return f"sha256:{sha256_file(content)}", content.stat().st_size


def push_artifact(client: RegistryClient, artifact_type: str, files: list[tuple[Content, str, str]], *,
                  annotations: dict[str, str] | None = None, subject: dict[str, Any] | None = None,
                  ) -> tuple[str, bytes]:
    """Upload (content, media type, title) files and an artifact manifest by digest; (digest, manifest)."""
    config_digest, config_size = _digest_of(EMPTY_CONFIG)
    client.push_blob(config_digest, config_size, EMPTY_CONFIG)
    layers = []
    for content, media_type, title in files:
        digest, size = _digest_of(content)
        client.push_blob(digest, size, content)
        layers.append({"mediaType": media_type, "digest": digest, "size": size, "annotations": {TITLE: title}})
    manifest: dict[str, Any] = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
        "config": {"mediaType": EMPTY_TYPE, "digest": config_digest, "size": config_size}, "layers": layers,
    }
    if subject:
        manifest["subject"] = subject
    if annotations:
        manifest["annotations"] = annotations
    data = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
    digest = client.put_manifest(sha256_digest(data), data, OCI_MANIFEST)
    return digest, data


# --- netboot sets --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NetbootSet:
    folder: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.manifest['target']}-{self.manifest['variant']}"

    @property
    def image_digest(self) -> str:
        return str(self.manifest["image_digest"])


def _parse_sums(text: str, where: str) -> dict[str, str]:
    sums = {}
    for line in text.splitlines():
        match = re.match(r"^([0-9a-f]{64}) [ *](\S+)$", line.strip())
        if not match:
            raise RegistryError(f"{where}: line {line[:80]!r} is not in sha256sum format")
        sums[match.group(2)] = match.group(1)
    return sums


def check_netboot(folder: Path, where: str | None = None, error: type[BuilderError] = RecipeError) -> NetbootSet:
    """A netboot folder whose files all match manifest.json and SHA256SUMS, else one clear error
    (`error`: RecipeError for a local folder, RegistryError for what a registry sent)."""
    where = where or str(folder)
    try:
        manifest = check_set_manifest(json.loads((folder / "manifest.json").read_text()), where, error)
    except FileNotFoundError:
        raise error(f"{where}: manifest.json is missing", "point at a folder `builder pxe build` wrote") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise error(f"{where}/manifest.json: not JSON: {str(exc)[:120]}") from None
    sums_path = folder / "SHA256SUMS"
    if not sums_path.is_file():
        raise error(f"{where}: SHA256SUMS is missing")
    try:
        sums = _parse_sums(sums_path.read_text(), f"{where}/SHA256SUMS")
    except UnicodeDecodeError:
        raise error(f"{where}/SHA256SUMS: not text") from None
    files: dict[str, dict[str, Any]] = manifest["files"]  # type: ignore[assignment]
    for name in PAYLOAD:
        entry = files[name]
        path = folder / name
        if not path.is_file():
            raise error(f"{where}: {name} is missing")
        if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise RegistryError(f"{where}/{name}: does not match manifest.json (size or sha256)",
                                "the netboot set is damaged or half-written; build it again")
        if sums.get(name) != entry["sha256"]:
            raise RegistryError(f"{where}/SHA256SUMS: {name}: disagrees with manifest.json")
    return NetbootSet(folder, manifest)


def push_netboot(folder: Path, repo: Repository) -> tuple[str, tuple[str, ...]]:
    """Push a netboot folder as one artifact; verified, then tagged. Returns (digest, tags)."""
    nb = check_netboot(folder)
    client = RegistryClient(repo, push=True)
    m = nb.manifest
    annotations = {f"{ANNOTATION}.image": str(m["image"]), f"{ANNOTATION}.image.digest": nb.image_digest,
                   f"{ANNOTATION}.target": str(m["target"]), f"{ANNOTATION}.variant": str(m["variant"]),
                   f"{ANNOTATION}.kernel-version": str(m["kernel_version"])}
    files: list[tuple[Content, str, str]] = [(folder / name, media, name) for name, media in NETBOOT_FILES.items()]
    digest, data = push_artifact(client, NETBOOT_TYPE, files, annotations=annotations)
    # the immutable tag names the image digest, the floating one target-variant
    tags = (check_tag(f"netboot-{nb.name}-{nb.image_digest.split(':')[1][:16]}"), check_tag(f"netboot-{nb.name}"))
    tag_artifact(client, "netboot", digest, data, tags[::-1])
    return digest, tags


def tag_artifact(client: RegistryClient, what: str, digest: str, data: bytes, tags: tuple[str, ...]) -> None:
    """Once the registry serves the artifact just pushed by digest: `tags` in order (the last one last: it
    existing means the rest is there), each checked."""
    repo = client.repo
    if client.manifest_digest(digest) != digest:
        raise RegistryError(f"registry {repo.host} does not serve the {what} artifact {digest} just pushed")
    for tag in tags:
        client.put_manifest(tag, data, OCI_MANIFEST)
    for tag in tags:
        if client.manifest_digest(tag) != digest:
            raise RegistryError(f"registry {repo.host}: {repo.name}:{tag} does not serve {digest}")


def _netboot_layers(data: bytes, reference: str) -> dict[str, dict[str, Any]]:
    """The artifact manifest's layers by file name; every name, type, digest and size checked first."""
    manifest = json.loads(data)  # get_manifest made sure it is a JSON object
    if manifest.get("artifactType") != NETBOOT_TYPE:
        raise RegistryError(f"{reference}: not a netboot artifact (artifactType "
                            f"{str(manifest.get('artifactType'))[:80]!r}, expected {NETBOOT_TYPE})")
    layers: dict[str, dict[str, Any]] = {}
    entries = manifest.get("layers")
    for layer in entries if isinstance(entries, list) else [None]:
        annotations = layer.get("annotations") if isinstance(layer, dict) else None
        title = annotations.get(TITLE) if isinstance(annotations, dict) else None
        if not isinstance(layer, dict) or not isinstance(title, str):
            raise RegistryError(f"{reference}: every layer needs a {TITLE} annotation naming its file")
        if title not in NETBOOT_FILES:  # an allow-list: a name from a registry never becomes a path otherwise
            raise RegistryError(f"{reference}: layer title {title[:80]!r} is not one of the netboot files",
                                f"a netboot artifact holds {', '.join(NETBOOT_FILES)}")
        if title in layers:
            raise RegistryError(f"{reference}: two layers are titled {title}")
        size = layer.get("size")
        if not re.match(r"^sha256:[0-9a-f]{64}$", str(layer.get("digest"))) or type(size) is not int or size < 0:
            raise RegistryError(f"{reference}: layer {title}: needs a sha256 digest and a size")
        if layer.get("mediaType") != NETBOOT_FILES[title]:
            raise RegistryError(f"{reference}: layer {title}: media type {str(layer.get('mediaType'))[:80]!r}, "
                                f"expected {NETBOOT_FILES[title]}")
        layers[title] = layer
    missing = [name for name in NETBOOT_FILES if name not in layers]
    if missing:
        raise RegistryError(f"{reference}: the artifact has no {', '.join(missing)}")
    return layers


def pull_netboot(reference: str, dest: Path) -> Path:
    """Fetch a netboot artifact into dest/sets/<name>-<digest>, checked file by file, then point
    dest/<target>-<variant> at it (an atomic symlink switch). Returns the set's folder."""
    repo, ref = parse_reference(reference)
    client = RegistryClient(repo)
    data, _ = client.get_manifest(ref)
    layers = _netboot_layers(data, reference)
    announced = json.loads(data).get("annotations", {})
    generations = dest / "sets"
    generations.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=generations, prefix=".pull-"))
    try:
        for name in NETBOOT_FILES:
            client.fetch_blob(layers[name]["digest"], inside(tmp, tmp / name, reference), layers[name]["size"])
        nb = check_netboot(tmp, where=reference, error=RegistryError)
        image = announced.get(f"{ANNOTATION}.image.digest") if isinstance(announced, dict) else None
        if image != nb.image_digest:
            raise RegistryError(f"{reference}: annotation names image {str(image)[:80]}, "
                                f"manifest.json {nb.image_digest}")
        final = inside(generations, generations / f"{nb.name}-{sha256_digest(data).split(':')[1][:16]}", reference)
        if final.exists():
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    link = inside(dest, dest / nb.name, reference)
    staged = dest / f".{nb.name}.link"
    staged.unlink(missing_ok=True)
    staged.symlink_to(final.relative_to(dest))
    raise_if_stopped()
    os.replace(staged, link)
    return final
