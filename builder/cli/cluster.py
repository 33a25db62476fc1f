"""`builder cluster …`: bring a cluster file's services up behind one gateway, look at them, take them down."""

import json
from pathlib import Path
from typing import Annotated

import typer
import yaml

from builder.cli.common import JSON_ERRORS, JsonOpt, RecipesOpt, emit
from builder.cli.conventions import check_input, check_output
from builder.cluster import firewall as node_firewall
from builder.cluster import local
from builder.cluster import remote as netboot_gateway
from builder.cluster.commands import as_text, node_commands
from builder.cluster.convert import convert as convert_form
from builder.cluster.convert import is_old_form
from builder.cluster.export_ansible import export_ansible
from builder.cluster.export_kube import Export, Models, export_kube, published_images
from builder.cluster.export_prometheus import export_prometheus
from builder.cluster.export_quadlet import MIN_PODMAN, export_quadlet
from builder.cluster.hfmodel import folder_hash
from builder.cluster.model import Loaded, ServiceCluster, load_cluster
from builder.cluster.nodelogs import MAX_LINES, read_logs
from builder.cluster.nodestate import problems as state_problems
from builder.cluster.ssh import reboot as reboot_node
from builder.cluster.wake import chosen
from builder.cluster.wake import wake as wake_nodes
from builder.core.errors import RecipeError
from builder.core.preflight import GATEWAY, GATEWAY_UNIT, require_tools
from builder.core.units import UNIT_DIR
from builder.engines import ENGINE_CHOICES
from builder.netboot.firewall import ruleset
from builder.recipe.load import display_path, load_yaml
from builder.recipe.targets import did_you_mean
from builder.registry.client import Repository

cluster_app = typer.Typer(help="Services of a cluster file behind one OpenAI-compatible gateway.",
                          no_args_is_help=True)

InventoryArg = Annotated[Path, typer.Argument(metavar="FILE", help="The cluster file (cluster.yaml) with services:.")]
LocalOpt = Annotated[bool, typer.Option("--local", help="Every node a container on this machine (127.0.0.11, …).")]
EngineOpt = Annotated[str | None, typer.Option(
    "--engine", "-e", help=f"Container engine: {', '.join(ENGINE_CHOICES)} (default: the one `up` used).")]


def _loaded(inventory: Path, is_local: bool) -> Loaded:
    loaded = load_cluster(inventory)
    if not is_local:
        netboot_gateway.addresses(loaded)  # every server's node needs its address: one line now
        netboot_gateway.bind_address(loaded)
    for line in loaded.notes:
        typer.echo(f"note: {line}", err=True)
    for warning in loaded.warnings:
        typer.echo(f"warning: {warning}", err=True)
    return loaded


@cluster_app.command()
def up(
    inventory: InventoryArg,
    is_local: LocalOpt = False,
    engine: EngineOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for every server to be healthy.")] = 180,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Netbooted nodes: fail (and stop the gateway) unless every server is healthy; by default "
        "the gateway serves what is healthy and names what is DOWN.")] = False,
    as_json: JsonOpt = False,
    recipes: RecipesOpt = None,
    install: Annotated[bool, typer.Option(
        "--install", help=f"Without --local: run the gateway as a systemd unit in {UNIT_DIR}, enabled at boot "
        "(needs root); later `up`s reload it, `down` disables it, and it stays when servers are not healthy yet "
        "(nodes may boot later).")] = False,
    show: Annotated[bool, typer.Option("--print", help="Print the unit --install writes; install nothing.")
                    ] = False,
) -> None:
    """Start every service's servers and RPC workers and the gateway; print the endpoint and the key's file.

    Without --local the nodes start their own servers (netbooted by `builder pxe publish`, or on an installed OS
    from `cluster commands` lines or `cluster export` units): `up` starts only the gateway, on this (the
    control) node, and waits until every server is healthy behind it. A node that is off or broken does not
    hold the others back: after --timeout the gateway serves the healthy servers and each one still DOWN is a
    warning line (an error only when none is healthy, or with --strict). With --local every container must
    come up. Running it again starts only what is not running. If it fails, what it started is removed again.
    """
    if (install or show) and is_local:
        raise RecipeError("builder cluster up --install: --local clusters are containers on this machine; the "
                          "unit is for the gateway of netbooted nodes", "leave out --local (or --install)")
    loaded = _loaded(inventory, is_local)
    require_tools("builder cluster up", GATEWAY_UNIT if install else GATEWAY)
    if show:
        unit = netboot_gateway.unit_of(netboot_gateway.Remote.of(loaded))
        typer.echo(f"# {UNIT_DIR / unit.name}\n{unit.text}", nl=False)
        return

    def say(line: str) -> None:
        typer.echo(line, err=True)

    if is_local:
        state = local.up(loaded, engine, timeout, say).state
        document = local.status(loaded, engine)
    else:
        state = netboot_gateway.up(loaded, timeout, say, strict, installed=install).state
        document = netboot_gateway.status(loaded)
    gateway: dict[str, str] = document["gateway"]  # type: ignore[assignment]
    emit(as_json, {"state": state, **document}, [
        f"endpoint  {gateway['endpoint']}",
        f"key       {gateway['key_file']}  (send Authorization: Bearer $(cat FILE))",
        f"models    {', '.join(s.name for s in loaded.cluster.services)}",
        f"metrics   {gateway['metrics']}",
        f"state     {state}"])


@cluster_app.command()
def down(inventory: InventoryArg, is_local: LocalOpt = False, engine: EngineOpt = None, as_json: JsonOpt = False,
         recipes: RecipesOpt = None) -> None:
    """Remove the cluster's containers and stop its gateway (the API key is kept for the next `up`).

    Without --local: stop the gateway; netbooted nodes keep running."""
    loaded = _loaded(inventory, is_local)
    removed = local.down(loaded, engine) if is_local else netboot_gateway.down(loaded)
    emit(as_json, {"removed": list(removed)}, [f"removed {', '.join(removed)}" if removed else "nothing was running"])


@cluster_app.command()
def status(
    inventory: InventoryArg,
    is_local: LocalOpt = False,
    engine: EngineOpt = None,
    as_json: JsonOpt = False,
    recipes: RecipesOpt = None,
    root: Annotated[Path | None, typer.Option(
        "--root", help="The pxe-root folder the control node serves: which generation each netbooted node should "
        "run (default: pxe-root, when there is one).")] = None,
) -> None:
    """Every service, its servers and workers, and their health as the gateway sees it; each netbooted node's
    units and state (device check, image, generation, qualification, last error) as its agent reports them.

    Exits 1 when the gateway is not running, a server or worker is not UP, a unit of a netbooted node is not
    active (failed, restarting, stopped), a node's device is degraded (unless its env allows the fallback), its
    qualification failed, or it runs another generation than its pin's or the current one (the last line says
    which), so a script or a monitoring check can act on it; 0 when everything serves.
    """
    loaded = _loaded(inventory, is_local)
    if root is not None:
        check_input(root, "--root", folder=True)
    elif not is_local and Path("pxe-root").is_dir():
        root = Path("pxe-root")
    elif not is_local and loaded.cluster.netbooted:
        typer.echo("note: no pxe-root folder in the current directory: which generation each node runs is not "
                   "checked (give --root)", err=True)
    document = local.status(loaded, engine) if is_local else netboot_gateway.status(loaded, root)
    problems = _problems(document)
    gateway: dict[str, object] = document["gateway"]  # type: ignore[assignment]
    lines = [f"gateway  {gateway['endpoint']}  {'running' if gateway['running'] else 'DOWN'}"]
    for n in document["nodes"]:  # type: ignore[attr-defined]
        hardware = n["target"] or ", ".join(f"{name} {d['target']}" for name, d in n["devices"].items())
        key = f"  ssh {n['ssh_host_key'] or 'host key not reported'}" if "ssh_host_key" in n else ""
        lines.append(f"node     {n['name']:<12} {n['address']:<21} {hardware}{key}")
        lines += [f"  {n['name']:<12} unit       {unit:<40} {state}" for unit, state in (n.get("units") or {}).items()]
        lines += [f"  {n['name']:<12} {label:<10} {value}" for label, value in _state_lines(n)]
    for service in document["services"]:  # type: ignore[attr-defined]
        lines.append(f"service  {service['name']} ({service['topology']})")
        for p in service["processes"]:
            extra = f"  {p['active']} active, {p['requests']} served" if "requests" in p else ""
            where = f"container {p['container']}" if "container" in p else ""
            why = f"  ({p['why']})" if "why" in p else ""
            lines.append(f"  {p['node']:<12} {p['role']:<10} {p['address']:<21} {p['health']:<8} {where}{extra}{why}"
                         .rstrip())
    lines.append(f"state    NOT SERVING: {'; '.join(problems)}" if problems else "state    serving")
    emit(as_json, {**document, "ok": not problems, "problems": problems}, lines)
    if problems:
        raise typer.Exit(1)


def _state_lines(n: dict[str, object]) -> list[tuple[str, str]]:
    """A netbooted node's state as `cluster status` prints it: (label, value) lines."""
    if "state" not in n:
        return []
    state = n["state"]
    if not isinstance(state, dict):
        return [("state", f"not reported: {n['state_why']}")]
    out = []
    gen = state.get("generation")
    if isinstance(gen, dict):
        should = f"{'pinned to' if gen['pinned'] else 'current'} {gen['expected'] or 'none'}"
        out.append(("generation", f"{gen['running'] or 'unknown'} ({should})"))
    boot = state["boot"]
    out.append(("booted", f"root {str(boot['root'] or '?')[:16]}  plan {str(boot['plan'] or '?')[:16]}"))
    if "image" in state:
        name = state["image"].get("name")
        out.append(("image", state["image"]["digest"] + (f" ({name})" if name else "")))
    if "device" in state:
        device = state["device"]
        listed = ", ".join(device["devices"]) or "none"
        out.append(("device", f"{device['state']} (lists {listed}){': ' + device['why'] if device['why'] else ''}"))
    if "qualification" in state:
        q = state["qualification"]
        on = f" on {q['device']}" if q["device"] else ""
        out.append(("qualify", f"{q['state']}{on}{': ' + q['why'] if q['why'] else ''}"))
    if state.get("last_error"):
        out.append(("last error", state["last_error"]))
    return out


def _problems(document: dict[str, object]) -> list[str]:
    """What is not serving: the gateway, and every process whose health is not UP (an RPC worker on a data network
    the control node is not on is `unchecked`: not a problem, its head's health check covers it)."""
    gateway: dict[str, object] = document["gateway"]  # type: ignore[assignment]
    found = [] if gateway["running"] else ["the gateway is not running"]
    for n in document["nodes"]:  # type: ignore[attr-defined]
        # a netbooted node's units (its agent's report): each must be active (a node that does not answer has
        # its processes' health said below)
        found += [f"{unit} on {n['name']} is {state}" for unit, state in (n.get("units") or {}).items()
                  if not state.startswith("active/")]
        found += state_problems(n["name"], n)  # its device, qualification and generation (its agent's report)
    for service in document["services"]:  # type: ignore[attr-defined]
        found += [f"{service['name']} {p['role']} on {p['node']} is {p['health']}"
                  + (f" ({p['why']})" if "why" in p else "") for p in service["processes"]
                  if p["health"] not in ("UP", "unchecked")]
    return found


@cluster_app.command()
def logs(
    inventory: InventoryArg,
    node: Annotated[str | None, typer.Argument(
        metavar="NODE", help="The netbooted node to read (with --local: only containers whose name contains "
        "this, e.g. a node or NODE-SERVICE).")] = None,
    service: Annotated[str | None, typer.Argument(
        metavar="SERVICE", help="A service the node runs: its processes' output (default: the node's own log).")
                       ] = None,
    is_local: LocalOpt = False,
    engine: EngineOpt = None,
    lines: Annotated[int, typer.Option("--lines", "-n", help="Lines per log (per container with --local).",
                                       min=0, max=MAX_LINES)] = 50,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines until Ctrl-C "
                                         "(netbooted nodes).")] = False,
    recipes: RecipesOpt = None,
) -> None:
    """The last lines of a netbooted node's journal: its own units', or a service's processes' on it.

    builder reads the node's journal over HTTP (systemd-journal-gatewayd on the node's address, port 19531, which
    the node's firewall admits from the control node only); its console has the same lines. With --local, every
    container's output (NODE filters by name).
    """
    if is_local:
        if follow:
            raise RecipeError("builder cluster logs --local: --follow is for netbooted nodes",
                              "use your engine's `logs -f` on a container that `cluster status --local` lists")
        only = node if service is None else f"{node}-{service}"
        local.logs(_loaded(inventory, is_local), engine, only, lines)
        return
    read_logs(load_cluster(inventory), node, service, lines, follow)


@cluster_app.command()
def commands(
    inventory: InventoryArg,
    node: Annotated[str | None, typer.Option("--node", help="Only this node's commands.")] = None,
    models: Annotated[str, typer.Option("--models", help="The folder where each node keeps its models, each named "
                                        "by its sha256 (SHA256.gguf, a model folder SHA256/).")] = "/srv/models",
    registry: Annotated[str | None, typer.Option(
        "--registry", "-r", metavar="HOST/REPO", help="Each line runs the image `builder publish` pushed there, by "
        "digest (--image REPO@sha256:…), so no box builds one (default: the box's own build of the target).")
    ] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="One object per node: node, address, models (service, model, sha256, path on the box), "
        f"argv lists, environment (variables to export first), not_covered ({JSON_ERRORS}).")] = False,
    recipes: RecipesOpt = None,
) -> None:
    """The `builder run` commands each node runs, for nodes builder does not netboot (e.g. NVIDIA boxes).

    RPC workers first, then the llama-servers and vLLM servers, then a cpu vLLM pipeline's other nodes, each
    bound to its node's address; then `builder cluster up` on the control node starts the gateway in front of
    them. Each box keeps its models under --models named by sha256: copy each file (or model folder) there
    under the name printed beside it; every line checks it with `builder run --model-sha256` before the
    container starts. A Ray pipeline (GPU variants) is not listed (each node's Ray container needs the model).
    With --registry, every line runs the published image by digest (refused if it was never published).
    """
    if not models.startswith("/") or any(c in models for c in "\n\r\t\0"):
        raise RecipeError(f"--models: {models!r} is not an absolute folder path", "e.g. --models /srv/models")
    repo = Repository.parse(registry) if registry is not None else None
    loaded = _loaded(inventory, is_local=False)
    found = node_commands(loaded, models, published_images(repo) if repo else None)
    if node is not None:
        found = [entry for entry in found if entry.node == node]
        if not found:
            raise RecipeError(f"{inventory}: no node named {node!r} runs a service",
                              f"nodes: {', '.join(e.node for e in node_commands(loaded, models))}")
    emit(as_json, [{"node": e.node, "address": e.address,
                    "models": [{"service": m.service, "model": m.source, "sha256": m.sha256, "path": m.path}
                               for m in e.models],
                    "argv": [list(a) for a in e.argv], "environment": list(e.environment),
                    "not_covered": list(e.skipped)} for e in found], as_text(found, models))


# `builder cluster export --format`: the formats it writes.
EXPORT_FORMATS = ("kube", "quadlet", "ansible", "prometheus")


@cluster_app.command()
def export(
    inventory: InventoryArg,
    form: Annotated[str, typer.Option("--format", help="kube: Kubernetes manifests; quadlet: podman "
                                      f"Quadlet units per node (podman {MIN_PODMAN}+); ansible: an inventory and "
                                      "a playbook that place those units on the nodes without a mac; prometheus: a "
                                      "scrape config for the netbooted nodes' exporters (admins:).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The folder the files go into (created if missing).")],
    registry: Annotated[str | None, typer.Option(
        "--registry", "-r", metavar="HOST/REPO", help="Run the images `builder publish` pushed there, by digest "
        "(default: the local tags, which every node must then have).")] = None,
    models: Annotated[str, typer.Option("--models", help="The folder each node keeps its models in, named by "
                                        "sha256 (as `cluster commands` names them).")] = "/srv/models",
    claim: Annotated[str | None, typer.Option("--models-claim", metavar="PVC", help="Mount the models from this "
                                              "PersistentVolumeClaim (at --models) instead of each node's "
                                              "folder.")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help=f"files, images, warnings and steps (what to run before applying) ({JSON_ERRORS}).")] = False,
    recipes: RecipesOpt = None,
) -> None:
    """Write the cluster's servers, workers and gateway as files another tool runs (docs/clusters.md).

    kube: a Deployment per server and RPC worker, pinned to its node on the host network, a Service per
    service, a LeaderWorkerSet per vLLM pipeline, and the gateway (HAProxy) as a Deployment with its config in
    a ConfigMap. The API key goes into a Secret you create (the command is printed; the key is in no file
    this writes). Every container runs the arguments `builder cluster commands` prints for it.

    quadlet: per node a folder of units for /etc/containers/systemd/: a .container per server and RPC worker
    (restarted by systemd, the model's sha256 checked before it starts, the variant's devices, groups and
    security options), a .volume for each RPC worker's tensor cache.

    ansible: inventory.yml (the nodes without a mac, at their addresses, grouped per target and per service)
    and site.yml, which installs podman, fetches each model from the control node's `builder pxe serve` by
    sha256, loads the node's firewall, places the quadlet units and starts them (ansible-core's own modules).
    prometheus: prometheus.yml, a scrape config with every netbooted node's exporter (admins.metrics_port).
    """
    if form not in EXPORT_FORMATS:
        raise RecipeError(f"--format: unknown format {form!r}{did_you_mean(form, EXPORT_FORMATS)}",
                          f"formats: {', '.join(EXPORT_FORMATS)}")
    if form != "kube" and claim is not None:
        raise RecipeError("--models-claim: a PersistentVolumeClaim is Kubernetes' (--format kube)",
                          f"{form} mounts each node's --models folder: leave --models-claim out")
    check_output(out, "--out", folder=True)
    if form == "prometheus":
        _report(form, out, export_prometheus(load_cluster(inventory)), False, as_json)
        return
    where = Models(models, claim)
    repo = Repository.parse(registry) if registry is not None else None
    loaded = load_cluster(inventory)
    netboot_gateway.addresses(loaded)  # every server's node needs its address (the gateway binds its pod's own)
    for warning in loaded.warnings:
        typer.echo(f"warning: {warning}", err=True)
    image = published_images(repo) if repo else None
    if form == "kube":
        done = export_kube(loaded, where, str(out), image)
    else:
        done = export_quadlet(loaded, where, str(out), image)
        if form == "ansible":
            done = export_ansible(loaded, where, done)
    _report(form, out, done, repo is None, as_json)


def _report(form: str, out: Path, done: Export, local_tags: bool, as_json: bool) -> None:
    written = done.write(out)
    warnings = list(done.warnings)
    if local_tags:
        warnings.append(f"images are the local tags ({', '.join(sorted(set(done.images.values())))}): every node "
                        "must have them; `builder publish` them and pass --registry to run them by digest")
    if not as_json:
        for line in warnings:
            typer.echo(f"warning: {line}", err=True)
    # prometheus writes one file, which the line names
    emit(as_json, {"format": form, "out": str(out), "files": written, "images": done.images, "warnings": warnings,
                   "steps": list(done.steps)},
         [f"wrote {written[0] if form == 'prometheus' else f'{len(written)} files'} to {out}", "then:",
          *(f"  {step}" for step in done.steps)])


@cluster_app.command()
def schema(
    form: Annotated[str, typer.Option("--form", help="services, the one form (a file in the older netboot-only "
                                      "form is converted on load: see `builder cluster convert`).")] = "services",
) -> None:
    """Print the JSON Schema of a cluster file (docs/clusters.md explains it with examples)."""
    if form == "netboot":
        raise RecipeError("--form netboot: the netboot-only form has no schema of its own any more; builder reads "
                          "such a file as services", "`builder cluster convert FILE` prints it in the services form")
    if form != "services":
        raise RecipeError(f"--form: unknown form {form!r}{did_you_mean(form, ['services'])}", "forms: services")
    typer.echo(json.dumps(ServiceCluster.model_json_schema(), indent=2))


@cluster_app.command()
def convert(file: InventoryArg, as_json: JsonOpt = False, recipes: RecipesOpt = None) -> None:
    """Print a cluster file in the services form: a file in the netboot-only form (nodes with role:) converted
    as builder reads it (each model's sha256 computed), a services-form file as it is."""
    data = load_yaml(file, "cluster", "pass the path of your cluster.yaml")
    if is_old_form(data):
        data = convert_form(data, file)
    load_cluster(file, data)  # what it prints must load: one line now if it does not
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    typer.echo(f"# {display_path(file)} in the services form (docs/clusters.md)")
    typer.echo(yaml.safe_dump(data, sort_keys=False), nl=False)


@cluster_app.command("hash-model")
def hash_model(
    folder: Annotated[Path, typer.Argument(help="A Hugging Face model folder (config.json, weights, tokenizer).")],
    as_json: JsonOpt = False,
) -> None:
    """Print a model folder's content hash: the sha256: a vLLM service gives for its model.

    The same as `(cd DIR && find . -type f -printf '%P\\0' | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum`.
    """
    found = folder_hash(folder, "builder cluster hash-model")
    typer.echo(json.dumps({"folder": str(folder), "hash": found}) if as_json else found)


@cluster_app.command()
def firewall(
    inventory: InventoryArg,
    node: Annotated[str | None, typer.Option("--node", help="Print this node's rules.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write NODE.nft for every node into this folder.")
                   ] = None,
    recipes: RecipesOpt = None,
) -> None:
    """nftables rules for every compute node: new connections only from the cluster's addresses.

    Load one on its node with `nft -f NODE.nft` (it replaces builder's own table, no other rule).
    """
    if out is not None:
        check_output(out, "--out", folder=True)
    found = node_firewall.firewalls(inventory)
    if (node is None) == (out is None):
        raise RecipeError("builder cluster firewall: give --node NAME (print its rules) or --out DIR (every node)",
                          f"nodes: {', '.join(f.node for f in found)}")
    if node is not None:
        chosen = [f for f in found if f.node == node]
        if not chosen:
            raise RecipeError(f"{inventory}: no node named {node!r}", f"nodes: {', '.join(f.node for f in found)}")
        typer.echo(ruleset(chosen[0], inventory.name), nl=False)
        return
    assert out is not None
    out.mkdir(parents=True, exist_ok=True)
    for rules in found:
        (out / f"{rules.node}.nft").write_text(ruleset(rules, inventory.name))
    typer.echo(f"wrote {', '.join(f'{f.node}.nft' for f in found)} to {out}")


@cluster_app.command()
def wake(
    inventory: InventoryArg,
    nodes: Annotated[list[str] | None, typer.Argument(metavar="[NODE]...", help="The nodes to wake.")] = None,
    every: Annotated[bool, typer.Option("--all", help="Wake every node of the file.")] = False,
    as_json: JsonOpt = False,
    recipes: RecipesOpt = None,
) -> None:
    """Power nodes on with Wake-on-LAN: a magic packet on control.interface (needs etherwake, run as root).

    The node's firmware must have Wake-on-LAN enabled; it then netboots as usual.
    """
    loaded = load_cluster(inventory)
    woken = wake_nodes(loaded, chosen(loaded, list(nodes or []), every))
    emit(as_json, [{"node": w.node, "mac": w.mac, "interface": w.interface} for w in woken],
         [f"woke {w.node} ({w.mac}) on {w.interface}" for w in woken])


@cluster_app.command()
def reboot(
    inventory: InventoryArg,
    node: Annotated[str, typer.Argument(metavar="NODE", help="The netbooted node to reboot.")],
    identity: Annotated[Path | None, typer.Option(
        "--identity", "-i", help="Private key to log in with (default: your ssh agent's and ~/.ssh keys).")] = None,
    as_json: JsonOpt = False,
    recipes: RecipesOpt = None,
) -> None:
    """Reboot a netbooted node over ssh, as root with a key of admins: (the node netboots its current generation).

    Your own ssh client and agent log in; builder sets every ssh option (no password, no prompt). The node's
    host key is pinned on first contact from what its agent reports (its console prints the same fingerprint),
    and checked from then on.
    """
    if identity is not None:
        check_input(identity, "--identity", folder=False)
    loaded = load_cluster(inventory)
    t = reboot_node(loaded, node, identity, lambda line: typer.echo(line, err=as_json))
    emit(as_json, {"node": t.node, "address": t.address, "port": t.port, "rebooting": True},
         [f"rebooting {t.node} ({t.address}): it netboots its current generation"])
