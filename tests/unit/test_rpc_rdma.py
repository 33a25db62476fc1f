"""RPC over RDMA as a recipe option (`rpc_rdma: true`): what the opt-in renders, and that it stays opt-in."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from builder.engines.base import ImageInfo
from builder.flavours import lock as lockfile
from builder.recipe.load import load_recipe
from builder.use.launch import rdma_flags
from conftest import ROOT, run_cli_inproc

RDMA_LINE = "-DGGML_RPC_RDMA=ON"


def rdma_recipes(tmp_path: Path, value: object = True) -> Path:
    """A copy of the shipped recipes whose cpu variant sets `rpc_rdma` to `value`."""
    folder = tmp_path / "recipes"
    shutil.copytree(ROOT / "recipes", folder)
    data = yaml.safe_load((folder / "cpu.yaml").read_text())
    data["variants"]["cpu"]["rpc_rdma"] = value
    (folder / "cpu.yaml").write_text(yaml.safe_dump(data))
    return folder


def plan_json(*args: str) -> dict[str, object]:
    proc = run_cli_inproc("plan", "--target", "cpu", "--json", *args)
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, object] = json.loads(proc.stdout)
    return doc


def packages(doc: dict[str, object], stage: str) -> list[str]:
    base = doc[stage]
    assert isinstance(base, dict)
    names: list[str] = base["packages"]
    return names


def test_the_option_adds_libibverbs_the_cmake_flag_and_the_label(tmp_path: Path) -> None:
    default, rdma = plan_json(), plan_json("--recipes", str(rdma_recipes(tmp_path)))
    assert "libibverbs-dev" in packages(rdma, "toolchain")
    assert {"libibverbs1", "ibverbs-providers"} <= set(packages(rdma, "runtime"))
    assert rdma["cmake"]["GGML_RPC_RDMA"] == "ON"  # type: ignore[index]
    assert rdma["labels"]["dev.builder.rpc.rdma"] == "true"  # type: ignore[index]
    assert rdma["rpc_rdma"] is True
    # another image: its own content tag and its own bases
    assert rdma["image"] != default["image"]
    assert rdma["toolchain_ref"] != default["toolchain_ref"] and rdma["runtime_ref"] != default["runtime_ref"]

    out = tmp_path / "ctx"
    proc = run_cli_inproc("render", "--recipes", str(rdma_recipes(tmp_path / "again")), "--target", "cpu",
                          "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    containerfile = (out / "Containerfile").read_text()
    assert f"    {RDMA_LINE} " in containerfile
    assert '"dev.builder.rpc.rdma"="true"' in containerfile


def test_without_the_option_nothing_mentions_rdma() -> None:
    """The shipped recipes leave it off: no RDMA flag, package, label or plan key (the goldens hold the bytes)."""
    doc = plan_json()
    assert "rpc_rdma" not in doc
    assert "GGML_RPC_RDMA" not in doc["cmake"]  # type: ignore[operator]
    assert not [p for stage in ("toolchain", "runtime") for p in packages(doc, stage) if "ibverbs" in p]
    assert not [k for k in doc["labels"] if "rdma" in k]  # type: ignore[union-attr]
    for path in sorted((ROOT / "tests" / "data" / "golden").glob("*/*/Containerfile")):
        assert "RDMA" not in path.read_text() and "ibverbs" not in path.read_text(), path


def test_explicit_false_is_the_default_image(tmp_path: Path) -> None:
    assert plan_json("--recipes", str(rdma_recipes(tmp_path, False)))["image"] == plan_json()["image"]


@pytest.mark.parametrize("value", ["yes", 1, "true", None, ["on"]])
def test_a_value_other_than_true_or_false_is_one_line(tmp_path: Path, value: object) -> None:
    proc = run_cli_inproc("plan", "--recipes", str(rdma_recipes(tmp_path, value)), "--target", "cpu")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    first = proc.stderr.splitlines()[0]
    assert "cpu.yaml" in first and "variants.cpu.rpc_rdma" in first, first


def test_lock_sees_the_rdma_bases_and_leaves_old_entries_alone(tmp_path: Path) -> None:
    """`builder lock` locks the bases the image is built on (libibverbs included); with the option off an image's
    lock entry has no new key, so builder.lock as it is still agrees with the shipped recipes."""
    folder = rdma_recipes(tmp_path)
    recipe = load_recipe(folder / "cpu.yaml", folder / "llama-cpp.yaml")
    stages = dict(lockfile.image_bases(recipe, "cpu"))
    assert "libibverbs-dev" in stages["toolchain"].packages
    assert "ibverbs-providers" in stages["runtime"].packages
    assert lockfile.entry(recipe, "cpu")["rpc_rdma"] is True
    shipped = load_recipe(ROOT / "recipes" / "cpu.yaml")
    assert "rpc_rdma" not in lockfile.entry(shipped, "cpu")
    assert lockfile.check() == []


class _Engine:
    """Stands for podman's image store (only `inspect` is asked); the flags are tested as the engine receives them
    in tests/engine/test_rpc_rdma_image.py."""

    def __init__(self, labels: dict[str, str] | None) -> None:
        self.labels, self.asked = labels, 0

    def inspect(self, ref: str) -> ImageInfo | None:
        self.asked += 1
        return None if self.labels is None else ImageInfo(ref, "sha256:" + "1" * 64, self.labels, 1)


@pytest.mark.parametrize(("labels", "has_devices", "wanted"), [
    ({"dev.builder.rpc.rdma": "true"}, True, ["--device", "{dev}", "--ulimit", "memlock=-1:-1"]),
    ({"dev.builder.rpc.rdma": "true"}, False, []),  # no RDMA NIC on the host: RPC stays on TCP
    ({}, True, []),  # an image without RDMA gets no device
    (None, True, []),  # not pulled yet: unknown, nothing added
])
def test_run_passes_the_rdma_devices_and_memlock_only_to_an_rdma_image_on_an_rdma_host(
        tmp_path: Path, labels: dict[str, str] | None, has_devices: bool, wanted: list[str]) -> None:
    devices = tmp_path / "infiniband"
    if has_devices:
        devices.mkdir()
        (devices / "uverbs0").touch()
    engine = _Engine(labels)
    flags = rdma_flags(engine, "localhost/builder/cpu:cpu", devices)  # type: ignore[arg-type]
    assert flags == [word.format(dev=devices) for word in wanted]
    assert engine.asked == (1 if has_devices else 0)



def test_builder_targets_names_the_variants_built_with_rdma(tmp_path: Path) -> None:
    shipped = run_cli_inproc("targets")
    assert "RPC over RDMA: off in every recipe" in shipped.stdout
    folder = rdma_recipes(tmp_path)
    text = run_cli_inproc("targets", "--recipes", str(folder))
    assert "RPC over RDMA (a variant's rpc_rdma: true; docs/recipes.md): cpu/cpu" in text.stdout.splitlines()
    entries = json.loads(run_cli_inproc("targets", "--recipes", str(folder), "--json").stdout)
    assert [(e["target"], e["variant"]) for e in entries if e["rpc_rdma"]] == [("cpu", "cpu")]


def _split_cluster(tmp_path: Path) -> Path:
    gguf = tmp_path / "chat.gguf"
    gguf.write_bytes(b"GGUF" + bytes(500))
    nodes = [{"name": name, "mac": f"52:54:00:00:03:{last:02x}", "target": "cpu", "memory": "1GiB",
              "address": f"10.0.0.{last}"} for name, last in (("head", 11), ("worker", 12))]
    data = {"control": {"address": "10.0.0.1"}, "nodes": nodes,
            "services": [{"name": "big", "model": "chat.gguf", "sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(),
                          "topology": "split", "head": "head", "workers": ["worker"]}]}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("rdma", [True, False])
def test_quadlet_units_of_an_rdma_image_add_the_rdma_devices_where_the_node_has_them(tmp_path: Path,
                                                                                    rdma: bool) -> None:
    """Installed nodes run what `builder run` runs: an RDMA image gets /dev/infiniband (Quadlet's optional form,
    '-': left out on a node without it) and no memlock cap, on the head and on the worker."""
    cluster, out = _split_cluster(tmp_path), tmp_path / "out"
    recipes = ("--recipes", str(rdma_recipes(tmp_path))) if rdma else ()
    proc = run_cli_inproc("cluster", "export", str(cluster), "--format", "quadlet", "--out", str(out), *recipes)
    assert proc.returncode == 0, proc.stderr
    for unit in ("head/builder-big.container", "worker/builder-big-rpc.container"):
        lines = (out / unit).read_text().splitlines()
        assert ("AddDevice=-/dev/infiniband" in lines) is rdma and ("Ulimit=memlock=-1:-1" in lines) is rdma, unit


def _with_worker_env(tmp_path: Path, env: dict[str, object]) -> Path:
    path = _split_cluster(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["nodes"][1]["env"] = env
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_nodes_rdma_settings_reach_its_worker(tmp_path: Path) -> None:
    path = _with_worker_env(tmp_path, {"GGML_RDMA_DEV": "mlx5_0", "GGML_RDMA_GID": "3"})
    proc = run_cli_inproc("cluster", "commands", str(path), "--node", "worker")
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if " rpc-worker " in line)
    assert "--env GGML_RDMA_DEV=mlx5_0" in line and "--env GGML_RDMA_GID=3" in line


@pytest.mark.parametrize(("env", "needle"), [
    ({"GGML_RDMA_GID": "three"}, "nodes[1].env.GGML_RDMA_GID: 'three' is not a GID index"),
    ({"GGML_RDMA_GID": "-1"}, "nodes[1].env.GGML_RDMA_GID"),
    ({"GGML_RDMA_DEV": "mlx5_0 --x"}, "nodes[1].env.GGML_RDMA_DEV: 'mlx5_0 --x' is not an RDMA device name"),
    ({"GGML_RDMA_DEV": ""}, "nodes[1].env.GGML_RDMA_DEV"),
    ({"GGML_RPC_NO_RDMA": "0"}, "nodes[1].env.GGML_RPC_NO_RDMA: '0' is not 1"),
])
def test_a_bad_rdma_setting_is_one_line(tmp_path: Path, env: dict[str, object], needle: str) -> None:
    path = _with_worker_env(tmp_path, env)
    data = yaml.safe_load(path.read_text())
    data["nodes"][1]["unsafe_env"] = True  # checked all the same: these values reach ggml-rpc's atoi
    path.write_text(yaml.safe_dump(data))
    proc = run_cli_inproc("cluster", "commands", str(path))
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    first = proc.stderr.splitlines()[0]
    assert "cluster.yaml" in first and needle in first, first
