"""Models in an OCI registry, in the CNCF ModelPack layout: `builder model push` and `builder model pull`.

The layout (a config blob, one raw layer per file annotated with its path, the model's sha256 as an annotation),
and the order of a push (by digest, checked, tagged last) and a pull (the model's sha256 known from the layers
before a byte is fetched, every blob checked, one rename into DIR/<sha256>[.gguf]): docs/publishing.md.
"""

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from builder.cluster.hfmodel import hash_lines, scan
from builder.core.digests import sha256_digest, sha256_file
from builder.core.errors import RecipeError, RegistryError, raise_if_stopped
from builder.core.paths import inside
from builder.publish.artifacts import tag_artifact
from builder.registry.client import OCI_MANIFEST, RegistryClient, Repository, at, check_tag, parse_reference

MANIFEST_TYPE = "application/vnd.cncf.model.manifest.v1+json"  # the artifactType
CONFIG_TYPE = "application/vnd.cncf.model.config.v1+json"
WEIGHT = "application/vnd.cncf.model.weight.v1.raw"
WEIGHT_CONFIG = "application/vnd.cncf.model.weight.config.v1.raw"
DOC = "application/vnd.cncf.model.doc.v1.raw"
CODE = "application/vnd.cncf.model.code.v1.raw"
LAYER_TYPES = (WEIGHT, WEIGHT_CONFIG, DOC, CODE)
FILEPATH = "org.cncf.model.filepath"
TITLE = "org.opencontainers.image.title"
MODEL_SHA256 = "dev.builder.model.sha256"
GGUF_MAGIC = b"GGUF"

MAX_CONFIG = 1 << 20  # a ModelPack config is a few hundred bytes; a registry offering more is refused
MAX_LAYERS = 4096  # files in one model; a large sharded model has a few hundred
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".msgpack", ".h5", ".npz")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")


def check_sha256(value: str, option: str = "--sha256") -> str:
    text = value.removeprefix("sha256:").lower()
    if not _SHA256.fullmatch(text):
        raise RecipeError(f"{option} {value[:80]!r}: not a sha256", "64 hex digits (sha256sum prints them)")
    return text


def media_type(relative: str) -> str:
    """The ModelPack layer type of a file of a Hugging Face folder, by its name."""
    name = PurePosixPath(relative).name.lower()
    if name.endswith(WEIGHT_SUFFIXES):
        return WEIGHT
    if name.startswith(("readme", "license", "licence", "notice", "use_policy")) or name.endswith(".md"):
        return DOC
    if name.endswith(".py"):
        return CODE
    return WEIGHT_CONFIG  # config.json, generation_config.json, tokenizer files, chat templates, vocabularies


# --- push ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pushed:
    repository: str
    digest: str  # the manifest's
    sha256: str  # the model's
    folder: bool
    tags: tuple[str, ...]
    size: int


def parse_target(text: str) -> tuple[Repository, str | None]:
    """--registry HOST/REPO[:TAG]."""
    last = text.rsplit("/", 1)[-1]
    if "/" in text and ":" in last:
        repo, tag = parse_reference(text)
        return repo, check_tag(tag)
    return Repository.parse(text), None


def _gguf_layers(path: Path, where: str) -> tuple[str, list[tuple[Path, str, str, str]]]:
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise RecipeError(f"{where}: not a GGUF file (it does not start with the GGUF magic)",
                              "give a .gguf model, or a Hugging Face model folder")
    sha = sha256_file(path)
    return sha, [(path, WEIGHT, path.name, sha)]


def _folder_layers(folder: Path, where: str) -> tuple[str, list[tuple[Path, str, str, str]]]:
    files = scan(folder, where).files
    if len(files) > MAX_LAYERS:
        raise RecipeError(f"{where}: {len(files)} files, more than the {MAX_LAYERS} a model may have")
    layers = []
    for relative, _ in files:
        raise_if_stopped()
        layers.append((folder / relative, media_type(relative), relative, sha256_file(folder / relative)))
    return hash_lines([(relative, sha) for _, _, relative, sha in layers]), layers


def model_config(name: str, fmt: str, digests: list[str]) -> bytes:
    doc = {"descriptor": {"name": name}, "config": {"format": fmt},
           "modelfs": {"type": "layers", "diffIds": digests}}  # raw layers: a diffId is the layer's digest
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def push_model(source: Path, target: str, expected: str | None = None) -> Pushed:
    """Push a GGUF file or a Hugging Face folder as a ModelPack artifact: blobs, config and manifest by digest,
    checked, then tagged (the user's tag, then `sha256-<model sha256>`)."""
    repo, tag = parse_target(target)
    where = str(source)
    folder = source.is_dir()
    sha, layers = _folder_layers(source, where) if folder else _gguf_layers(source, where)
    if expected is not None and sha != expected:
        raise RecipeError(f"{where}: its sha256 is {sha}, not the {expected} given with --sha256",
                          "the model changed or --sha256 is wrong: check which; nothing was pushed")
    client = RegistryClient(repo, push=True)
    descriptors: list[dict[str, Any]] = []
    total = 0
    for path, kind, relative, digest in layers:
        raise_if_stopped()
        size = path.stat().st_size
        client.push_blob(f"sha256:{digest}", size, path)
        total += size
        descriptors.append({"mediaType": kind, "digest": f"sha256:{digest}", "size": size,
                            "annotations": {FILEPATH: relative, TITLE: relative}})
    config = model_config(source.resolve().name, "safetensors" if folder else "gguf",
                          [f"sha256:{digest}" for _, _, _, digest in layers])
    client.push_blob(sha256_digest(config), len(config), config)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": MANIFEST_TYPE,
                "config": {"mediaType": CONFIG_TYPE, "digest": sha256_digest(config), "size": len(config)},
                "layers": descriptors, "annotations": {MODEL_SHA256: sha}}
    data = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
    digest = client.put_manifest(sha256_digest(data), data, OCI_MANIFEST)
    tags = tuple(t for t in (tag, f"sha256-{sha}") if t)  # the content tag last
    raise_if_stopped()
    tag_artifact(client, "model", digest, data, tags)
    return Pushed(str(repo), digest, sha, folder, tags, total)


# --- pull ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layer:
    path: str  # relative, checked
    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class Pulled:
    reference: str
    digest: str
    sha256: str
    folder: bool
    path: Path
    fetched: bool  # False when DIR already held it under its sha256


def _file_path(value: object, where: str) -> str:
    """A layer's path in the model: relative, `/`-separated, no `..`, nothing a shell or sha256sum escapes."""
    if not isinstance(value, str) or not value:
        raise RegistryError(f"{where}: every layer needs a {FILEPATH} annotation naming its file",
                            "the artifact is not a ModelPack model")
    parts = value.split("/")
    if (value.startswith("/") or "\\" in value or any(p in ("", ".", "..") for p in parts)
            or not value.isprintable() or len(value) > 1024):
        raise RegistryError(f"{where}: layer path {value[:80]!r} is not a plain relative path",
                            "refused: a registry names files only inside the model; nothing was placed")
    return value


def model_layers(data: bytes, where: str) -> tuple[dict[str, Any], list[Layer]]:
    """The manifest's config descriptor and layers, every type, digest, size and path checked first."""
    manifest = json.loads(data)  # get_manifest made sure it is a JSON object
    config = manifest.get("config")
    artifact = manifest.get("artifactType")
    if not isinstance(config, dict) or config.get("mediaType") != CONFIG_TYPE or \
            artifact not in (None, MANIFEST_TYPE):
        found = artifact or (config.get("mediaType") if isinstance(config, dict) else None)
        raise RegistryError(f"{where}: not a ModelPack model (artifact type {str(found)[:80]!r})",
                            f"expected {MANIFEST_TYPE} with a {CONFIG_TYPE} config")
    size = config.get("size")
    if not _DIGEST.fullmatch(str(config.get("digest"))) or type(size) is not int or not 0 <= size <= MAX_CONFIG:
        raise RegistryError(f"{where}: the config needs a sha256 digest and a size of at most {MAX_CONFIG} bytes")
    entries = manifest.get("layers")
    if not isinstance(entries, list) or not entries or len(entries) > MAX_LAYERS:
        raise RegistryError(f"{where}: a model has 1 to {MAX_LAYERS} layers")
    layers: list[Layer] = []
    seen: set[str] = set()
    folders: set[str] = set()
    for entry in entries:
        if not isinstance(entry, dict):
            raise RegistryError(f"{where}: a layer is not an object")
        notes = entry.get("annotations")
        notes = notes if isinstance(notes, dict) else {}
        path = _file_path(notes.get(FILEPATH, notes.get(TITLE)), where)
        kind = entry.get("mediaType")
        if kind not in LAYER_TYPES:
            raise RegistryError(f"{where}: layer {path}: media type {str(kind)[:80]!r} is not a raw ModelPack file",
                                f"builder pulls layers of {', '.join(LAYER_TYPES)}")
        length = entry.get("size")
        if not _DIGEST.fullmatch(str(entry.get("digest"))) or type(length) is not int or length < 0:
            raise RegistryError(f"{where}: layer {path}: needs a sha256 digest and a size")
        folded = path.lower()  # case-insensitive file systems would merge names that differ in case
        parents = {"/".join(folded.split("/")[:n]) for n in range(1, folded.count("/") + 1)}
        if folded in seen or folded in folders or parents & seen:
            raise RegistryError(f"{where}: layer path {path} clashes with another layer's")
        seen.add(folded)
        folders |= parents
        layers.append(Layer(path, str(entry["digest"]), length, str(kind)))
    return config, layers


def model_identity(layers: list[Layer], where: str) -> tuple[str, bool]:
    """(the model's sha256, folder?) from the layers: a lone .gguf weight is a GGUF, a folder has config.json."""
    if any(layer.path == "config.json" for layer in layers):
        return hash_lines([(layer.path, layer.digest.split(":")[1]) for layer in layers]), True
    if len(layers) == 1 and layers[0].media_type == WEIGHT and layers[0].path.lower().endswith(".gguf"):
        return layers[0].digest.split(":")[1], False
    raise RegistryError(f"{where}: neither one GGUF weight nor a Hugging Face folder (no config.json)",
                        "builder pulls models that `builder model push` can push")


def pull_model(reference: str, dest: Path, expected: str | None = None) -> Pulled:
    """Fetch a model artifact into `dest`, named by its sha256; every blob checked; placed with one rename."""
    repo, ref = parse_reference(reference)
    where = at(repo, ref)
    client = RegistryClient(repo)
    data, _ = client.get_manifest(ref)
    config, layers = model_layers(data, where)
    sha, folder = model_identity(layers, where)
    notes = json.loads(data).get("annotations")
    recorded = notes.get(MODEL_SHA256) if isinstance(notes, dict) else None
    if recorded is not None and recorded != sha:
        raise RegistryError(f"{where}: its {MODEL_SHA256} annotation says {str(recorded)[:80]}, its layers make "
                            f"{sha}", "the artifact is inconsistent; nothing was placed")
    if expected is not None and sha != expected:
        raise RegistryError(f"{where}: the model's sha256 is {sha}, not the {expected} given with --sha256",
                            "the tag points at another model, or --sha256 is wrong: check which; nothing was placed")
    digest = sha256_digest(data)
    final = inside(dest, dest / (sha if folder else f"{sha}.gguf"), where)
    if final.exists():
        return Pulled(reference, digest, sha, folder, final, False)
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".pull-"))
    try:
        client.fetch_blob(str(config["digest"]), tmp / ".config", int(config["size"]))
        _check_config(tmp / ".config", layers, where)
        files = tmp / "model"
        for layer in layers:
            raise_if_stopped()
            path = inside(files, files / layer.path, where)
            path.parent.mkdir(parents=True, exist_ok=True)
            client.fetch_blob(layer.digest, path, layer.size)
            if path.stat().st_size != layer.size:
                raise RegistryError(f"{where}: layer {layer.path} is {path.stat().st_size} bytes, its manifest "
                                    f"says {layer.size}", "nothing was placed")
        placed = files if folder else files / layers[0].path
        if not folder:
            with open(placed, "rb") as f:
                if f.read(4) != GGUF_MAGIC:
                    raise RegistryError(f"{where}: {layers[0].path} is not a GGUF file (no GGUF magic)",
                                        "nothing was placed")
        for path in [placed, *placed.rglob("*")] if folder else [placed]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        raise_if_stopped()
        os.rename(placed, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Pulled(reference, digest, sha, folder, final, True)


def _check_config(path: Path, layers: list[Layer], where: str) -> None:
    """The config is JSON whose modelfs lists the layers' digests, in order."""
    try:
        doc = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError):
        doc = None
    modelfs = doc.get("modelfs") if isinstance(doc, dict) else None
    ids = modelfs.get("diffIds") if isinstance(modelfs, dict) else None
    if ids is not None and ids != [layer.digest for layer in layers]:
        raise RegistryError(f"{where}: the config's modelfs.diffIds disagree with the manifest's layers",
                            "the artifact is inconsistent; nothing was placed")
    if not isinstance(doc, dict):
        raise RegistryError(f"{where}: the model config is not a JSON object")


def leftovers(dest: Path) -> list[Path]:
    """What a killed pull left in `dest` (removed by the next pull, under its lock)."""
    return sorted(dest.glob(".pull-*"))
