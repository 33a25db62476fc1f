"""A split's `preseed: true`, without an engine: the RPC workers get the model (a netbooted worker's plan line, a
box's `builder run` line, local mode's container), `builder run` mounts what a seeding worker reads and keeps its
cache on the host with --rpc-cache, and bad input is one line."""

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from test_netboot_services import MACS, cluster_file, plan, published, words

from builder.cluster.local import Local, process_argv
from builder.cluster.model import load_cluster
from builder.engines.podman import PodmanEngine
from builder.netboot.plan import NodePlan, RpcWorkerLine, parse, serialize
from conftest import run_cli_inproc

BIG = b"GGUF big model!!"  # test_netboot_services' split model
BIG_SHA = hashlib.sha256(BIG).hexdigest()


def _preseeded(tmp_path: Path, **changes: object) -> Path:
    path = cluster_file(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["services"][1]["preseed"] = True
    data["services"][1].update(changes)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(("change", "says"), [
    ({"topology": "replicate", "head": None, "workers": [], "nodes": ["b"]}, "only a split's RPC workers"),
    ({"head": None, "model": "", "sha256": ""}, "only workers whose head is in this file"),
])
def test_preseed_is_refused_where_no_worker_can_get_the_model(tmp_path: Path, change: dict[str, object],
                                                              says: str) -> None:
    path = _preseeded(tmp_path, **change)
    data = yaml.safe_load(path.read_text())
    data["services"][1] = {k: v for k, v in data["services"][1].items() if v not in (None, [], "")}
    path.write_text(yaml.safe_dump(data))
    proc = run_cli_inproc("cluster", "commands", str(path))
    assert proc.returncode == 2
    first = proc.stderr.splitlines()[0]
    assert first.startswith("error: ") and "services[1].preseed" in first and says in first, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_netbooted_worker_fetches_the_model_it_seeds_from_and_makes_room_for_it(tmp_path: Path) -> None:
    root = published(tmp_path, _preseeded(tmp_path))
    worker = [line for line in plan(root, MACS[2]) if line[0] == "rpc-worker"]
    url = f"http://10.0.2.2:8000/blobs/sha256/{BIG_SHA}"
    assert worker == [["rpc-worker", "big", "50100", url, BIG_SHA]]
    assert (root / "blobs" / "sha256" / BIG_SHA).read_bytes() == BIG
    # the initramfs makes room for the model on the worker's cache disk
    assert f"builder.models={BIG_SHA}:{len(BIG)}" in words(root, MACS[2])
    # without preseed a worker gets no model
    (tmp_path / "plain").mkdir()
    plain = published(tmp_path / "plain", cluster_file(tmp_path / "plain"))
    assert [line for line in plan(plain, MACS[2]) if line[0] == "rpc-worker"] == [["rpc-worker", "big", "50100"]]


def test_a_netbooted_worker_without_a_cache_disk_is_refused(tmp_path: Path) -> None:
    path = _preseeded(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["nodes"][2]["cache"] = False
    path.write_text(yaml.safe_dump(data))
    proc = run_cli_inproc("pxe", "publish", str(path), "--root", str(tmp_path / "pxe-root"))
    assert proc.returncode == 2
    assert "services[1].preseed: the worker c (nodes[2]) has no cache disk" in proc.stderr.splitlines()[0]
    assert not (tmp_path / "pxe-root" / "current").exists()


def test_the_plan_line_reads_back() -> None:
    lines = (RpcWorkerLine("big", 50100, "http://10.0.2.2:8000/blobs/sha256/" + "a" * 64, "a" * 64),
             RpcWorkerLine("small", 50101))
    assert parse(serialize(NodePlan("c", lines))).lines == lines


def test_a_box_worker_line_seeds_from_the_box_copy_and_keeps_its_cache(tmp_path: Path) -> None:
    path = _preseeded(tmp_path)
    proc = run_cli_inproc("cluster", "commands", str(path), "--models", "/srv/models", "--node", "c", "--json")
    assert proc.returncode == 0, proc.stderr
    (entry,) = json.loads(proc.stdout)
    assert entry["models"] == [{"service": "big", "model": "big.gguf", "sha256": BIG_SHA,
                                "path": f"/srv/models/{BIG_SHA}.gguf"}]
    (argv,) = entry["argv"]
    assert argv == ["builder", "run", "--target", "cpu", "--detach", "--name", "builder-big-rpc", "--rpc-cache",
                    "/srv/models/rpc-cache", "--model-sha256", BIG_SHA, "rpc-worker", "--host", "10.0.2.13",
                    "--port", "50100", "--seed", f"/srv/models/{BIG_SHA}.gguf"]
    # builder run takes the line as it is
    printed = run_cli_inproc("run", "--image", "localhost/x:y", "--print", *argv[2:])
    assert printed.returncode == 0, printed.stderr
    assert "--volume /srv/models/rpc-cache:/var/cache/llama.cpp/rpc" in printed.stdout


def test_local_mode_mounts_the_model_into_a_seeding_worker(tmp_path: Path) -> None:
    loaded = load_cluster(_preseeded(tmp_path))
    worker = next(p for p in loaded.processes if p.role == "rpc-worker")
    argv = process_argv(Local.of(loaded), PodmanEngine(), worker, "img", tmp_path / "big.gguf")
    assert f"{tmp_path / 'big.gguf'}:/models/big.gguf:ro" in argv
    assert argv[argv.index("img"):] == ["img", "rpc-worker", "--host", argv[argv.index("--host") + 1], "--port",
                                        "50100", "--seed", "/models/big.gguf"]


def test_builder_run_mounts_what_a_seeding_worker_reads(tmp_path: Path) -> None:
    model, placed = tmp_path / "m.gguf", tmp_path / "placed.txt"
    model.write_bytes(BIG)
    placed.write_text("output.weight\n")
    cache = tmp_path / "rpc"
    proc = run_cli_inproc("run", "--image", "localhost/x:y", "--print", "--json", "--rpc-cache", str(cache),
                          "rpc-worker", "--host", "10.0.0.5", "--seed", str(model), "--seed-tensors", str(placed))
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(proc.stdout)
    assert argv[argv.index("localhost/x:y"):] == ["localhost/x:y", "rpc-worker", "--host", "10.0.0.5", "--seed",
                                                  "/models/m.gguf", "--seed-tensors", "/models/placed.txt"]
    volumes = [argv[i + 1] for i, word in enumerate(argv) if word == "--volume"]
    assert volumes == [f"{model}:/models/m.gguf:ro", f"{placed}:/models/placed.txt:ro",
                       f"{cache}:/var/cache/llama.cpp/rpc"]
    assert not cache.exists()  # --print makes nothing

    seed = run_cli_inproc("run", "--image", "localhost/x:y", "--print", "--json", "rpc-seed", "--tensors",
                          str(placed), str(model), "--list")
    assert json.loads(seed.stdout)[-5:] == ["rpc-seed", "--tensors", "/models/placed.txt", "/models/m.gguf", "--list"]


@pytest.mark.parametrize(("args", "says"), [
    (["--rpc-cache", "/tmp/x", "server", "-m", "m.gguf"], "--rpc-cache goes with the roles rpc-worker and rpc-seed"),
    (["--rpc-cache", "/tmp/a:b", "rpc-worker"], "cannot take a path with ':' or ','"),
    (["--model-sha256", "0" * 64, "rpc-worker", "--seed", "MISSING"], "MISSING is not a file on this machine"),
    (["--model-sha256", "0" * 64, "rpc-worker"], "the role's arguments name no model"),
])
def test_bad_seed_options_are_one_line(tmp_path: Path, args: list[str], says: str) -> None:
    proc = run_cli_inproc("run", "--image", "localhost/x:y", *args)
    assert proc.returncode == 2
    assert says in proc.stderr.splitlines()[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize("print_only", [["--print"], []])
def test_a_cache_folder_under_a_file_is_refused_before_anything_starts(tmp_path: Path, print_only: list[str]) -> None:
    (tmp_path / "a-file").write_text("not a folder\n")
    proc = run_cli_inproc("run", "--image", "localhost/x:y", *print_only, "--rpc-cache",
                          str(tmp_path / "a-file" / "rpc"), "rpc-worker")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[0] == f"error: --rpc-cache {tmp_path / 'a-file' / 'rpc'}: " \
                                          f"{tmp_path / 'a-file'} is not a folder"


def test_the_seed_file_is_what_model_sha256_checks(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF other bytes")
    proc = run_cli_inproc("run", "--image", "localhost/x:y", "--model-sha256", BIG_SHA, "rpc-worker", "--seed",
                          str(model))
    assert proc.returncode == 2
    assert f"has sha256 {hashlib.sha256(model.read_bytes()).hexdigest()}, not {BIG_SHA}" in proc.stderr


def test_files_of_one_name_are_kept_apart_and_one_file_is_mounted_once(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    model, other = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    model.write_bytes(BIG)
    other.write_text("output.weight\n")
    proc = run_cli_inproc("run", "--image", "localhost/x:y", "--print", "--json", "rpc-worker", "--seed", str(model),
                          "--seed-tensors", str(other))
    argv = json.loads(proc.stdout)
    assert argv[-4:] == ["--seed", "/models/m.gguf", "--seed-tensors", "/models/1-m.gguf"]
    same = json.loads(run_cli_inproc("run", "--image", "localhost/x:y", "--print", "--json", "server", "-m",
                                     str(model), "-m", str(model)).stdout)
    assert [word for word in same if word.endswith(":ro")] == [f"{model}:/models/m.gguf:ro"]
