"""A generation's bill of materials (bom.json) and what changed between two generations (`pxe diff`).

`pxe publish` writes bom.json with the generation's other files, so it is part of the generation's content hash
and switches with it in the same rename. It records, per netboot set, the image, llama.cpp commit, ggml RPC
protocol, root, kernel and initrd sha256 and the kernel version; per service with a server on a netbooted node,
its model (the sha256 the cluster file gives, the blob the nodes fetch, where it came from, its revision where
known); per node its MAC, set, and the sha256 of its boot script, plan and firewall; and the sha256 of the
cluster file and of its gateway settings. HAProxy's config itself is rendered by `builder cluster up`, from the
same cluster file, with the control node's own paths and key: publish records the settings it comes from.

pxe-root/ is a folder others may write: bom.json is checked field by field when read back. A generation
published before bom.json existed still diffs: by its nodes.json and the files under nodes/.
"""

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from builder.core.errors import RecipeError
from builder.netboot.artifacts import check_set_manifest
from builder.recipe.load import display_path, format_validation_error

BOM = "bom.json"
Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"  # a node, service or netboot set
Name = Annotated[str, Field(pattern=f"^{_NAME}$")]
Word = Annotated[str, Field(pattern=r"^[A-Za-z0-9_+~][A-Za-z0-9._+~:-]{0,127}$")]
# one line of printable text: a model's source or revision as publish recorded it
Text = Annotated[str, Field(pattern=r"^[^\x00-\x1f\x7f]{1,2000}$")]
Version = Annotated[str, Field(pattern=r"^([A-Za-z0-9_+~][A-Za-z0-9._+~:-]{0,127})?$")]
Mac = Annotated[str, Field(pattern=r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SetEntry(_Strict):
    image: Annotated[str, Field(pattern=r"^[\x21-\x7e]{1,512}$")]
    image_digest: Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]
    llama_cpp_commit: Annotated[str, Field(pattern=r"^[0-9a-f]{7,40}$")] | None = None
    ggml_rpc_protocol: Annotated[str, Field(pattern=r"^[0-9]{1,4}\.[0-9]{1,4}\.[0-9]{1,4}$")] | None = None
    root_sha256: Hex
    kernel_sha256: Hex
    initrd_sha256: Hex
    kernel_version: Word
    kernel_packages: dict[Word, Version] = {}  # "" where the set recorded no pinned version


class ModelEntry(_Strict):
    engine: Literal["llama.cpp", "vllm"]
    sha256: Hex  # as the cluster file gives it: a GGUF's sha256, a model folder's content hash
    blob_sha256: Hex  # what the nodes fetch: the GGUF, or the squashfs of the folder
    source: Text  # a path relative to the cluster file, or a URL without credentials
    revision: Text | None = None


class Process(_Strict):
    service: Name
    role: Word
    port: int | None = Field(None, ge=1, le=65535)


class NodeEntry(_Strict):
    mac: Mac
    set: Name
    script_sha256: Hex
    plan_sha256: Hex
    firewall_sha256: Hex
    processes: list[Process] = []


class Bom(_Strict):
    schema_: Literal[1] = Field(alias="schema")
    cluster_sha256: Hex
    gateway_settings_sha256: Hex
    sets: dict[Name, SetEntry]
    models: dict[Name, ModelEntry]
    nodes: dict[Name, NodeEntry]


def model_source(location: str, base: Path) -> str:
    """A model's source for the record: a URL without user, password, query or fragment (where tokens
    hide), or a path relative to the cluster file's folder."""
    if "://" in location:
        parts = urlsplit(location)
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    path = Path(location)
    if path.is_absolute():
        return os.path.relpath(path, base.resolve())
    return location


def model_revision(location: str) -> str | None:
    """The revision a model's name pins (hf://ORG/REPO@REVISION/…), or None where it pins none."""
    match = re.match(r"^hf://[^/@]+/[^/@]+@([^/?#]+)", location)
    return match.group(1) if match else None


_WORD = re.compile(r"^[A-Za-z0-9_+~][A-Za-z0-9._+~:-]{0,127}\Z")


def set_entry(manifest: dict[str, object], where: str) -> dict[str, object]:
    """What bom.json holds of a netboot set, from its (checked) manifest; `where` names the set in a refusal."""
    files: dict[str, dict[str, str]] = manifest["files"]  # type: ignore[assignment]
    entry: dict[str, object] = {
        "image": manifest["image"], "image_digest": manifest["image_digest"],
        "llama_cpp_commit": manifest.get("llama_cpp_commit"), "ggml_rpc_protocol": manifest.get("ggml_rpc_protocol"),
        "root_sha256": files["root.squashfs"]["sha256"], "kernel_sha256": files["vmlinuz"]["sha256"],
        "initrd_sha256": files["initrd.img"]["sha256"], "kernel_version": manifest["kernel_version"]}
    packages = manifest.get("kernel_packages")
    packages = packages if isinstance(packages, dict) else {}
    for name, version in packages.items():
        if not isinstance(version, str) or not _WORD.match(str(name)) or (version and not _WORD.match(version)):
            raise RecipeError(f"{where}/manifest.json: kernel_packages: {str(name)[:60]!r}: expected a Debian "
                              "package name and version", "rebuild or pull the netboot set again")
    entry["kernel_packages"] = dict(sorted(packages.items()))
    return entry


def render(cluster: bytes, gateway_settings: dict[str, object], sets: dict[str, dict[str, object]],
           models: dict[str, dict[str, object]], nodes: dict[str, dict[str, object]]) -> bytes:
    """bom.json's bytes, checked by the same schema that reads it back (a wrong value stops the publish)."""
    settings = json.dumps(gateway_settings, sort_keys=True, separators=(",", ":")).encode()
    doc = {"schema": 1, "cluster_sha256": hashlib.sha256(cluster).hexdigest(),
           "gateway_settings_sha256": hashlib.sha256(settings).hexdigest(),
           "sets": sets, "models": models, "nodes": nodes}
    _check(doc, BOM)
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def _check(doc: object, where: str) -> Bom:
    hint = ("bom.json is written by `builder pxe publish`, never by hand: publish again "
            "(`builder pxe diff` still compares the generation's node files)")
    if not isinstance(doc, dict):
        raise RecipeError(f"{where}: expected a JSON object", hint)
    try:
        bom = Bom.model_validate(doc)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(where, exc), hint) from None
    for name, node in bom.nodes.items():
        if node.set not in bom.sets:
            raise RecipeError(f"{where}: nodes.{name}.set: {node.set} is not one of the sets", hint)
    return bom


def read_bom(root: Path, generation: str) -> Bom | None:
    """The generation's bill of materials, checked; None for a generation published before builder wrote one."""
    path = root / "generations" / generation / BOM
    if not path.is_file():
        return None
    where = f"{display_path(root)}/generations/{generation}/{BOM}"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise RecipeError(f"{where}: not readable JSON",
                          "bom.json is written by `builder pxe publish`, never by hand: publish again") from None
    return _check(doc, where)


@dataclass(frozen=True)
class NodeView:
    """What a node boots in a generation, for comparing: None where the generation holds no such file."""

    mac: str
    set: str
    script: str | None
    plan: str | None
    firewall: str | None
    root: str | None


@dataclass
class View:
    """A generation as `pxe diff` compares it: from its bom.json, or from its node files when it has none."""

    id: str
    bom: bool
    sets: dict[str, dict[str, object]] = field(default_factory=dict)
    models: dict[str, dict[str, object]] | None = None
    nodes: dict[str, NodeView] = field(default_factory=dict)
    cluster: str | None = None
    gateway: str | None = None


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def view(root: Path, generation: str) -> View:
    folder = root / "generations" / generation
    bom = read_bom(root, generation)
    if bom is not None:
        sets = {k: s.model_dump() for k, s in bom.sets.items()}
        return View(generation, True, sets, {k: m.model_dump() for k, m in bom.models.items()},
                    {name: NodeView(n.mac, n.set, n.script_sha256, n.plan_sha256, n.firewall_sha256,
                                    bom.sets[n.set].root_sha256) for name, n in bom.nodes.items()},
                    bom.cluster_sha256, bom.gateway_settings_sha256)
    where = f"{display_path(root)}/generations/{generation}"
    sets = {}
    for path in sorted((folder / "manifests").glob("*.json")):
        try:
            manifest = check_set_manifest(json.loads(path.read_text()), f"{where}/manifests/{path.stem}")
        except (OSError, ValueError, RecursionError):
            raise RecipeError(f"{where}/manifests/{path.name}: cannot be read", "publish again") from None
        if re.fullmatch(_NAME, path.stem):
            sets[path.stem] = set_entry(manifest, f"{where}/manifests/{path.stem}")
    try:
        nodes = json.loads((folder / "nodes.json").read_text())
    except (OSError, ValueError, RecursionError):
        raise RecipeError(f"{where}/nodes.json: not readable JSON", "publish again: builder pxe publish") from None
    out = View(generation, False, sets, None, cluster=_sha(folder / "cluster.yaml"))
    for name, entry in sorted(nodes.items()) if isinstance(nodes, dict) else []:
        mac = entry.get("mac") if isinstance(entry, dict) else None
        key = entry.get("artifacts") if isinstance(entry, dict) else None
        if not isinstance(mac, str) or not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", mac) \
                or not isinstance(key, str) or not all(re.fullmatch(_NAME, word) for word in (key, str(name))):
            raise RecipeError(f"{where}/nodes.json: {str(name)[:64]!r}: expected a node name with mac and artifacts",
                              "publish again: builder pxe publish")
        stem = folder / "nodes" / mac.replace(":", "-")
        root_sha = sets.get(key, {}).get("root_sha256")
        out.nodes[name] = NodeView(mac, key, _sha(stem.with_suffix(".ipxe")), _sha(stem.with_suffix(".plan")),
                                   _sha(stem.with_suffix(".nft")), str(root_sha) if root_sha else None)
    return out


_SET_FIELDS = ("image_digest", "llama_cpp_commit", "ggml_rpc_protocol", "root_sha256", "kernel_version",
               "kernel_sha256", "initrd_sha256", "kernel_packages")
_MODEL_FIELDS = ("sha256", "source", "revision", "engine")
_NODE_FIELDS = ("mac", "set", "root", "plan", "firewall", "script")


def _changed(old: dict[str, object], new: dict[str, object], keys: tuple[str, ...]) -> dict[str, list[object]]:
    return {k: [old.get(k), new.get(k)] for k in keys if old.get(k) != new.get(k)}


def _entries(a: dict[str, dict[str, object]], b: dict[str, dict[str, object]], label: str, keys: tuple[str, ...],
             shown: tuple[str, ...] = ()) -> list[dict[str, object]]:
    """Each entry added, removed (with its `shown` fields) or changed (its `keys` that differ) from `a` to `b`."""
    out: list[dict[str, object]] = []
    for name in sorted(a.keys() | b.keys()):
        if name not in a or name not in b:
            entry = b.get(name) or a[name]
            out.append({label: name, "change": "added" if name in b else "removed", **{k: entry[k] for k in shown}})
        elif changed := _changed(a[name], b[name], keys):
            out.append({label: name, "change": "changed", "fields": changed})
    return out


def diff(a: View, b: View) -> dict[str, object]:
    """What changed from generation `a` to `b`, and which nodes must reboot: a node in both whose MAC, set, root,
    plan, firewall or boot script differs (a node only in `b` boots it when it is powered on)."""
    sets = _entries(a.sets, b.sets, "set", _SET_FIELDS)
    models = None
    if a.models is not None and b.models is not None:
        models = _entries(a.models, b.models, "service", _MODEL_FIELDS, ("sha256", "source"))
    added = [{"name": n, "mac": b.nodes[n].mac, "set": b.nodes[n].set} for n in sorted(b.nodes.keys() - a.nodes)]
    removed = [{"name": n, "mac": a.nodes[n].mac} for n in sorted(a.nodes.keys() - b.nodes)]
    changed_nodes = []
    for name in sorted(a.nodes.keys() & b.nodes.keys()):
        old, new = a.nodes[name], b.nodes[name]
        what = [k for k in _NODE_FIELDS if getattr(old, k) != getattr(new, k)]
        if what:
            changed_nodes.append({"name": name, "mac": new.mac, "changed": what})
    both = a.gateway is not None and b.gateway is not None
    return {"from": a.id, "to": b.id, "bill_of_materials": {"from": a.bom, "to": b.bom}, "sets": sets,
            "models": models, "nodes": {"added": added, "removed": removed, "changed": changed_nodes},
            "cluster_file_changed": a.cluster != b.cluster if a.cluster and b.cluster else None,
            "gateway_settings_changed": a.gateway != b.gateway if both else None,
            "reboot": [n["name"] for n in changed_nodes]}


def _short(value: object) -> str:
    text = str(value) if value is not None else "none"
    if text.startswith("sha256:"):
        return text[:19]
    return text[:12] if re.fullmatch(r"[0-9a-f]{40,64}", text) else text


def diff_lines(d: dict[str, object]) -> list[str]:
    """`pxe diff`'s text: one line per change, then the nodes that must reboot."""
    out: list[str] = []
    names = {"image_digest": "image", "llama_cpp_commit": "llama.cpp", "ggml_rpc_protocol": "ggml RPC protocol",
             "root_sha256": "root", "kernel_version": "kernel", "kernel_sha256": "vmlinuz",
             "initrd_sha256": "initrd", "kernel_packages": "kernel packages"}
    for s in d["sets"]:  # type: ignore[attr-defined]
        if s["change"] != "changed":
            out.append(f"set {s['set']}: {s['change']}")
            continue
        parts = [f"{names[k]} {_short(v[0])} -> {_short(v[1])}" for k, v in s["fields"].items()
                 if k != "kernel_packages"] + ["kernel packages changed"] * ("kernel_packages" in s["fields"])
        out.append(f"set {s['set']}: " + "; ".join(parts))
    bom: dict[str, bool] = d["bill_of_materials"]  # type: ignore[assignment]
    if d["models"] is None:
        missing = " and ".join(str(d[k]) for k in ("from", "to") if not bom[k])
        out.append(f"models: not compared ({missing} has no bill of materials); the node plans that name them are")
    for m in d["models"] or []:  # type: ignore[attr-defined]
        if m["change"] != "changed":
            out.append(f"model {m['service']}: {m['change']} (sha256 {_short(m['sha256'])}, {m['source']})")
            continue
        parts = [f"{k} {_short(v[0])} -> {_short(v[1])}" for k, v in m["fields"].items()]
        out.append(f"model {m['service']}: " + "; ".join(parts))
    nodes: dict[str, list[dict[str, object]]] = d["nodes"]  # type: ignore[assignment]
    for n in nodes["added"]:
        out.append(f"node {n['name']}: added ({n['mac']}, {n['set']}; it boots this generation when powered on)")
    for n in nodes["removed"]:
        out.append(f"node {n['name']}: removed ({n['mac']}; it no longer gets a boot script)")
    for n in nodes["changed"]:
        out.append(f"node {n['name']}: must reboot ({n['mac']}; changed: {', '.join(n['changed'])})")  # type: ignore[arg-type]
    if d["cluster_file_changed"]:
        out.append("cluster.yaml: changed")
    if d["gateway_settings_changed"]:
        out.append("gateway: settings changed (run `builder cluster up` again to apply them)")
    reboot: list[str] = d["reboot"]  # type: ignore[assignment]
    if d["from"] == d["to"] or not out:
        out.append(f"no changes between {d['from']} and {d['to']}")
    out.append(f"reboot: {', '.join(reboot)}" if reboot else "reboot: no node")
    return out
