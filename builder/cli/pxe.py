"""`builder pxe …`: netboot artifacts, registries (push, pull), generations in pxe-root/, the control node's servers."""

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Annotated

import typer
from pydantic import TypeAdapter, ValidationError

from builder.cli.common import EngineOpt, FlavourOpt, JsonOpt, LockOpt, RecipesOpt, emit
from builder.cli.conventions import check_input, check_output, cluster_file, deprecated
from builder.cluster.plans import control_of, label, load_for_netboot, models, netboot_set, publish_services, summary
from builder.core.errors import RecipeError, Stopped
from builder.core.locks import lock_file, locked
from builder.core.preflight import DHCP, NETBOOT_SET, require_tools
from builder.core.run import start_server, stop
from builder.core.types import Address
from builder.core.units import UNIT_DIR, notify_ready, require_systemd
from builder.core.units import install as install_units
from builder.engines import get_engine
from builder.engines.cleanup import remove_path
from builder.fetch.provenance import llama_commit, rpc_protocol
from builder.flavours import lock as lockfile
from builder.flavours.llama import LLAMA_CPP
from builder.flavours.prepare import flavour_named, prepare, recipe_file
from builder.netboot import bom
from builder.netboot.artifacts import DEFAULT_COMPRESSION, Squash, build_artifacts, read_artifacts, record_llama_cpp
from builder.netboot.kernels import kernel_spec, pinned_kernel
from builder.netboot.publish import Artifacts, generation_sets, generations, pin, pins, resolve, rollback
from builder.netboot.serve import check_dnsmasq, dnsmasq_config, http_server
from builder.netboot.units import BOOT_UNIT, boot_units
from builder.pipeline.build import build
from builder.publish.artifacts import pull_netboot, push_netboot
from builder.recipe.load import display_path
from builder.registry.client import Repository

pxe_app = typer.Typer(help="Netboot compute nodes: build boot artifacts, publish generations, serve them.",
                      no_args_is_help=True)

RootOpt = Annotated[Path, typer.Option("--root", help="The pxe-root folder the control node serves.")]
CompressionOpt = Annotated[str, typer.Option(
    help="squashfs compression: zstd:LEVEL (1-22), gzip:LEVEL (1-9), lzo:LEVEL (1-9), xz or lz4; an algorithm alone "
    "takes mksquashfs's default level (zstd: 15). The default zstd:3 is chosen by measurement (docs/benchmarks.md).")]


def _artifacts(engine_name: str, target: str, variant: str | None, compression: str,
               out: Path | None = None, flavour: str = LLAMA_CPP.name,
               lock_path: Path = lockfile.LOCK_FILE) -> tuple[Path, dict[str, object]]:
    spec = kernel_spec(target)
    squash = Squash.parse(compression)
    # the pinned kernel and firmware are checked before anything is built: a missing pin or a known-bad
    # version stops here, with the command that pins another
    where = display_path(lock_path)
    kernel = pinned_kernel(target, spec, lockfile.netboot_entry(target, lock_path), where)
    engine = get_engine(engine_name)
    chosen = flavour_named(flavour)
    prep = prepare(recipe_file(target, None, chosen), variant, flavour=chosen)
    result = build(prep, engine)
    typer.echo(f"image   {result.ref} ({'built' if result.built else 'up to date'})", err=True)
    folder, manifest = build_artifacts(engine, result.ref, prep.plan.target, prep.plan.variant, spec, kernel, squash,
                                       out, where=where, ssh=lockfile.netboot_admin_entries(lock_path))
    if chosen.name != LLAMA_CPP.name or prep.tree is None:  # a vLLM image carries no llama.cpp
        return folder, manifest
    return folder, record_llama_cpp(folder, manifest, llama_commit(prep.tree.info, prep.tree.path),
                                    rpc_protocol(prep.tree.path))


@pxe_app.command("build")
def build_cmd(
    target: Annotated[str, typer.Option("--target", "-t", help="Target whose image nodes boot.")],
    variant: Annotated[str | None, typer.Option(help="Variant (default: the target's default).")] = None,
    engine: EngineOpt = "auto",
    compression: CompressionOpt = DEFAULT_COMPRESSION,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the artifacts here (default: the cache).")
                   ] = None,
    as_json: JsonOpt = False,
    flavour: FlavourOpt = LLAMA_CPP.name,
    recipes: RecipesOpt = None,
    lock_path: LockOpt = lockfile.LOCK_FILE,
) -> None:
    """Make the netboot flavour of a target's image: vmlinuz, initrd.img, root.squashfs, SHA256SUMS, manifest.json.

    The image is built first if needed. The kernel and firmware are the Debian packages pinned in builder.lock
    for the target (each .deb checked by sha256; versions known to be bad for the target are refused); the
    root is the image's filesystem plus systemd and the node's units, and the accelerator's modules and firmware.
    """
    if out is not None:
        check_output(out, "--out", folder=True)
    require_tools("builder pxe build", NETBOOT_SET)
    folder, manifest = _artifacts(engine, target, variant, compression, out, flavour, lock_path)
    if as_json:
        typer.echo(json.dumps(manifest, indent=2))
        return
    files: dict[str, dict[str, object]] = manifest["files"]  # type: ignore[assignment]
    typer.echo(f"folder  {folder}")
    typer.echo(f"image   {manifest['image_digest']}")
    pinned = manifest.get("kernel_packages")
    versions = f", {', '.join(f'{k} {v}' for k, v in pinned.items())}" if isinstance(pinned, dict) else ""
    typer.echo(f"kernel  {manifest['kernel_version']} (Debian {manifest['kernel_suite']}{versions}; pinned)")
    for name, entry in files.items():
        typer.echo(f"{name:<14}{int(str(entry['size'])) / 1e6:8.1f} MB  sha256 {entry['sha256']}")
    verity = manifest.get("verity")
    if isinstance(verity, dict):
        typer.echo(f"verity  root hash {verity['root_hash']} ({verity['data_blocks']} data blocks of 4 KiB)")


@pxe_app.command("publish")
def publish_cmd(
    file: Annotated[Path | None, typer.Argument(metavar="FILE", help="The cluster file (cluster.yaml).",
                                                show_default=False)] = None,
    root: RootOpt = Path("pxe-root"),
    keep: Annotated[int, typer.Option(help="Previous generations to keep for rollback.")] = 3,
    engine: EngineOpt = "auto",
    compression: CompressionOpt = DEFAULT_COMPRESSION,
    pulled: Annotated[Path | None, typer.Option(
        "--artifacts", help="Use netboot sets pulled here by `builder pxe pull` (DIR/TARGET-VARIANT) "
        "instead of building images on this machine.")] = None,
    as_json: JsonOpt = False,
    old_inventory: Annotated[Path | None, typer.Option("--inventory", hidden=True)] = None,
    recipes: RecipesOpt = None,
) -> None:
    """Write a new generation for the cluster file into pxe-root/ and make it current (atomically).

    Each node with a mac gets nodes/<mac>.ipxe (its root image, cache disk and plan on the kernel command line),
    nodes/<mac>.plan (its servers, RPC workers and vLLM processes) and its firewall (nftables rules admitting
    the cluster's addresses only) as nodes/<mac>.nft; every model is published by sha256 (a vLLM model folder
    as a squashfs). Nodes without a mac are listed as not netbooted (`builder cluster commands` prints what to
    run on them). Every file is checked against its manifest's sha256 on the way in.
    """
    inventory = cluster_file(file, old_inventory, "builder pxe publish")
    check_output(root, "--root", folder=True)
    if pulled is not None:
        check_input(pulled, "--artifacts", folder=True)
    else:  # the nodes' netboot sets may have to be made first
        require_tools("builder pxe publish", NETBOOT_SET)
    loaded = load_for_netboot(inventory)
    for warning in loaded.warnings:
        typer.echo(f"warning: {warning}", err=True)
    for node in loaded.cluster.netbooted:
        if not node.address and len(loaded.cluster.nodes) > 1:
            typer.echo(f"note: {node.name} has no address in {display_path(inventory)}: it admits its own lease, "
                       "but the other nodes' firewalls cannot admit its connections", err=True)
    files = models(loaded, lambda line: typer.echo(line, err=True))  # checked before any build
    artifacts = _wanted(sorted({netboot_set(loaded, n) for n in loaded.cluster.netbooted}), engine, compression,
                        pulled)
    generation, new = publish_services(root, loaded, files, artifacts, keep)
    for line in loaded.notes:  # once published: a refusal above stays one line
        typer.echo(f"note: {line}", err=True)
    # "target": the target whose root the node boots (its device's, on a board with several)
    emit(as_json, {"generation": generation, "published": new, "current": f"generations/{generation}",
                   "nodes": [{"name": n.name, "mac": n.mac, "boots": label(loaded, n.name),
                              "target": netboot_set(loaded, n)[0] if n.mac else n.target,
                              "script": f"nodes/{n.file_stem}.ipxe" if n.mac else None} for n in loaded.cluster.nodes]},
         [f"generation {generation} {'published' if new else 'unchanged'}; current -> generations/{generation}",
          *summary(loaded)])


def _wanted(wanted: list[tuple[str, str]], engine: str, compression: str, pulled: Path | None) -> Artifacts:
    """The netboot set of every (target, variant) the nodes boot: pulled ones, or built on this machine."""
    artifacts: Artifacts = {}
    for target, variant in wanted:
        if pulled is not None:
            artifacts[(target, variant)] = read_artifacts(pulled / f"{target}-{variant}")
            continue
        # a vLLM image's set is spelt vllm-VARIANT (plans.netboot_set)
        flavour = "vllm" if variant.startswith("vllm-") else LLAMA_CPP.name
        artifacts[(target, variant)] = _artifacts(engine, target, variant.removeprefix("vllm-"), compression,
                                                  flavour=flavour)
    return artifacts


def _existing_root(root: Path) -> None:
    if not root.exists():
        raise RecipeError(f"--root {root}: no such folder",
                          f"`builder pxe publish cluster.yaml --root {root}` writes the first generation there")
    check_input(root, "--root", folder=True)


@pxe_app.command("list")
def list_cmd(root: RootOpt = Path("pxe-root"), as_json: JsonOpt = False) -> None:
    """The generations in pxe-root/, oldest first; the current one is marked *. Under each, the netboot sets it
    boots (the image by digest, and for llama.cpp its commit and the ggml RPC protocol its workers and servers
    speak) and, from its bill of materials, each service's model by sha256."""
    _existing_root(root)
    held = pins(root)
    found = [(g, generation_sets(root, g.id), bom.read_bom(root, g.id),
              sorted(stem.replace("-", ":") for stem, i in held.items() if i == g.id)) for g in generations(root)]
    lines = [] if found else [f"no generations in {root}"]
    for gen, sets, bill, pinned in found:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(gen.published))
        lines.append(f"{'*' if gen.current else ' '} {gen.id}  {when}")
        lines += [f"    pinned {', '.join(pinned)}"] if pinned else []
        lines += [f"    {entry['set']:<24} image {str(entry['image_digest'])[:19]}{_llama_line(entry)}"
                  for entry in sets]
        if bill is None:
            lines.append("    no bill of materials (published before builder recorded one)")
        else:
            lines.append("    models " + (", ".join(f"{name}: {m.sha256[:12]}" for name, m in bill.models.items())
                                         or "none"))
    emit(as_json, [{"id": g.id, "published": g.published, "current": g.current, "sets": sets, "pinned": pinned,
                    "models": None if bill is None else [
                        {"service": name, **m.model_dump()} for name, m in bill.models.items()]}
                   for g, sets, bill, pinned in found], lines)


def _llama_line(entry: dict[str, object]) -> str:
    if "llama_cpp_commit" not in entry:  # a vLLM set, or one made before sets recorded it
        return ""
    commit = entry["llama_cpp_commit"] or "not recorded by its source"
    protocol = entry["ggml_rpc_protocol"]
    return f", llama.cpp {commit}, " + (f"ggml RPC protocol {protocol}" if protocol else "no ggml RPC header")


@pxe_app.command("diff")
def diff_cmd(
    old: Annotated[str, typer.Argument(metavar="A", help="A generation id, `current` or `previous`.",
                                       show_default=False)],
    new: Annotated[str, typer.Argument(metavar="B", help="A generation id, `current` or `previous`.",
                                       show_default=False)],
    root: RootOpt = Path("pxe-root"),
    as_json: JsonOpt = False,
) -> None:
    """What changed from generation A to B (netboot sets, models, nodes added or removed, each node's boot
    script, plan and firewall), and which nodes must reboot to run B: those whose boot files differ.

    A generation published before builder wrote bills of materials is compared by its node files."""
    _existing_root(root)
    a, b = resolve(root, old), resolve(root, new)
    result = bom.diff(bom.view(root, a), bom.view(root, b))
    emit(as_json, result, [f"from {a} to {b}", *bom.diff_lines(result)])


@pxe_app.command("rollback")
def rollback_cmd(
    root: RootOpt = Path("pxe-root"),
    to: Annotated[str | None, typer.Option(help="Generation id (default: the one before the current).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Make the previous generation current again (one atomic switch; nodes pick it up on their next boot)."""
    _existing_root(root)
    current = rollback(root, to)
    typer.echo(json.dumps({"current": current}) if as_json else f"current -> generations/{current}")


@pxe_app.command("pin")
def pin_cmd(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="The cluster file that names the node.")],
    node: Annotated[str, typer.Argument(metavar="NODE", help="A netbooted node of the cluster file.")],
    generation: Annotated[str | None, typer.Argument(
        metavar="GENERATION", help="A generation id (or a unique start of it), `current` or `previous`.",
        show_default=False)] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Drop NODE's pin: it boots the current generation.")
                     ] = False,
    root: RootOpt = Path("pxe-root"),
    as_json: JsonOpt = False,
    recipes: RecipesOpt = None,
) -> None:
    """Boot one node from GENERATION's files, whatever generation is current (one atomic switch of that node's
    pin; the node picks it up on its next boot). `pxe publish` and `pxe rollback` move the nodes without a pin;
    a generation a node is pinned to is never pruned. `builder cluster roll` pins nodes as it goes."""
    _existing_root(root)
    if clear == (generation is not None):
        raise RecipeError("give either GENERATION or --clear", f"builder pxe pin {file} {node[:40]} current")
    check_input(file, "FILE")
    loaded = load_for_netboot(file)
    match = [n for n in loaded.cluster.netbooted if n.name == node]
    if not match:
        raise RecipeError(f"{display_path(file)}: no netbooted node {node[:40]!r}",
                          f"netbooted nodes: {', '.join(n.name for n in loaded.cluster.netbooted) or 'none'}")
    target = None if generation is None else resolve(root, generation)
    before = pin(root, match[0].file_stem, target)
    if as_json:
        typer.echo(json.dumps({"node": node, "mac": match[0].mac, "was": before, "pinned": target}))
        return
    was = f"generations/{before}" if before else "current"
    typer.echo(f"{node}: {was} -> " + (f"generations/{target}" if target else "current (no pin)"))


@pxe_app.command("serve")
def serve_cmd(
    root: RootOpt = Path("pxe-root"),
    bind: Annotated[str | None, typer.Option(help="Address to listen on (default: control.address).")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (default: control.http_port).", min=1, max=65535)
                    ] = None,
    dnsmasq: Annotated[bool, typer.Option("--dnsmasq", help="Also start dnsmasq (proxy-DHCP + TFTP).")] = False,
    install: Annotated[bool, typer.Option(
        "--install", help=f"Instead of serving in the foreground: write systemd units for the boot server (and "
        f"dnsmasq with --dnsmasq) into {UNIT_DIR}, enable them at boot and start them (needs root).")] = False,
    show: Annotated[bool, typer.Option("--print", help="Print the units --install writes; install nothing.")
                    ] = False,
) -> None:
    """Serve the current generation over HTTP; write dnsmasq's config (pxe-root/dnsmasq.conf).

    dnsmasq runs in proxy-DHCP mode beside the site's DHCP server: it only adds boot information.
    With --install the servers become systemd units that come back after a reboot (docs/netboot.md).
    """
    _existing_root(root)
    if dnsmasq:
        require_tools("builder pxe serve --dnsmasq", DHCP)
    control = control_of(root / "current" / "cluster.yaml")
    address = _address(bind, "--bind") if bind else control.address
    http_port = port or control.http_port
    if install or show:
        units = boot_units(root, address, http_port, control if dnsmasq else None,
                           shutil.which("dnsmasq") or "/usr/sbin/dnsmasq")
        if show:
            for unit in units:
                typer.echo(f"# {UNIT_DIR / unit.name}\n{unit.text}")
            return
        require_systemd("builder pxe serve")
        if dnsmasq:  # the boot server writes it again when it starts
            (root / "dnsmasq.conf").write_text(dnsmasq_config(root, control))
            check_dnsmasq(root / "dnsmasq.conf")
        for done in install_units(units):
            typer.echo(f"{done.name:<24} {done.state}; enabled at boot, running")
        typer.echo(f"serving {root.resolve()} on http://{address}:{http_port}/ under systemd "
                   f"(`systemctl status {BOOT_UNIT}`, `journalctl -u {BOOT_UNIT}`)")
        return
    config = None
    if control.subnet:
        config = root / "dnsmasq.conf"
        config.write_text(dnsmasq_config(root, control))
        check_dnsmasq(config)
    elif dnsmasq:
        dnsmasq_config(root, control)  # raises the clear error about control.subnet
    server = http_server(root, address, http_port)
    helper = None
    if dnsmasq:
        assert config is not None
        helper = start_server(["dnsmasq", "--keep-in-foreground", f"--conf-file={config}"])
    typer.echo(f"serving {root.resolve()} on http://{address}:{http_port}/ (boot script /current/boot.ipxe)"
               + (f"; dnsmasq config {config}" if config else ""), err=True)
    notify_ready()  # under systemd (the unit --install writes): listening now
    try:
        server.serve_forever()
    except (KeyboardInterrupt, Stopped):
        pass  # the way to stop serving
    finally:
        server.server_close()
        if helper is not None:
            stop(helper)


def _address(value: str, what: str) -> str:
    try:
        return str(TypeAdapter(Address).validate_python(value))
    except ValidationError:
        raise RecipeError(f"{what} {value!r}: not an IP address or host name", f"e.g. {what} 10.0.0.1") from None


@pxe_app.command()
def push(
    registry: Annotated[str, typer.Option("--registry", "-r", metavar="HOST/REPO", help="Where to push it.")],
    folder: Annotated[Path | None, typer.Option("--dir", help="A netboot set folder (from `builder pxe build`).")
                      ] = None,
    as_json: JsonOpt = False,
    old_d: Annotated[Path | None, typer.Option("-d", hidden=True)] = None,
) -> None:
    """Push a netboot set as an OCI artifact, verified by digest, tagged netboot-TARGET-VARIANT[-IMAGEDIGEST]."""
    if old_d is not None:  # -d is --detach elsewhere
        deprecated("-d DIR", "--dir DIR")
        folder = folder or old_d
    if folder is None:
        raise RecipeError("builder pxe push: no netboot set folder given", "builder pxe push --dir DIR --registry R")
    check_input(folder, "--dir", folder=True)
    repo = Repository.parse(registry)
    digest, tags = push_netboot(folder, repo)
    emit(as_json, {"repository": str(repo), "digest": digest, "tags": list(tags)},
         [f"pushed: {repo}@{digest}", *(f"tag     {repo}:{tag}" for tag in tags)])


@pxe_app.command()
def pull(
    reference: Annotated[str, typer.Argument(metavar="REF", help="HOST/REPO:TAG or HOST/REPO@sha256:….")],
    dest: Annotated[Path, typer.Option("--dest", help="Where netboot sets are kept.")] = Path("pxe-root/artifacts"),
    as_json: JsonOpt = False,
) -> None:
    """Fetch a netboot set, check every file's sha256 against its manifest, then switch DEST/TARGET-VARIANT
    to it atomically (the files live in DEST/sets/). `builder pxe publish --artifacts DEST` boots nodes from it."""
    check_output(dest, "--dest", folder=True)
    dest.mkdir(parents=True, exist_ok=True)
    # The lock lives in the cache, not in DEST: a pull that is refused leaves nothing in DEST.
    where = hashlib.sha256(str(dest.resolve()).encode()).hexdigest()[:16]
    with locked(lock_file(f"pull-{where}"), f"pulling into {dest}"):
        # Holding the lock, nothing else pulls here: half-made sets and links are left-overs of a killed pull.
        for leftover in [*(dest / "sets").glob(".pull-*"), *dest.glob(".*.link")]:
            remove_path(leftover)
        final = pull_netboot(reference, dest)
    emit(as_json, {"reference": reference, "folder": str(final)}, [f"pulled {reference} into {final}"])
