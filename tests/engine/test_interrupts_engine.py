"""Interrupted and concurrent builds of the cpu image with podman, and the compiler cache's secret.

Each test builds the cpu recipe with a small change (an extra label, environment value or unused CMake
variable), so it reuses the warm layer and compiler caches yet really builds: a new content tag each time.
"""

import json
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from builder.core.paths import cache_subdir
from builder.engines.podman import PodmanEngine
from conftest import ROOT, require_engine, run_cli

pytestmark = pytest.mark.engine

BUILD_TIMEOUT = 3600
REPOSITORY = "localhost/builder/cpu"
# What the store's URL looks like (http://127.0.0.1:PORT/<32 hex secret>/): must appear nowhere.
STORE_URL = re.compile(r"127\.0\.0\.1:\d+/[0-9a-f]{32}")


@pytest.fixture(scope="module", autouse=True)
def _cpu_image() -> None:
    require_engine("podman")
    proc = run_cli("build", "--target", "cpu", "--engine", "podman", "--json", timeout=BUILD_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]


def changed_recipe(tmp_path: Path, name: str, *, labels: dict[str, str] | None = None,
                   env: dict[str, str] | None = None, cmake: dict[str, str] | None = None) -> Path:
    data = yaml.safe_load((ROOT / "recipes" / "cpu.yaml").read_text())
    data["labels"] = {"dev.builder.test": f"{name}-{secrets.token_hex(4)}", **(labels or {})}
    data["variants"]["cpu"]["env"] = env or {}
    data["variants"]["cpu"]["cmake"] = cmake or {}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def planned_tag(recipe: Path) -> str:
    return str(json.loads(run_cli("plan", "--recipe", str(recipe), "--json").stdout)["image"])


def names(engine: PodmanEngine) -> list[str]:
    out = subprocess.run([*engine.command(), "images", "--format", "{{.Repository}}:{{.Tag}}", REPOSITORY],
                         check=True, capture_output=True, text=True).stdout
    return out.split()


@pytest.fixture
def engine() -> Iterator[PodmanEngine]:
    engine = PodmanEngine()
    before = set(names(engine))
    yield engine
    for name in set(names(engine)) - before:  # the images these tests made
        engine.remove(name)


def test_sigterm_during_the_smoke_test_leaves_no_tag_and_exits_143(tmp_path: Path, engine: PodmanEngine) -> None:
    recipe = changed_recipe(tmp_path, "sigterm")
    tag = planned_tag(recipe)
    proc = subprocess.Popen([sys.executable, "-m", "builder", "--debug", "build", "--recipe", str(recipe),
                             "--engine", "podman"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("$ ") and " run " in line and line.rstrip().endswith(" smoke"):
            proc.send_signal(signal.SIGTERM)  # the image is built, its smoke test has just started
            break
    else:
        pytest.fail("the smoke test never started:\n" + "".join(seen[-30:]))
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 143, rest[-3000:]
    assert "terminated" in rest.splitlines() and "Traceback" not in rest
    assert engine.inspect(tag) is None, "an image whose smoke test never finished got its content tag"
    assert not [n for n in names(engine) if ":scratch-" in n]

    again = run_cli("build", "--recipe", str(recipe), "--engine", "podman", "--json", timeout=BUILD_TIMEOUT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["built"] is True and engine.inspect(tag) is not None


def test_a_failing_smoke_test_leaves_no_tag(tmp_path: Path, engine: PodmanEngine) -> None:
    recipe = changed_recipe(tmp_path, "badsmoke", env={"LLAMA_SMOKE_DEVICE": "NoSuchDevice"})
    tag = planned_tag(recipe)
    proc = run_cli("build", "--recipe", str(recipe), "--engine", "podman", timeout=BUILD_TIMEOUT)
    assert proc.returncode == 1 and f"smoke test of {tag} failed" in proc.stderr
    assert "no NoSuchDevice device listed" in proc.stderr
    assert engine.inspect(tag) is None and not [n for n in names(engine) if ":scratch-" in n]


def test_two_concurrent_builds_of_one_target_both_succeed(tmp_path: Path, engine: PodmanEngine) -> None:
    recipe = changed_recipe(tmp_path, "concurrent")
    argv = [sys.executable, "-m", "builder", "build", "--recipe", str(recipe), "--engine", "podman", "--json"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for _ in range(2)]
    results = [proc.communicate(timeout=BUILD_TIMEOUT) for proc in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err[-3000:]
    docs = [json.loads(out) for out, _ in results]
    assert docs[0]["image"] == docs[1]["image"] == planned_tag(recipe)
    assert docs[0]["digest"] == docs[1]["digest"]
    assert sorted(d["built"] for d in docs) == [False, True]  # the second waited, then found it built
    assert any("waiting for another builder building cpu/cpu (lock " in err for _, err in results)
    smoke = subprocess.run([*engine.run_argv(), "--rm", "--network", "none", docs[0]["image"], "smoke"],
                           capture_output=True, text=True)
    assert smoke.returncode == 0, smoke.stderr


def test_the_compiler_cache_secret_leaves_no_trace_and_a_rebuild_hits_the_cache(
        tmp_path: Path, engine: PodmanEngine) -> None:
    """An unused CMake variable changes the compile step, not the compile commands: every object is a hit."""
    recipe = changed_recipe(tmp_path, "ccache", cmake={"BUILDER_TEST_UNUSED": secrets.token_hex(4)})
    proc = run_cli("build", "--recipe", str(recipe), "--engine", "podman", "--json", timeout=BUILD_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    log = Path(doc["log"]).read_text(errors="replace")
    stats = dict(re.findall(r"(\w+)=(\d+)", log.split("[builder] compiler cache: ", 1)[1].splitlines()[0]))
    hits = int(stats["direct_cache_hit"]) + int(stats["preprocessed_cache_hit"])
    assert hits > 100 and int(stats["cache_miss"]) == 0, stats
    # The URL reached the build through the environment: the command line names the argument only.
    assert "--build-arg FTP_PROXY " in log.splitlines()[0] and "FTP_PROXY=" not in log
    assert not STORE_URL.search(log)
    history = subprocess.run([*engine.command(), "history", "--no-trunc", "--format", "json", doc["image"]],
                             check=True, capture_output=True, text=True).stdout
    inspect = subprocess.run([*engine.command(), "image", "inspect", doc["image"]], check=True,
                             capture_output=True, text=True).stdout
    for text in (history, inspect):
        assert not STORE_URL.search(text) and "FTP_PROXY" not in text and "CCACHE_REMOTE" not in text


def half_made_image(tmp_path: Path, engine: PodmanEngine, name: str) -> tuple[str, str]:
    """What a build killed while podman 4 commits an image leaves: a nameless image whose record exists but
    whose manifest was never written, under a named image built on top of it. Made here the way the kill
    leaves it: a real parent and child, the parent untagged, the parent's manifest file removed from the store.
    Returns (parent id, child tag)."""
    parent, child = f"localhost/builder-test/{name}:parent", f"localhost/builder-test/{name}:child"
    tmp_path.mkdir()
    (tmp_path / "Parent").write_text(f"FROM localhost/builder/cpu:cpu\nLABEL dev.builder.test.{name}=parent\n")
    (tmp_path / "Child").write_text(f"FROM {parent}\nLABEL dev.builder.test.{name}=child\n")
    for file, tag in (("Parent", parent), ("Child", child)):
        subprocess.run([*engine.command(), "build", "--quiet", "--file", str(tmp_path / file), "--tag", tag, "--",
                        str(tmp_path)], check=True, capture_output=True)
    info = engine.inspect(parent)
    assert info is not None
    parent_id = info.id.removeprefix("sha256:")
    subprocess.run([*engine.command(), "untag", "--", parent], check=True)
    store = subprocess.run([*engine.command(), "info", "--format", "{{.Store.GraphRoot}} {{.Store.GraphDriverName}}"],
                           check=True, capture_output=True, text=True).stdout.split()
    (Path(store[0]) / f"{store[1]}-images" / parent_id / "manifest").unlink()
    broken = subprocess.run([*engine.command(), "image", "inspect", "--", child], capture_output=True, text=True)
    assert broken.returncode != 0 and parent_id in broken.stderr  # podman itself cannot inspect the child now
    return parent_id, child


def test_a_half_written_image_left_by_a_killed_build_is_removed(tmp_path: Path, engine: PodmanEngine) -> None:
    # Found in CI: a build SIGKILLed during a commit left one, and the next build's own image could then not
    # be inspected (every image built on that layer fails), so the build ended in an error.
    parent_id, child = half_made_image(tmp_path / "a", engine, f"inspect{secrets.token_hex(3)}")
    info = engine.inspect(child)
    assert info is not None and "child" in info.labels.values()
    engine.remove(child)

    # The next run's sweep of a killed build's claim repairs the store before anything else looks at it.
    parent_id, child = half_made_image(tmp_path / "b", engine, f"sweep{secrets.token_hex(3)}")
    (cache_subdir("claims") / secrets.token_hex(8)).write_text(
        json.dumps(["image", "podman", f"localhost/builder-test/gone:scratch-{secrets.token_hex(4)}"]) + "\n")
    proc = run_cli("targets")
    assert proc.returncode == 0, proc.stderr
    assert "removing it" in proc.stderr and parent_id[:12] in proc.stderr
    listing = subprocess.run([*engine.command(), "images", "--all", "--quiet"], capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    assert engine.inspect(child) is not None
    engine.remove(child)
