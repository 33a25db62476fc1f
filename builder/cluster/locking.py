"""`builder lock CLUSTER.yaml`: resolve every `hf://` model of a cluster file on the hub and record it in the
cluster.lock beside the file (modellock.py), or with `check` say where the lock and the hub disagree."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from builder.cluster import hub, modellock
from builder.cluster.model import ServiceCluster
from builder.core.errors import RecipeError
from builder.recipe.load import display_path, load_yaml, validated


@dataclass(frozen=True)
class Locked:
    lock: Path
    models: dict[str, modellock.LockedModel]  # what this cluster file's hf:// models resolved to
    changed: tuple[str, ...]  # names whose entry is new or differs from the lock's


def _hub_models(path: Path) -> dict[str, hub.HubName]:
    """The file's hf:// models, each name checked; only the file's shape is checked here, since the rest of the
    checks need the lock this makes."""
    where = display_path(path)
    data = load_yaml(path, "cluster", "pass the path of your cluster.yaml")
    if "services" not in data:
        raise RecipeError(f"{where}: services: only the services form names models by hf://",
                          "add services: (see docs/clusters.md)")
    cluster = validated(ServiceCluster, path, data)
    found: dict[str, hub.HubName] = {}
    for i, service in enumerate(cluster.services):
        if service.ref.is_hub:
            found[service.model] = hub.parse(service.model, service.ref.folder, where, f"services[{i}].model")
    return found


def lock_cluster(path: Path, say: Callable[[str], None], *, check: bool = False) -> Locked:
    """Resolve the file's hf:// models now; write them into cluster.lock (other entries stay) unless `check`."""
    where = display_path(path)
    wanted = _hub_models(path)
    before = modellock.read(modellock.lock_path(path))
    models: dict[str, modellock.LockedModel] = {}
    for name, parsed in wanted.items():
        commit, files = hub.resolve(parsed, where, say)
        folder = parsed.file is None  # a vLLM model folder: the whole repository
        models[name] = modellock.LockedModel(
            repo=parsed.repo_id, revision=parsed.revision, commit=commit, sha256=modellock.content_hash(files, folder),
            files=[modellock.LockedFile(path=f.path, size=f.size, sha256=f.sha256) for f in files])
    changed = tuple(name for name, entry in models.items() if before.get(name) != entry)
    lock = modellock.lock_path(path)
    if models and not check:
        lock = modellock.write(path, models)
    return Locked(lock, models, changed)
