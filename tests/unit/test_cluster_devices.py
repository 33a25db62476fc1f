"""Boards with several accelerators (docs/clusters.md): a node lists `devices:`, a service picks one with
`device:`, and each process runs its device's image: in `cluster commands`, in local mode (the image and its
run contract) and on a netbooted node, which boots one device's root. What does not fit is one line."""

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_netboot import fake_artifacts, publish

from builder.cluster.model import Process, load_cluster
from builder.engines.podman import PodmanEngine
from conftest import run_cli_inproc

MODEL = b"GGUF" + bytes(1000)
SHA = hashlib.sha256(MODEL).hexdigest()
CORE_ULTRA = {"igpu": {"target": "intel-arc", "variant": "vulkan"}, "npu": {"target": "intel-npu"}}


def mini(name: str, last: int, **extra: Any) -> dict[str, Any]:
    """A Core Ultra mini PC: its iGPU and its NPU, sharing 24 GiB for models."""
    return {"name": name, "address": f"10.0.0.{last}", "devices": CORE_ULTRA, "memory": "24GiB", **extra}


def service(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "model": "tiny.gguf", "sha256": SHA, "memory": "2GiB", **extra}


def cluster_file(tmp_path: Path, **changes: Any) -> Path:
    (tmp_path / "tiny.gguf").write_bytes(MODEL)
    data: dict[str, Any] = {
        "control": {"address": "10.0.0.1"},
        "nodes": [mini("mini1", 21), mini("mini2", 22), {"name": "box", "target": "cpu", "memory": "8GiB",
                                                          "address": "10.0.0.30"}],
        "services": [service("chat", device="igpu", nodes=["mini1", "mini2"]),
                     service("code", device="npu", nodes=["mini1"]),
                     service("big", device="npu", topology="split", head="box", workers=["mini2"])],
    }
    data.update(changes)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_each_process_runs_the_device_its_service_picks(tmp_path: Path) -> None:
    loaded = load_cluster(cluster_file(tmp_path))
    runs = {(p.service, p.node, p.role): (p.device, p.target, p.variant) for p in loaded.processes}
    assert runs == {
        ("chat", "mini1", "server"): ("igpu", "intel-arc", "vulkan"),
        ("chat", "mini2", "server"): ("igpu", "intel-arc", "vulkan"),
        ("code", "mini1", "server"): ("npu", "intel-npu", "openvino"),  # the target's default variant
        ("big", "box", "server"): (None, "cpu", "cpu"),  # a one-target node runs its target whatever the pick
        ("big", "mini2", "rpc-worker"): ("npu", "intel-npu", "openvino"),
    }


def test_cluster_commands_gives_each_process_its_devices_image(tmp_path: Path) -> None:
    proc = run_cli_inproc("cluster", "commands", "--json", str(cluster_file(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    lines = {argv[argv.index("--name") + 1]: argv for entry in json.loads(proc.stdout) for argv in entry["argv"]
             if entry["node"] == "mini1"}

    def image(argv: list[str]) -> tuple[str, str | None]:
        variant = argv[argv.index("--variant") + 1] if "--variant" in argv else None
        return argv[argv.index("--target") + 1], variant

    assert image(lines["builder-chat"]) == ("intel-arc", "vulkan")
    assert image(lines["builder-code"]) == ("intel-npu", None)  # `builder run` fills in the default, as the file
    text = run_cli_inproc("cluster", "commands", "--node", "mini2", str(cluster_file(tmp_path))).stdout
    worker = next(line for line in text.splitlines() if "rpc-worker" in line)
    assert "--target intel-npu" in worker and "--host 10.0.0.22" in worker


def test_local_mode_runs_each_process_from_its_devices_image_with_its_run_contract(tmp_path: Path) -> None:
    from builder.cluster import local

    class HoldsEveryImage(PodmanEngine):
        """An engine store that already holds every image (building intel-arc and intel-npu takes ~40 min)."""

        def inspect(self, ref: str) -> dict[str, Any] | None:
            return {}

    loaded = load_cluster(cluster_file(tmp_path))
    images = local._images(loaded, HoldsEveryImage(), lambda _: None)
    mine = {p.service: images[p] for p in loaded.processes if p.node == "mini1"}
    assert "intel-arc" in mine["chat"] and "vulkan" in mine["chat"], mine
    assert "intel-npu" in mine["code"] and "openvino" in mine["code"], mine
    here = local.Local(loaded, tmp_path, "builder-cluster-0")

    def argv(process: Process) -> list[str]:
        return local.process_argv(here, PodmanEngine(), process, "IMAGE", tmp_path / "tiny.gguf")

    by_service = {p.service: argv(p) for p in loaded.processes if p.node == "mini1"}
    # the NPU image's contract sets OpenVINO's device; the iGPU's Vulkan image has no such variable
    assert "GGML_OPENVINO_DEVICE=NPU" in by_service["code"]
    assert not any(word.startswith("GGML_OPENVINO_DEVICE") for word in by_service["chat"])


def test_a_nodes_memory_counts_the_services_of_all_its_devices(tmp_path: Path) -> None:
    path = cluster_file(tmp_path, nodes=[mini("mini1", 21, memory="6GiB")],
                        services=[service("chat", device="igpu", nodes=["mini1"], memory="4GiB"),
                                  service("code", device="npu", nodes=["mini1"], memory="4GiB")])
    proc = run_cli_inproc("cluster", "status", "--local", str(path))
    assert proc.returncode == 2, proc.stderr
    assert "nodes[0].memory: mini1 has 6.0 GiB but its services need 8.0 GiB (chat 4.0 GiB, code 4.0 GiB)" in \
        proc.stderr, proc.stderr


@pytest.mark.parametrize(("change", "message"), [
    ({"services": [service("chat", nodes=["mini1"])]},
     "services[0].device: node mini1 has several devices (igpu, npu) and the service does not say which"),
    ({"services": [service("chat", device="gpu", nodes=["mini1"])]},
     "services[0].device: node mini1 (nodes[0]) has no device 'gpu' (did you mean 'igpu'?)"),
    ({"services": [service("chat", device="npu", nodes=["box"])],
      "nodes": [{"name": "box", "target": "cpu", "memory": "8GiB"}]},
     "services[0].device: 'npu' picks one of a node's devices:, and none of the service's nodes lists any"),
    ({"nodes": [mini("mini1", 21, target="intel-arc")]},
     "nodes[0]: gives both target: and devices:; a node has one target, or several devices"),
    ({"nodes": [{"name": "mini1", "memory": "8GiB"}]}, "nodes[0].target: required"),
    ({"nodes": [mini("mini1", 21, devices={"npu": {"target": "amd-xdna"}})]},
     "nodes[0].devices.npu: target: unknown target 'amd-xdna'"),
    ({"nodes": [mini("mini1", 21, devices={"igpu": {"target": "intel-arc", "variant": "rocm"}})]},
     "nodes[0].devices.igpu: variant: intel-arc has no variant 'rocm'"),
    ({"nodes": [mini("mini1", 21, devices={"NPU!": {"target": "intel-npu"}})]}, "nodes[0].devices"),
])
def test_a_devices_form_that_does_not_fit_is_one_line(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    changes = {"nodes": [mini("mini1", 21)], **change}
    proc = run_cli_inproc("cluster", "status", "--local", str(cluster_file(tmp_path, **changes)))
    assert proc.returncode == 2, proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("error: ") and "cluster.yaml: " in first and message in first, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) <= 2


def netbooted(tmp_path: Path, services: list[dict[str, Any]]) -> Path:
    return cluster_file(tmp_path, control={"address": "10.0.2.2", "http_port": 8000},
                        nodes=[mini("mini1", 21, mac="52:54:00:12:34:56")], services=services)


def test_a_netbooted_board_boots_the_root_of_the_device_its_services_use(tmp_path: Path) -> None:
    path = netbooted(tmp_path, [service("code", device="npu", nodes=["mini1"])])
    folder, manifest = fake_artifacts(tmp_path, "npu")
    root = tmp_path / "pxe-root"
    publish(root, path, {("intel-npu", "openvino"): (folder, manifest)}, keep=1)  # no intel-arc set is asked for
    script = (root / "current" / "nodes" / "52-54-00-12-34-56.ipxe").read_text()
    assert f"sha256/{manifest['files']['root.squashfs']['sha256']}" in script  # type: ignore[index]


def test_a_netbooted_board_with_services_on_two_devices_is_one_line(tmp_path: Path) -> None:
    path = netbooted(tmp_path, [service("chat", device="igpu", nodes=["mini1"]),
                                service("code", device="npu", nodes=["mini1"])])
    proc = run_cli_inproc("pxe", "publish", "--root", str(tmp_path / "pxe-root"), str(path))
    assert proc.returncode == 2, proc.stderr
    assert ("nodes[0]: mini1's services run on its devices igpu (intel-arc/vulkan), npu (intel-npu/openvino), and "
            "a netbooted node boots one device's image") in proc.stderr.splitlines()[0], proc.stderr
    assert "leave out mac:" in proc.stderr and not (tmp_path / "pxe-root" / "current").exists()


def test_the_schema_shows_devices_and_the_services_pick() -> None:
    proc = run_cli_inproc("cluster", "schema")
    assert proc.returncode == 0, proc.stderr
    defs = json.loads(proc.stdout)["$defs"]
    assert defs["ClusterNode"]["properties"]["devices"]["additionalProperties"] == {"$ref": "#/$defs/Device"}
    assert set(defs["Device"]["properties"]) == {"target", "variant"} and defs["Device"]["required"] == ["target"]
    assert "device" in defs["Service"]["properties"]


def test_status_names_a_boards_devices(tmp_path: Path) -> None:
    path = cluster_file(tmp_path)
    text = run_cli_inproc("cluster", "status", "--local", str(path))
    assert "node     mini1        127.0.0.11            igpu intel-arc, npu intel-npu" in text.stdout, text.stderr
    nodes = json.loads(run_cli_inproc("cluster", "status", "--local", "--json", str(path)).stdout)["nodes"]
    assert nodes[0]["target"] is None and nodes[0]["devices"] == {
        "igpu": {"target": "intel-arc", "variant": "vulkan"}, "npu": {"target": "intel-npu", "variant": None}}
    assert nodes[2]["target"] == "cpu" and nodes[2]["devices"] == {}


def test_the_mini_pc_example_runs_its_services_on_the_igpu_and_netboots_its_image() -> None:
    from builder.cluster.plans import load_for_netboot, netboot_set

    loaded = load_for_netboot(Path(__file__).resolve().parents[2] / "docs" / "examples" / "intel-mini-pc-x3.yaml")
    assert {(p.device, p.target, p.variant) for p in loaded.processes} == {("igpu", "intel-arc", "vulkan")}
    assert {netboot_set(loaded, node) for node in loaded.cluster.netbooted} == {("intel-arc", "vulkan")}


def test_kube_export_gives_each_devices_pod_its_image_and_device_plugin(tmp_path: Path) -> None:
    out = tmp_path / "kube"
    proc = run_cli_inproc("cluster", "export", "--format", "kube", "-o", str(out), str(cluster_file(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    chat = (out / "deployment-cluster-chat-mini1.yaml").read_text()
    code = (out / "deployment-cluster-code-mini1.yaml").read_text()
    assert "localhost/builder/intel-arc:vulkan" in chat and "gpu.intel.com/i915" in chat and "intel-npu" not in chat
    assert "localhost/builder/intel-npu:openvino" in code and "npu.intel.com/accel" in code


def test_a_netbooted_board_without_services_boots_its_first_device(tmp_path: Path) -> None:
    from builder.cluster.plans import load_for_netboot, netboot_set

    path = cluster_file(tmp_path, nodes=[mini("mini1", 21, mac="52:54:00:12:34:56"),
                                         {"name": "box", "target": "cpu", "memory": "8GiB", "address": "10.0.0.30"}],
                        services=[service("chat", nodes=["box"])])
    loaded = load_for_netboot(path)
    assert netboot_set(loaded, loaded.node("mini1")) == ("intel-arc", "vulkan")
