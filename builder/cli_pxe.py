"""`builder pxe …`: netboot sets in registries (push, pull). Errors go up to cli.main like every verb's."""

from pathlib import Path
from typing import Annotated

import typer

from builder.artifacts import pull_netboot, push_netboot
from builder.registry import Repository

pxe_app = typer.Typer(help="Netboot sets: kernel, initrd and root squashfs of an image.", no_args_is_help=True)


@pxe_app.command()
def push(
    folder: Annotated[Path, typer.Option("--dir", "-d", help="A netboot set folder (from `builder pxe build`).")],
    registry: Annotated[str, typer.Option("--registry", "-r", metavar="HOST/REPO", help="Where to push it.")],
) -> None:
    """Push a netboot set as an OCI artifact, verified by digest, tagged netboot-TARGET-VARIANT[-IMAGEDIGEST]."""
    repo = Repository.parse(registry)
    digest, tags = push_netboot(folder, repo)
    typer.echo(f"pushed: {repo}@{digest}")
    for tag in tags:
        typer.echo(f"tag     {repo}:{tag}")


@pxe_app.command()
def pull(
    reference: Annotated[str, typer.Argument(metavar="REF", help="HOST/REPO:TAG or HOST/REPO@sha256:….")],
    dest: Annotated[Path, typer.Option("--dest", help="The netboot tree (default: pxe-root).")] = Path("pxe-root"),
) -> None:
    """Fetch a netboot set, check every file's sha256 against its manifest, then switch DEST/TARGET-VARIANT
    to it atomically (the files live in DEST/generations/)."""
    final = pull_netboot(reference, dest)
    typer.echo(f"pulled {reference} into {final}")
