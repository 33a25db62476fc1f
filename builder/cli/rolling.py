"""`builder cluster drain|enable|roll`: take a node out of the gateway's rotation and back, and move nodes to a
netboot generation one at a time (builder/cluster/roll.py)."""

from pathlib import Path
from typing import Annotated

import typer

from builder.cli.cluster import InventoryArg, LocalOpt, _loaded, cluster_app
from builder.cluster import roll as rolling
from builder.core.errors import RecipeError
from builder.recipe.load import display_path

NodeArg = Annotated[str, typer.Argument(metavar="NODE", help="A node of the cluster file that runs a server.")]


def _node(loaded_path: Path, names: list[str], node: str) -> str:
    if node not in names:
        raise RecipeError(f"{display_path(loaded_path)}: no node {node[:40]!r}",
                          f"nodes: {', '.join(names) or 'none'}")
    return node


@cluster_app.command()
def drain(
    inventory: InventoryArg,
    node: NodeArg,
    is_local: LocalOpt = False,
    timeout: Annotated[float, typer.Option(
        help="Seconds to wait for the requests in flight on the node to finish.")] = 600,
) -> None:
    """Take NODE's servers out of the gateway's rotation: no new requests go to them, the ones in flight finish.

    Returns once no request is left on the node (or fails after --timeout, the node left drained). Health checks
    go on, so `builder cluster status` still shows whether it serves. Through HAProxy's runtime API, a socket
    file in the gateway's state folder on the control node; `builder cluster enable` puts the node back, and a
    reload of the gateway (`builder cluster up` with a changed file) keeps it drained.
    """
    loaded = _loaded(inventory, is_local)
    name = _node(loaded.path, [n.name for n in loaded.cluster.nodes], node)
    backends = rolling.drain(rolling.gateway_state(loaded, is_local), name, timeout, typer.echo)
    typer.echo(f"{name} drained ({', '.join(b.removeprefix('svc_') for b in backends)}): no requests in flight")


@cluster_app.command()
def enable(inventory: InventoryArg, node: NodeArg, is_local: LocalOpt = False) -> None:
    """Put NODE's servers back into the gateway's rotation (after `builder cluster drain`); a server that fails
    its health check still gets no requests until it passes."""
    loaded = _loaded(inventory, is_local)
    name = _node(loaded.path, [n.name for n in loaded.cluster.nodes], node)
    backends = rolling.enable(rolling.gateway_state(loaded, is_local), name)
    typer.echo(f"{name} enabled ({', '.join(b.removeprefix('svc_') for b in backends)})")

