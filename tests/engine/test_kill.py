"""SIGKILL a real `builder` at seeded random moments of build, publish, pxe publish and pxe pull, then check
what a user relies on:

- no content tag on an image whose smoke test did not pass (half the build rounds have a failing smoke test);
- no cache entry or netboot set whose bytes disagree with its name or manifest;
- `current` of a pxe-root always a complete generation; a pulled set's link always a complete, checked set;
- no registry tag on a manifest whose blobs are not all there, no publish record without its tags;
- after the next run (which must complete): no scratch tags, export containers, temp files or dead claims.

The moments are drawn from a seeded generator (BUILDER_KILL_SEED to vary it) within the duration of an
uninterrupted run of each phase, and printed for reproduction. Each phase runs a few kills by default (what CI
runs) and all of its rounds under `pytest -m slow`; the draws depend only on the seed and the phase (the
default kills are the first of the slow run's), so one test reruns alone with the same kills, scaled to the
duration of its uninterrupted run. Caches are warm: a build round changes only a label, so a kill lands in
real work (context, build, smoke, promotion) and a round takes seconds.
"""

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from registry import Registry, start_registry

from builder.core.paths import cache_dir
from builder.engines.podman import PodmanEngine
from builder.publish.artifacts import check_netboot
from conftest import ROOT, require_engine, run_cli

pytestmark = pytest.mark.engine

SEED = int(os.environ.get("BUILDER_KILL_SEED", "20261129"))
ROUNDS = {"build": 6, "publish": 5, "pxe-publish": 5, "pxe-pull": 5}  # every kill point: `-m slow`
FEW = 2  # kills per phase in CI: one failing and one passing smoke test, both inventories, both references
SCOPES = [pytest.param(False, id="few"), pytest.param(True, id="all", marks=pytest.mark.slow)]
ACCEPT = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"


@dataclass
class Killed:
    moment: float
    finished: bool  # the run ended before the kill
    stderr: str

    def __str__(self) -> str:
        return f"killed at {self.moment} s" + (" (it had already finished)" if self.finished else "")


def builder_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "builder", *args]


def timed(*args: str) -> float:
    started = time.monotonic()
    proc = subprocess.run(builder_argv(*args), capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return time.monotonic() - started


def kill_at(moment: float, *args: str) -> Killed:
    """Start builder, SIGKILL it `moment` seconds later, and wait until every process it started is gone."""
    with open(os.devnull, "w") as devnull:
        proc = subprocess.Popen(builder_argv(*args), stdout=devnull, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                start_new_session=True)
        try:
            proc.wait(timeout=moment)
            finished = True
        except subprocess.TimeoutExpired:
            proc.kill()
            finished = False
        assert proc.stderr is not None
        stderr = proc.stderr.read()
        proc.wait()
    deadline = time.monotonic() + 120  # children got SIGTERM with their parent: let them clean up and go
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"processes of the killed builder still run after 120 s: {args}")
    return Killed(moment, finished, stderr)


def moments(phase: str, duration: float, every: bool) -> list[float]:
    """The kill moments of `phase`: a generator seeded with SEED and the phase draws all its rounds, and
    without `every` (CI) the first FEW of them run."""
    rng = random.Random(f"{SEED}-{phase}")
    drawn = [round(rng.uniform(0.05, duration), 2) for _ in range(ROUNDS[phase])]
    drawn = drawn if every else drawn[:FEW]
    print(f"kill test (seed {SEED}, BUILDER_KILL_SEED={SEED} to rerun): {phase}: uninterrupted run "
          f"{duration:.1f} s; kills at {drawn} s")
    return drawn


def live_claims_only() -> None:
    """Every claim left in the cache belongs to a running process (its lock is held)."""
    import fcntl
    folder = cache_dir() / "claims"
    for path in folder.glob("[!.]*") if folder.is_dir() else []:
        with open(path) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            pytest.fail(f"a dead run's claim was not swept: {path}: {f.read()[:500]}")


def cache_entries_match_their_names() -> None:
    """Every cache entry named by a sha256 has exactly those bytes."""
    for folder, suffix in (("sources/archives", ".tar"), ("sources/files", ""), ("sdks/wheels", ".whl")):
        for path in (cache_dir() / folder).glob("[!.]*"):
            if path.is_file() and len(path.name.removesuffix(suffix)) == 64:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                assert path.name == digest + suffix, f"{path}: its bytes hash to {digest}"


def no_temp_files(*folders: Path) -> None:
    for folder in folders:
        found = [str(p) for p in folder.rglob(".tmp-*")] if folder.is_dir() else []
        assert not found, found


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with start_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


# --- build ---------------------------------------------------------------------------------------------

def podman_names(engine: PodmanEngine) -> list[str]:
    out = subprocess.run([*engine.command(), "images", "--format", "{{.Repository}}:{{.Tag}}",
                          "localhost/builder/cpu"], check=True, capture_output=True, text=True).stdout
    return out.split()


def export_containers(engine: PodmanEngine) -> list[str]:
    out = subprocess.run([*engine.command(), "ps", "--all", "--format", "{{.Names}}"], check=True,
                         capture_output=True, text=True).stdout
    return [n for n in out.split() if n.startswith("builder-export-")]


def round_recipe(tmp_path: Path, number: int, smoke_passes: bool) -> Path:
    data = yaml.safe_load((ROOT / "recipes" / "cpu.yaml").read_text())
    data["labels"] = {"dev.builder.test": f"kill-{SEED}-{number}-{time.time_ns()}"}
    if not smoke_passes:
        data["variants"]["cpu"]["env"] = {"LLAMA_SMOKE_DEVICE": "NoSuchDevice"}
    path = tmp_path / f"round-{number}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("every", SCOPES)
def test_kills_during_build(tmp_path: Path, every: bool) -> None:
    require_engine("podman")
    engine = PodmanEngine()
    assert run_cli("build", "--target", "cpu", "--engine", "podman", timeout=3600).returncode == 0
    made: list[str] = []
    try:
        warm = round_recipe(tmp_path, 0, True)
        duration = timed("build", "--recipe", str(warm), "--engine", "podman")
        made.append(json.loads(run_cli("plan", "--recipe", str(warm), "--json").stdout)["image"])
        for number, moment in enumerate(moments("build", duration, every), 1):
            smoke_passes = number % 2 == 0
            recipe = round_recipe(tmp_path, number, smoke_passes)
            tag = json.loads(run_cli("plan", "--recipe", str(recipe), "--json").stdout)["image"]
            made.append(tag)
            killed = kill_at(moment, "build", "--recipe", str(recipe), "--engine", "podman")
            where = f"build round {number} (smoke {'passes' if smoke_passes else 'fails'}), {killed}"
            if not smoke_passes:
                assert engine.inspect(tag) is None, f"{where}: content tag on an image that failed its smoke test"
            elif engine.inspect(tag) is not None:
                smoke = subprocess.run([*engine.run_argv(), "--rm", "--network", "none", tag, "smoke"],
                                       capture_output=True, text=True)
                assert smoke.returncode == 0, f"{where}: {smoke.stderr}"
            again = run_cli("build", "--recipe", str(recipe), "--engine", "podman", timeout=3600)
            if smoke_passes:
                assert again.returncode == 0, f"{where}: next run: {again.stderr[-3000:]}"
                assert engine.inspect(tag) is not None
            else:
                assert again.returncode == 1 and "smoke test of" in again.stderr, f"{where}: {again.stderr[-3000:]}"
                assert engine.inspect(tag) is None
            assert not [n for n in podman_names(engine) if ":scratch-" in n], where
            assert not export_containers(engine), where
            live_claims_only()
            no_temp_files(cache_dir() / "sources", cache_dir() / "bases", cache_dir() / "contexts")
        cache_entries_match_their_names()
    finally:
        for tag in made:
            for _ in range(3):  # storage shared with other builds can be busy for a moment
                if engine.inspect(tag) is None:
                    break
                engine.remove(tag)
                time.sleep(1)


# --- publish -------------------------------------------------------------------------------------------

def registry_is_consistent(registry: Registry, repo: str, where: str) -> None:
    """Every tag names a manifest whose config and layers are all there; the content tag implies the rest."""
    tags = registry.tags(repo)
    for tag in tags:
        resp = requests.get(registry.url(f"{repo}/manifests/{tag}"), headers={"Accept": ACCEPT}, timeout=30)
        assert resp.status_code == 200, f"{where}: {repo}:{tag}: {resp.status_code}"
        manifest = resp.json()
        for blob in [manifest["config"], *manifest["layers"]]:
            head = requests.head(registry.url(f"{repo}/blobs/{blob['digest']}"), timeout=30)
            assert head.status_code == 200, f"{where}: {repo}:{tag} names a missing blob {blob['digest']}"
    immutable = [t for t in tags if t.startswith("cpu-cpu-llama")]
    if immutable:
        assert "cpu-cpu" in tags, f"{where}: the content tag is there but not the floating one"
        digest = registry.digest(repo, immutable[0])
        assert digest is not None and registry.digest(repo, digest.replace(":", "-") + ".sbom") is not None
    records = cache_dir() / "published" / "published.jsonl"
    lines = records.read_text().splitlines() if records.is_file() else []
    if any(json.loads(line)["repository"] == f"{registry.host}/{repo}" for line in lines if line.strip()):
        assert immutable, f"{where}: recorded as published without its tags"


@pytest.mark.parametrize("every", SCOPES)
def test_kills_during_publish(registry: Registry, every: bool) -> None:
    require_engine("podman")
    assert run_cli("build", "--target", "cpu", "--engine", "podman", timeout=3600).returncode == 0
    duration = timed("publish", "--target", "cpu", "--engine", "podman", "--registry", f"{registry.host}/warm")
    for number, moment in enumerate(moments("publish", duration, every), 1):
        repo = f"kill{number}"
        args = ("publish", "--target", "cpu", "--engine", "podman", "--registry", f"{registry.host}/{repo}")
        where = f"publish round {number}, {kill_at(moment, *args)}"
        registry_is_consistent(registry, repo, where)
        again = run_cli(*args, timeout=1800)
        assert again.returncode == 0, f"{where}: next run: {again.stderr[-3000:]}"
        registry_is_consistent(registry, repo, where)
        assert "cpu-cpu" in registry.tags(repo)
        live_claims_only()
        no_temp_files(cache_dir() / "oci")


# --- pxe publish ---------------------------------------------------------------------------------------

def pulled_set(dest: Path, seed: int, size: int = 48 << 20) -> None:
    """DEST/cpu-cpu as `pxe pull` leaves it; a new seed means new blobs to copy."""
    folder = dest / "cpu-cpu"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    gen = random.Random(seed)
    for name, length in (("vmlinuz", 1 << 20), ("initrd.img", 4 << 20), ("root.squashfs", size)):
        data = gen.randbytes(length)
        (folder / name).write_bytes(data)
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": length}
    manifest = {"schema": 1, "target": "cpu", "variant": "cpu", "image": "localhost/builder/cpu:cpu",
                "image_digest": "sha256:" + hashlib.sha256(str(seed).encode()).hexdigest(),
                "kernel_version": "6.1.0-test", "files": files}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "SHA256SUMS").write_text("".join(f"{f['sha256']}  {n}\n" for n, f in files.items()))


def generation_is_complete(root: Path, where: str) -> None:
    current = root / "current"
    if not current.is_symlink():
        return
    gen = current.resolve()
    assert gen.is_dir() and gen.parent == (root / "generations").resolve(), f"{where}: current -> {gen}"
    for name in ("boot.ipxe", "cluster.yaml", "nodes.json"):
        assert (gen / name).is_file(), f"{where}: {name} missing in the current generation"
    scripts = list((gen / "nodes").glob("*.ipxe"))
    assert scripts, f"{where}: no node scripts in the current generation"
    for script in scripts:
        for word in script.read_text().split():
            if "/blobs/sha256/" in word:
                blob = root / "blobs" / "sha256" / word.rsplit("/", 1)[-1]
                assert blob.is_file(), f"{where}: {script.name} names a missing blob"
                assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, f"{where}: {blob} is damaged"


@pytest.mark.parametrize("every", SCOPES)
def test_kills_during_pxe_publish(tmp_path: Path, every: bool) -> None:
    root = tmp_path / "pxe-root"
    for side in ("a", "b"):
        (tmp_path / f"{side}.yaml").write_text(yaml.safe_dump({
            "control": {"address": "10.0.2.2", "http_port": 8000},
            "nodes": [{"name": f"node-{side}", "mac": "52:54:00:12:34:56", "target": "cpu", "role": "rpc-worker"}]}))
    pulled_set(tmp_path / "sets", 0)
    duration = timed("pxe", "publish", str(tmp_path / "a.yaml"), "--root", str(root),
                     "--artifacts", str(tmp_path / "sets"), "--keep", "1")
    for number, moment in enumerate(moments("pxe-publish", duration, every), 1):
        pulled_set(tmp_path / "sets", number)
        args = ("pxe", "publish", str(tmp_path / ("a.yaml" if number % 2 else "b.yaml")),
                "--root", str(root), "--artifacts", str(tmp_path / "sets"), "--keep", "1")
        where = f"pxe publish round {number}, {kill_at(moment, *args)}"
        generation_is_complete(root, where)
        again = run_cli(*args, timeout=600)
        assert again.returncode == 0, f"{where}: next run: {again.stderr[-3000:]}"
        generation_is_complete(root, where)
        squash = json.loads((tmp_path / "sets" / "cpu-cpu" / "manifest.json").read_text())["files"]["root.squashfs"]
        assert f"builder.sha256={squash['sha256']}" in " ".join(
            p.read_text() for p in (root / "current" / "nodes").glob("*.ipxe")), where
        no_temp_files(root)
        live_claims_only()


# --- pxe pull ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("every", SCOPES)
def test_kills_during_pxe_pull(tmp_path: Path, registry: Registry, every: bool) -> None:
    references = []
    for seed in (101, 102):
        pulled_set(tmp_path / f"push-{seed}", seed)
        pushed = run_cli("pxe", "push", "--dir", str(tmp_path / f"push-{seed}" / "cpu-cpu"), "--registry",
                         f"{registry.host}/netboot", timeout=600)
        assert pushed.returncode == 0, pushed.stderr
        references.append(pushed.stdout.split("pushed: ", 1)[1].split()[0])
    dest = tmp_path / "artifacts"
    duration = timed("pxe", "pull", references[0], "--dest", str(dest))
    for number, moment in enumerate(moments("pxe-pull", duration, every), 1):
        reference = references[number % 2]
        where = f"pxe pull round {number}, {kill_at(moment, 'pxe', 'pull', reference, '--dest', str(dest))}"
        link = dest / "cpu-cpu"
        assert link.is_symlink(), where  # the first, uninterrupted pull made it
        check_netboot(link.resolve(), where)
        again = run_cli("pxe", "pull", reference, "--dest", str(dest), timeout=600)
        assert again.returncode == 0, f"{where}: next run: {again.stderr[-3000:]}"
        placed = check_netboot(link.resolve(), where)
        pushed_manifest = json.loads((tmp_path / f"push-{101 + number % 2}" / "cpu-cpu" / "manifest.json").read_text())
        assert placed.image_digest == pushed_manifest["image_digest"], where
        assert not list((dest / "sets").glob(".pull-*")) and not list(dest.glob(".*.link")), where
        live_claims_only()

