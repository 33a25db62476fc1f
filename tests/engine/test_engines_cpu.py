"""The cpu image built and run for real with podman and with docker.

Each engine builds the image (engine layer cache off; the compiler cache is builder's shared one, cold on
a fresh machine), then a head and two RPC workers serve a tiny random-weight model over the host network on
127.0.0.1, and the split must produce exactly the single-node text.
"""

import json
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from builder.core.paths import cache_dir
from builder.engines import ENGINES
from conftest import ROOT, free_port, require_engine, run_cli
from containers import complete, container, wait_healthy

pytestmark = pytest.mark.engine

BUILD_TIMEOUT = 3600


@dataclass(frozen=True)
class Built:
    engine: str
    image: str
    digest: str

    def cli(self) -> list[str]:
        return ENGINES[self.engine]().command()


@pytest.fixture(scope="module", params=["podman", "docker"])
def built(request: pytest.FixtureRequest) -> Built:
    engine = request.param
    require_engine(engine)
    proc = run_cli("build", "--target", "cpu", "--engine", engine, "--no-cache", "--json", timeout=BUILD_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-5000:]
    doc = json.loads(proc.stdout)
    assert doc["built"] is True
    return Built(engine, doc["image"], doc["digest"])


def inspect_labels(b: Built) -> dict[str, str]:
    out = subprocess.run([*b.cli(), "image", "inspect", b.image], check=True, capture_output=True, text=True)
    data = json.loads(out.stdout)[0]
    return data.get("Labels") or data["Config"]["Labels"]


def test_build_prints_digest_and_labels_the_image(built: Built) -> None:
    assert built.digest.startswith("sha256:") and len(built.digest) == 71
    labels = inspect_labels(built)
    assert labels["dev.builder.target"] == "cpu" and labels["dev.builder.variant"] == "cpu"
    assert labels["dev.builder.llama-cpp.ref"] == "pypi:llama-cpp-python==0.3.36#vendor/llama.cpp"
    assert labels["org.opencontainers.image.revision"].startswith("sha256:832db069")
    assert labels["org.opencontainers.image.version"] == "0.3.36"
    assert labels["org.opencontainers.image.created"].endswith("Z")
    assert labels["com.github.containers.toolbox"] == "true"
    assert built.image.endswith(labels["dev.builder.fingerprint"][:16])


def test_unchanged_rebuild_runs_no_build_step(built: Built) -> None:
    logs_before = set((cache_dir() / "logs").iterdir())
    proc = run_cli("build", "--target", "cpu", "--engine", built.engine, "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["built"] is False and doc["image"] == built.image and doc["digest"] == built.digest
    assert doc["log"] is None and set((cache_dir() / "logs").iterdir()) == logs_before


def test_smoke_role_lists_the_cpu_device(built: Built) -> None:
    proc = run_cli("run", "--target", "cpu", "--engine", built.engine, "smoke", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "smoke: ok   device CPU" in proc.stdout
    for binary in ("llama-server", "ggml-rpc-server", "llama-cli", "llama-bench"):
        assert f"smoke: ok   {binary}" in proc.stdout


def test_rpc_worker_refuses_a_wildcard_address(built: Built) -> None:
    proc = run_cli("run", "--target", "cpu", "--engine", built.engine, "rpc-worker", "--host", "0.0.0.0",
                   timeout=120)
    assert proc.returncode == 2
    assert "refusing to listen on '0.0.0.0'" in proc.stderr and "--allow-public-bind" in proc.stderr


def test_export_gives_the_image_root_filesystem(built: Built, tmp_path: Path) -> None:
    out = tmp_path / "root.tar"
    ENGINES[built.engine]().export_rootfs(built.image, out)
    with tarfile.open(out) as tar:
        names = {name.lstrip("./") for name in tar.getnames()}
    for path in ("opt/llama/bin/llama-server", "opt/llama/bin/ggml-rpc-server", "opt/llama/bin/libggml-cpu-x64.so",
                 "usr/local/bin/llama-entrypoint", "usr/lib/x86_64-linux-gnu/libgomp.so.1"):
        assert path in names, path
    assert not list(tmp_path.glob(".*.part"))


def test_rpc_split_matches_single_node_and_fails_clearly_without_a_worker(
    built: Built, tiny_model: Path, tmp_path: Path
) -> None:
    single, head, w1, w2 = free_port(), free_port(), free_port(), free_port()
    tag = f"builder-test-{built.engine}-{head}"
    common = ["-m", str(tiny_model), "-c", "256", "-t", "2"]
    with container(built.engine, tmp_path, f"{tag}-single", "server", *common, "--port", str(single)) as s:
        wait_healthy(single, s, tmp_path / f"{tag}-single.log")
        expected = complete(single)
    assert len(set(expected.split())) > 5, f"degenerate reference text: {expected!r}"

    with (
        container(built.engine, tmp_path, f"{tag}-w1", "rpc-worker", "--port", str(w1)),
        container(built.engine, tmp_path, f"{tag}-w2", "rpc-worker", "--port", str(w2)) as worker2,
    ):
        time.sleep(2)
        assert worker2.poll() is None, (tmp_path / f"{tag}-w2.log").read_text()
        head_log = tmp_path / f"{tag}-head.log"
        with container(built.engine, tmp_path, f"{tag}-head", "server", *common, "--port", str(head),
                       "--rpc", f"127.0.0.1:{w1},127.0.0.1:{w2}", "-ngl", "99", "-lv", "4") as h:
            wait_healthy(head, h, head_log)
            assert complete(head) == expected
            log = head_log.read_text(errors="replace")
            # Evidence that the layers really ran on the workers, not silently on the head.
            assert "offloaded 5/5 layers" in log
            assert f"RPC0[127.0.0.1:{w1}] model buffer size" in log
            assert f"RPC0[127.0.0.1:{w2}] model buffer size" in log

            subprocess.run([*built.cli(), "kill", f"{tag}-w2"], check=True, capture_output=True)
            started = time.monotonic()
            with pytest.raises(requests.RequestException):
                complete(head, timeout=60)
            assert time.monotonic() - started < 60
            assert h.wait(timeout=60) != 0
            assert "Remote RPC server crashed" in head_log.read_text(errors="replace")


def test_base_pinned_by_digest_is_used_as_given(tmp_path: Path) -> None:
    """A recipe whose runtime base is an image reference pinned by digest (the users' usual kind).

    No registry is reachable here, so the digest names a local podman image (the bootstrapped base);
    docker cannot address an image it imported by digest, so this runs on podman.
    """
    require_engine("podman")
    import yaml

    from builder.engines.podman import PodmanEngine
    from builder.fetch.bootstrap import ensure_base
    from builder.flavours.lock import locked_bases
    from builder.plan.bases import base_ref
    from builder.recipe.load import load_recipe, recipe_path_for

    recipe = load_recipe(recipe_path_for("cpu"))
    engine = PodmanEngine()
    locked = locked_bases()  # the shipped bases are bootstrapped from their locked packages
    bootstrap_ref = ensure_base(engine, recipe.variants["cpu"].base.runtime, locked)
    digest = subprocess.run([*engine.command(), "image", "inspect", "--format", "{{.Digest}}", bootstrap_ref],
                            check=True, capture_output=True, text=True).stdout.strip()
    pinned = f"{bootstrap_ref.split(':')[0]}@{digest}"
    data = yaml.safe_load(recipe_path_for("cpu").read_text())
    data["variants"]["cpu"]["base"]["runtime"] = {"kind": "image", "ref": pinned}
    path = tmp_path / "pinned.yaml"
    path.write_text(yaml.safe_dump(data))

    plan = json.loads(run_cli("plan", "--recipe", str(path), "--json").stdout)
    toolchain = base_ref(recipe.variants["cpu"].base.toolchain, locked)
    assert plan["runtime_ref"] == pinned and plan["toolchain_ref"] == toolchain
    proc = run_cli("build", "--recipe", str(path), "--engine", "podman", "--json", timeout=BUILD_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    image = json.loads(proc.stdout)["image"]
    try:
        assert image == plan["image"]
        smoke = subprocess.run([*engine.run_argv(), "--rm", "--network", "none", image, "smoke"],
                               capture_output=True, text=True)
        assert smoke.returncode == 0 and "smoke: ok   device CPU" in smoke.stdout
    finally:
        engine.remove(image)


def test_failed_build_shows_the_failing_step_and_leaves_no_image(tmp_path: Path) -> None:
    """A build step that fails: the last lines of its output, the log path, exit 1, and no tag left behind."""
    require_engine("podman")
    import yaml

    data = yaml.safe_load((ROOT / "recipes" / "cpu.yaml").read_text())
    pin = yaml.safe_load((ROOT / "recipes" / "llama-cpp.yaml").read_text())
    data["llama_cpp"] = {**pin, "binaries": ["llama-server", "no-such-binary"]}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data))
    image = json.loads(run_cli("plan", "--recipe", str(path), "--json").stdout)["image"]
    proc = run_cli("build", "--recipe", str(path), "--engine", "podman", timeout=BUILD_TIMEOUT)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert any(line.startswith("error: podman build") and "failed (exit code" in line for line in lines)
    tail = proc.stderr.split("last lines of output:", 1)[1]
    assert "no-such-binary" in tail
    log = Path(proc.stderr.split("hint: full log: ", 1)[1].split()[0])
    assert log.is_file() and "no-such-binary" in log.read_text(errors="replace")
    assert ENGINES["podman"]().inspect(image) is None
