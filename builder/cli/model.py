"""`builder model …`: a locked model to and from an OCI registry (the CNCF ModelPack layout)."""

import hashlib
from pathlib import Path
from typing import Annotated

import typer

from builder.cli.common import JsonOpt, emit
from builder.cli.conventions import check_input, check_output
from builder.cluster.modelpack import check_sha256, leftovers, pull_model, push_model
from builder.core.locks import lock_file, locked
from builder.engines.cleanup import remove_path

model_app = typer.Typer(help="Models in an OCI registry, as CNCF ModelPack artifacts, by digest.",
                        no_args_is_help=True)

Sha256Opt = Annotated[str | None, typer.Option(
    "--sha256", metavar="SHA256", help="The model's sha256 (a GGUF's, or a folder's `builder cluster hash-model`); "
    "anything else is refused.")]


@model_app.command()
def push(
    model: Annotated[Path, typer.Argument(metavar="FILE_OR_DIR", help="A GGUF file or a Hugging Face model folder.")],
    registry: Annotated[str, typer.Option("--registry", "-r", metavar="HOST/REPO[:TAG]",
                                          help="Where to push it, e.g. registry.lan:5000/models/qwen:q4.")],
    sha256: Sha256Opt = None,
    as_json: JsonOpt = False,
) -> None:
    """Push a model as a ModelPack artifact: every file a layer, pushed by digest, checked, then tagged.

    Tags: TAG when given, then sha256-<the model's sha256> (so a box that knows only the sha256 can pull it).
    The model's sha256 is recorded in the artifact; `builder model pull` checks it.
    """
    expected = check_sha256(sha256) if sha256 is not None else None
    check_input(model, "FILE_OR_DIR")
    pushed = push_model(model, registry, expected)
    emit(as_json, {"repository": pushed.repository, "digest": pushed.digest, "sha256": pushed.sha256,
                   "folder": pushed.folder, "tags": list(pushed.tags), "size": pushed.size},
         [f"pushed: {pushed.repository}@{pushed.digest}",
          f"model   sha256 {pushed.sha256} ({'folder' if pushed.folder else 'GGUF'}, {pushed.size} bytes)",
          *(f"tag     {pushed.repository}:{tag}" for tag in pushed.tags)])


@model_app.command()
def pull(
    reference: Annotated[str, typer.Argument(metavar="REF", help="HOST/REPO:TAG or HOST/REPO@sha256:….")],
    dest: Annotated[Path, typer.Option("--dest", help="The folder where this machine keeps its models.")],
    sha256: Sha256Opt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fetch a model, check every blob's digest and the model's sha256, then place it under DEST by its sha256.

    A GGUF becomes DEST/<sha256>.gguf, a folder DEST/<sha256>/ (the names `builder cluster commands` uses on
    boxes), with one rename once every byte matched; a pull that fails or is interrupted places nothing. A model
    already in DEST under its sha256 is not fetched again.
    """
    expected = check_sha256(sha256) if sha256 is not None else None
    check_output(dest, "--dest", folder=True)
    dest.mkdir(parents=True, exist_ok=True)
    # The lock lives in the cache, not in DEST; holding it, a .pull-* folder is a killed pull's left-over.
    where = hashlib.sha256(str(dest.resolve()).encode()).hexdigest()[:16]
    with locked(lock_file(f"model-pull-{where}"), f"pulling into {dest}"):
        for leftover in leftovers(dest):
            remove_path(leftover)
        pulled = pull_model(reference, dest, expected)
    state = "pulled" if pulled.fetched else "already there, nothing fetched:"
    emit(as_json, {"reference": pulled.reference, "digest": pulled.digest, "sha256": pulled.sha256,
                   "folder": pulled.folder, "path": str(pulled.path), "fetched": pulled.fetched},
         [f"{state} {reference} -> {pulled.path}"])
