"""pxe-root/: immutable, content-addressed generations of boot files, switched atomically.

    pxe-root/
      blobs/sha256/<hex>          kernels, initrds, root squashfs images, models: by content
      generations/<id>/           boot.ipxe, nodes/<mac>.ipxe, .nft (and .plan), manifests/, cluster.yaml,
                                  nodes.json, bom.json (builder/netboot/bom.py)
      current -> generations/<id> the live generation: one symlink, replaced with rename(2)
      pins/<mac>.ipxe             a node held on another generation (`builder pxe pin`, `builder cluster roll`):
                                  a symlink to generations/<id>/nodes/<mac>.ipxe, replaced with rename(2)
      history.json                generations in publish order (rollback goes back along it)
      tftp/                       iPXE binaries and boot.ipxe for PXE ROMs that load over TFTP

boot.ipxe chains a node's pin first and the current generation's script when it has none, so a pinned node
boots its pinned generation whatever `current` is: `pxe publish` and `pxe rollback` move `current` (the nodes
without a pin), never a pin; pruning keeps every generation a pin points at.

Node scripts name blobs by hash, so a node that is booting while `current` switches still gets one
consistent set of files. Each node's firewall (nftables rules, builder/cluster/firewall.py) and its plan
(builder/netboot/plan.py) are blobs too: its script names them with their sha256, which the node checks before
using them. This module takes plain data (a node, its image's manifest, its words); builder/cluster/plans.py
makes those from a cluster file and writes every node's files through publish_generation.
"""

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from builder.core.errors import EngineError, RecipeError, raise_if_stopped
from builder.core.locks import locked
from builder.engines.cleanup import temp_dir, temp_path
from builder.netboot.artifacts import LLAMA_FACTS, check_set_manifest
from builder.netboot.inventory import Cache, Control, Node
from builder.recipe.load import display_path
from builder.recipe.targets import did_you_mean

IPXE_DIRS = (Path("/usr/lib/ipxe"), Path("/usr/share/ipxe"))
IPXE_BINARIES = ("undionly.kpxe", "ipxe.efi", "snponly.efi")


@dataclass(frozen=True)
class Generation:
    id: str
    published: float
    current: bool


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = temp_path(path.parent)
    try:
        tmp.write_bytes(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def add_blob(root: Path, source: Path, expected: str | None = None) -> str:
    """Copy `source` into blobs/ under its sha256 (checked against `expected`); returns the hex digest."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    if expected and (blobs / expected).is_file():
        return expected
    digest = hashlib.sha256()
    tmp = temp_path(blobs)
    try:
        with source.open("rb") as src, open(tmp, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                dst.write(block)
        hexdigest = digest.hexdigest()
        if expected and hexdigest != expected:
            raise EngineError(f"{source}: sha256 {hexdigest} does not match its manifest ({expected})",
                              "rebuild the artifacts: builder pxe build --target …")
        os.chmod(tmp, 0o644)
        os.replace(tmp, blobs / hexdigest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return hexdigest


def add_blob_bytes(root: Path, data: bytes) -> str:
    """Store `data` in blobs/ under its sha256 (a file the node fetches, e.g. its firewall rules)."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    hexdigest = hashlib.sha256(data).hexdigest()
    if not (blobs / hexdigest).is_file():
        _write_atomic(blobs / hexdigest, data)
    return hexdigest


def base_url(control: Control) -> str:
    return f"http://{control.address}:{control.http_port}"


def boot_script_for(control: Control) -> str:
    base = base_url(control)
    return (
        "#!ipxe\n"
        "# builder netboot: each node chains its own script, named by the MAC address it booted from: its pin's\n"
        "# generation when it has one (pins/), else the current one\n"
        f"chain {base}/pins/${{mac:hexhyp}}.ipxe || chain {base}/current/nodes/${{mac:hexhyp}}.ipxe || goto unknown\n"
        ":unknown\n"
        "echo builder: no node with MAC ${mac} in this generation; add it to cluster.yaml and publish\n"
        "sleep 30\n"
        "exit 1\n"
    )


def root_words(base: str, node: Node, manifest: dict[str, object], plan_words: list[str],
               firewall_sha256: str | None, cache: Cache | None, ram_share: int) -> list[str]:
    """The kernel command-line words every node script starts with: its root image, name, networks (the boot
    interface's MTU, the data interface), firewall and cache."""
    files: dict[str, dict[str, str]] = manifest["files"]  # type: ignore[assignment]
    initrd, squash = files["initrd.img"]["sha256"], files["root.squashfs"]["sha256"]
    args = [f"initrd={initrd}", "BOOTIF=01-${mac:hexhyp}", f"builder.root={base}/blobs/sha256/{squash}",
            f"builder.sha256={squash}", f"builder.size={files['root.squashfs']['size']}",
            f"builder.name={node.name}", *node.network_words, *plan_words]
    verity = manifest.get("verity")
    if isinstance(verity, dict):
        args += [f"builder.verity={verity['root_hash']}", f"builder.verity_salt={verity['salt']}",
                 f"builder.verity_blocks={verity['data_blocks']}"]
    if firewall_sha256:
        args += [f"builder.firewall={base}/blobs/sha256/{firewall_sha256}",
                 f"builder.firewall_sha256={firewall_sha256}"]
    if cache:
        args.append(f"builder.cache={cache.device}")
        if cache.wipe:
            args.append("builder.cache_wipe=1")
    args.append(f"builder.ram_share={ram_share}")
    return args


def ipxe_script(base: str, node: Node, manifest: dict[str, object], label: str, generation_note: str,
                args: list[str]) -> str:
    """A node's iPXE script: one line saying what it boots as, then its kernel, initrd and command line."""
    files: dict[str, dict[str, str]] = manifest["files"]  # type: ignore[assignment]
    kernel, initrd = files["vmlinuz"]["sha256"], files["initrd.img"]["sha256"]
    return (
        "#!ipxe\n"
        f"echo builder: {node.name} ({label}, {manifest['target']}/{manifest['variant']}) {generation_note}\n"
        f"kernel {base}/blobs/sha256/{kernel} {' '.join(args)}\n"
        f"initrd {base}/blobs/sha256/{initrd}\n"
        "boot\n"
    )


# A generation's id names a folder under generations/: hex only, so no id can point anywhere else.
GENERATION_ID = re.compile(r"[0-9a-f]{16}")


def _history(root: Path) -> list[dict[str, object]]:
    """history.json, checked: a damaged file is one clear line, never a crash or a path outside the root."""
    path = root / "history.json"
    if not path.is_file():
        return []
    hint = f"fix or remove {path} (generations/ still holds every generation)"
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise RecipeError(f"{path}: not a readable history of generations (damaged JSON)", hint) from None
    if not isinstance(entries, list):
        raise RecipeError(f"{path}: expected a list of generations", hint)
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) \
                or not GENERATION_ID.fullmatch(entry["id"]):
            raise RecipeError(f"{path}: [{i}].id: expected a generation id of 16 hex digits", hint)
        published = entry.get("published")
        if isinstance(published, bool) or not isinstance(published, int | float) or not 0 <= published < 1e11:
            raise RecipeError(f"{path}: [{i}].published: expected a time in seconds", hint)
    return entries


def current_id(root: Path) -> str | None:
    link = root / "current"
    return os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else None


def switch(root: Path, generation: str) -> None:
    """Point `current` at a generation with one rename: HTTP clients see the old or the new, never a mix."""
    if not GENERATION_ID.fullmatch(generation) or not (root / "generations" / generation).is_dir():
        raise RecipeError(f"no generation {generation!r} in {root}", "see `builder pxe list`")
    tmp = temp_path(root)
    os.symlink(f"generations/{generation}", tmp)
    raise_if_stopped()
    os.replace(tmp, root / "current")


def _install_tftp(root: Path, control: Control) -> None:
    tftp = root / "tftp"
    tftp.mkdir(parents=True, exist_ok=True)
    for name in IPXE_BINARIES:
        if (tftp / name).is_file():
            continue
        found = next((d / name for d in IPXE_DIRS if (d / name).is_file()), None)
        if found is None:
            raise EngineError(f"iPXE binary {name} not found in {', '.join(map(str, IPXE_DIRS))}",
                              "apt-get install ipxe")
        _write_atomic(tftp / name, found.read_bytes())
    _write_atomic(tftp / "boot.ipxe", boot_script_for(control).encode())


Artifacts = dict[tuple[str, str], tuple[Path, dict[str, object]]]
Manifests = dict[str, dict[str, object]]
# Given the generation's manifests (by TARGET-VARIANT), a form's nodes: files under nodes/ and nodes.json's entries.
NodeFiles = Callable[[Manifests], tuple[dict[str, bytes], dict[str, object]]]


def lock_of(root: Path) -> Path:
    """One publish, rollback or prune at a time per pxe-root: pruning must not drop another's new blobs."""
    root.mkdir(parents=True, exist_ok=True)
    return root / ".builder.lock"


def publish_generation(root: Path, control: Control, inventory: Path, artifacts: Artifacts, keep: int,
                       node_files: NodeFiles) -> tuple[str, bool]:
    """Add the artifacts, write a generation holding the inventory and `node_files`' scripts, make it current."""
    with locked(lock_of(root), f"publishing into {root}"):
        manifests: Manifests = {}
        for (target, variant), (folder, manifest) in sorted(artifacts.items()):
            files: dict[str, dict[str, str]] = manifest["files"]  # type: ignore[assignment]
            for name, entry in files.items():
                add_blob(root, folder / name, entry["sha256"])
            manifests[f"{target}-{variant}"] = manifest
        files_out: dict[str, bytes] = {"boot.ipxe": boot_script_for(control).encode(),
                                       "cluster.yaml": inventory.read_bytes()}
        for key, manifest in manifests.items():
            files_out[f"manifests/{key}.json"] = (json.dumps(manifest, indent=2) + "\n").encode()
        scripts, nodes = node_files(manifests)
        files_out.update(scripts)
        files_out["nodes.json"] = (json.dumps(nodes, indent=2, sort_keys=True) + "\n").encode()
        digest = hashlib.sha256()
        for name in sorted(files_out):
            digest.update(name.encode() + b"\0" + hashlib.sha256(files_out[name]).digest())
        generation = digest.hexdigest()[:16]
        target_dir = root / "generations" / generation
        new = not target_dir.is_dir()
        if new:
            with temp_dir(target_dir.parent) as staging:
                for name, data in files_out.items():
                    (staging / name).parent.mkdir(parents=True, exist_ok=True)
                    (staging / name).write_bytes(data)
                staging.chmod(0o755)
                os.replace(staging, target_dir)
        _install_tftp(root, control)
        history = [h for h in _history(root) if h["id"] != generation]
        history.append({"id": generation, "published": time.time()})
        _write_atomic(root / "history.json", (json.dumps(history, indent=2) + "\n").encode())
        switch(root, generation)
        _prune(root, keep)
        return generation, new


def generations(root: Path) -> list[Generation]:
    live = current_id(root)
    return [Generation(str(h["id"]), float(h["published"]), h["id"] == live) for h in _history(root)]  # type: ignore[arg-type]


def generation_sets(root: Path, generation: str) -> list[dict[str, object]]:
    """The netboot sets a generation boots, from its copies of their manifests (checked: pxe-root is a folder
    others may write): set, image, and for llama.cpp the commit and ggml RPC protocol where recorded."""
    folder = root / "generations" / generation / "manifests"
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        where = f"{display_path(root)}/generations/{generation}/manifests/{path.stem}"
        try:
            manifest = check_set_manifest(json.loads(path.read_text()), where)
        except (OSError, ValueError) as exc:
            raise RecipeError(f"{where}.json: cannot be read ({exc})", "publish again: builder pxe publish") from None
        entry: dict[str, object] = {"set": path.stem, "image": manifest["image"],
                                    "image_digest": manifest["image_digest"]}
        entry.update({key: manifest[key] for key in LLAMA_FACTS if key in manifest})
        out.append(entry)
    return out


def resolve(root: Path, word: str) -> str:
    """A generation named on the command line: its id (or a unique start of it), `current`, or `previous`
    (the one published before the current one)."""
    ids = [g.id for g in generations(root)]
    live = current_id(root)
    if word in ("current", "previous"):
        if live not in ids:
            raise RecipeError(f"{display_path(root)}: no current generation", "builder pxe publish cluster.yaml")
        at = ids.index(live) - (word == "previous")
        if at < 0:
            raise RecipeError(f"{display_path(root)}: no generation before the current one ({live})",
                              "see `builder pxe list`")
        return ids[at]
    starting = [i for i in ids if word and i.startswith(word)] if re.fullmatch(r"[0-9a-f]{4,16}", word) else []
    if len(starting) == 1:
        return starting[0]
    shown = repr(word[:40])
    if len(starting) > 1:
        raise RecipeError(f"generation {shown} is the start of {len(starting)} generations in {display_path(root)}",
                          "give more of its id (see `builder pxe list`)")
    close = did_you_mean(word, [*ids, "current", "previous"])
    raise RecipeError(f"no generation {shown} in {display_path(root)}{close}",
                      f"generations: {', '.join(ids) or 'none'} (or current, previous)")


def rollback(root: Path, to: str | None = None) -> str:
    """Make the generation published before the current one (or `to`) current again."""
    with locked(lock_of(root), f"switching generations in {root}"):
        ids = [g.id for g in generations(root)]
        live = current_id(root)
        if to is None:
            if live not in ids or ids.index(live) == 0:
                raise RecipeError(f"no generation before {live or 'the current one'} in {root}",
                                  "see `builder pxe list`")
            to = ids[ids.index(live) - 1]
        elif to not in ids:
            raise RecipeError(f"no generation {to} in {root}", f"generations: {', '.join(ids) or 'none'}")
        switch(root, to)
        return to


def prune(root: Path, keep: int) -> list[str]:
    """Keep the current generation and the `keep` before it; drop the rest and blobs nobody names."""
    with locked(lock_of(root), f"pruning {root}"):
        return _prune(root, keep)


def _prune(root: Path, keep: int) -> list[str]:
    history = _history(root)
    ids = [str(h["id"]) for h in history]
    live = current_id(root)
    upto = ids.index(live) + 1 if live in ids else len(ids)
    # a generation a node is pinned to is what that node boots: never pruned
    kept = set(ids[max(0, upto - 1 - keep):upto]) | ({live} if live else set()) | set(pins(root).values())
    removed = [g for g in ids if g not in kept]
    for gen in removed:
        shutil.rmtree(root / "generations" / gen, ignore_errors=True)
    if removed:
        _write_atomic(root / "history.json",
                      (json.dumps([h for h in history if h["id"] in kept], indent=2) + "\n").encode())
    used: set[str] = set()
    for gen in kept:
        # node scripts name the root, firewall and plan blobs; a node's plan names its models
        for script in [*(root / "generations" / gen / "nodes").glob("*.ipxe"),
                       *(root / "generations" / gen / "nodes").glob("*.plan")]:
            used.update(word.rsplit("/", 1)[-1] for word in script.read_text().split() if "/blobs/sha256/" in word)
    for blob in (root / "blobs" / "sha256").glob("*"):
        if blob.name not in used and not blob.name.startswith("."):
            blob.unlink()
    return removed


PIN_STEM = re.compile(r"[0-9a-f]{2}(-[0-9a-f]{2}){5}")


def pins(root: Path) -> dict[str, str]:
    """Each pinned node's MAC stem (52-54-00-…) and the generation its pin points at."""
    folder = root / "pins"
    out = {}
    for link in sorted(folder.glob("*.ipxe")) if folder.is_dir() else []:
        target = os.readlink(link) if link.is_symlink() else ""
        parts = target.split("/")
        # ../generations/<id>/nodes/<stem>.ipxe, as pin() writes it; anything else is not builder's pin
        if PIN_STEM.fullmatch(link.stem) and len(parts) == 5 and parts[:2] == ["..", "generations"] \
                and GENERATION_ID.fullmatch(parts[2]) and parts[3:] == ["nodes", f"{link.stem}.ipxe"]:
            out[link.stem] = parts[2]
    return out


def pin(root: Path, stem: str, generation: str | None) -> str | None:
    """Point one node (its MAC stem) at `generation`'s boot files with one rename, or drop its pin (None): it then
    boots the current generation. Returns the generation it was pinned to before."""
    with locked(lock_of(root), f"pinning a node in {root}"):
        if not PIN_STEM.fullmatch(stem):
            raise RecipeError(f"{stem!r} is not a MAC address as a node's boot file names it", "e.g. 52-54-00-12-34-56")
        before = pins(root).get(stem)
        link = root / "pins" / f"{stem}.ipxe"
        if generation is None:
            link.unlink(missing_ok=True)
            return before
        script = root / "generations" / generation / "nodes" / f"{stem}.ipxe"
        if not GENERATION_ID.fullmatch(generation) or not script.is_file():
            raise RecipeError(f"generation {generation[:40]!r} in {display_path(root)} has no boot script for the node "
                              f"with MAC {stem.replace('-', ':')}",
                              "pin it to a generation published with that node (see `builder pxe list`)")
        link.parent.mkdir(exist_ok=True)
        tmp = temp_path(link.parent)
        os.symlink(f"../generations/{generation}/nodes/{stem}.ipxe", tmp)
        raise_if_stopped()
        os.replace(tmp, link)
        return before
