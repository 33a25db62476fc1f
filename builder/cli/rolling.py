"""`builder cluster drain|enable|roll`: take a node out of the gateway's rotation and back, and move nodes to a
netboot generation one at a time (builder/cluster/roll.py)."""

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from builder.cli.cluster import InventoryArg, LocalOpt, _loaded, cluster_app
from builder.cli.common import JsonOpt, RecipesOpt
from builder.cli.conventions import check_input
from builder.cluster import roll as rolling
from builder.cluster.model import Loaded
from builder.cluster.ssh import reboot as reboot_node
from builder.core.errors import BuilderError, CommandError, RecipeError
from builder.core.run import run
from builder.recipe.load import display_path

NodeArg = Annotated[str, typer.Argument(metavar="NODE", help="A node of the cluster file that runs a server.")]
# The longest a --reboot-command may take (it starts the reboot; the roll then waits for the node).
REBOOT_COMMAND_SECONDS = 300


def _node(loaded_path: Path, names: list[str], node: str, what: str = "node") -> str:
    if node not in names:
        raise RecipeError(f"{display_path(loaded_path)}: no {what} {node[:40]!r}",
                          f"{what}s: {', '.join(names) or 'none'}")
    return node


@cluster_app.command()
def drain(
    inventory: InventoryArg,
    node: NodeArg,
    is_local: LocalOpt = False,
    timeout: Annotated[float, typer.Option(
        help="Seconds to wait for the requests in flight on the node to finish.", min=1)] = 600,
    as_json: JsonOpt = False,
    recipes: RecipesOpt = None,
) -> None:
    """Take NODE's servers out of the gateway's rotation: no new requests go to them, the ones in flight finish.

    Returns once no request is left on the node (or exits 1 after --timeout, the node left drained). Health checks
    go on, so `builder cluster status` still shows whether it serves. Through HAProxy's runtime API, a socket file
    in the gateway's state folder on the control node. `builder cluster enable` puts the node back; a reload of the
    gateway (`builder cluster up` with a changed file) keeps it drained.
    """
    loaded = _loaded(inventory, is_local)
    name = _node(loaded.path, [n.name for n in loaded.cluster.nodes], node)
    backends = rolling.drain(rolling.gateway_state(loaded, is_local), name, timeout,
                             lambda line: typer.echo(line, err=as_json))
    services = [b.removeprefix("svc_") for b in backends]
    if as_json:
        typer.echo(json.dumps({"node": name, "state": "drain", "services": services}))
    else:
        typer.echo(f"{name} drained ({', '.join(services)}): no requests in flight")


@cluster_app.command()
def enable(inventory: InventoryArg, node: NodeArg, is_local: LocalOpt = False, as_json: JsonOpt = False,
           recipes: RecipesOpt = None) -> None:
    """Put NODE's servers back into the gateway's rotation (after `builder cluster drain`); a server that fails its
    health check still gets no requests until it passes."""
    loaded = _loaded(inventory, is_local)
    name = _node(loaded.path, [n.name for n in loaded.cluster.nodes], node)
    services = [b.removeprefix("svc_") for b in rolling.enable(rolling.gateway_state(loaded, is_local), name)]
    if as_json:
        typer.echo(json.dumps({"node": name, "state": "ready", "services": services}))
    else:
        typer.echo(f"{name} enabled ({', '.join(services)})")


def _reboot_with(command: str | None, loaded: Loaded, identity: Path | None) -> rolling.Reboot:
    """What reboots a node: the operator's command with {node} replaced by the node's name, else `builder cluster
    reboot` over ssh when the file has admins:, else a prompt."""
    if command is not None:
        try:
            words = shlex.split(command)
        except ValueError as exc:
            raise RecipeError(f"--reboot-command: cannot be split into words ({exc})", "quote it as a shell would") \
                from None
        if not words or not any("{node}" in w for w in words):
            raise RecipeError("--reboot-command: must name the node as {node}",
                              "e.g. --reboot-command 'ipmitool -H {node}-bmc chassis power cycle'")

        def by_command(node: str) -> None:
            argv = [w.replace("{node}", node) for w in words]
            try:
                run(argv, timeout=REBOOT_COMMAND_SECONDS)
            except CommandError as exc:
                raise BuilderError(f"the reboot command for {node} failed: {exc.message}", exc.hint) from None
        return by_command
    if loaded.cluster.admins is not None:

        def by_ssh(node: str) -> None:
            reboot_node(loaded, node, identity, typer.echo)
        return by_ssh
    if not sys.stdin.isatty():
        raise RecipeError("cluster roll: nothing reboots the nodes and there is no terminal to ask you",
                          "pass --reboot-command 'CMD {node}' (run for each node), or run it in a terminal")

    def by_hand(node: str) -> None:
        typer.prompt(f"reboot {node} now (power-cycle it, or reboot it from its console), then press Enter",
                     default="", show_default=False, prompt_suffix=" ")
    return by_hand


@cluster_app.command()
def roll(
    inventory: InventoryArg,
    canary: Annotated[str | None, typer.Option(
        metavar="NODE", help="Move this node (and the nodes of its split service) first.")] = None,
    generation: Annotated[str, typer.Option(
        metavar="ID", help="The generation to move to: an id, a unique start of one, `current` or `previous`.")
    ] = "current",
    root: Annotated[Path, typer.Option("--root", help="The pxe-root folder the control node serves.")
                    ] = Path("pxe-root"),
    reboot_command: Annotated[str | None, typer.Option(
        metavar="CMD", help="Run for each node to reboot it, {node} replaced by its name (e.g. a BMC's power "
        "cycle). Without it, a file with admins: reboots each node over ssh (`builder cluster reboot`); "
        "otherwise builder asks you to reboot each node and press Enter.")] = None,
    identity: Annotated[Path | None, typer.Option(
        "--identity", "-i", help="Private key for the ssh reboot (default: your ssh agent's and ~/.ssh keys).")
    ] = None,
    timeout: Annotated[float, typer.Option(
        help="Seconds for a node to go down and serve again after its reboot.", min=1)] = 900,
    drain_timeout: Annotated[float, typer.Option(
        help="Seconds for the requests in flight on a node to finish.", min=1)] = 600,
    recipes: RecipesOpt = None,
) -> None:
    """Move the netbooted nodes to a generation one at a time, without losing a request.

    For each node (a split service's head and workers together): drain it in the gateway, pin its boot files to
    the generation (`builder pxe pin`), reboot it, wait until its servers pass their health checks (and its agent's
    device check), enable it. When that fails the node is pinned back to the generation it ran, rebooted, and the
    roll stops (exit 1). After the last node the generation becomes current and the pins are cleared.
    """
    loaded = _loaded(inventory, False)
    check_input(root, "--root", folder=True)
    booted = [n.name for n in loaded.cluster.netbooted]
    if canary is not None:
        _node(loaded.path, booted, canary, "netbooted node")
    if identity is not None:
        check_input(identity, "--identity", folder=False)
    reboot = _reboot_with(reboot_command, loaded, identity)
    plan = rolling.plan(loaded, root, generation, canary)
    rolling.roll(loaded, rolling.gateway_state(loaded, False), root, plan, reboot, timeout, drain_timeout,
                 typer.echo)
