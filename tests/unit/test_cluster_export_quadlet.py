"""`builder cluster export --format quadlet`: the units of the RTX-3060 example and of a cpu file use only keys
podman 4.9's Quadlet accepts (Ubuntu 24.04's podman), every container runs what `builder cluster commands`
prints for the same process with the variant's devices, groups and security options, servers check their
model's sha256 before they start, RPC workers keep their cache in a volume, images come by digest from a
registry, and bad input is one line with nothing written. tests/engine/test_export_quadlet.py renders the same
units with Quadlet itself and runs them under systemd."""

import hashlib
import json
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from registry import publish_empty_image, start_registry

from builder.cluster.export_quadlet import GROUPS_VARIABLE, groups_script
from conftest import ROOT, run_cli_inproc

RTX = ROOT / "docs" / "examples" / "rtx-3060-x4.yaml"

# The keys podman 4.9's podman-systemd.unit(5) lists for [Container] and [Volume] (docs.podman.io/en/v4.9.3).
# Later releases added GroupAdd (5.1), Entrypoint, StopTimeout and Pod (5.0), LogOpt, StopSignal and
# NetworkAlias (5.2): none of them is here, so a unit that uses one fails this test.
PODMAN_4_9_KEYS = {
    "Container": {
        "AddCapability", "AddDevice", "Annotation", "AutoUpdate", "ContainerName", "ContainersConfModule", "DNS",
        "DNSOption", "DNSSearch", "DropCapability", "Environment", "EnvironmentFile", "EnvironmentHost", "Exec",
        "ExposeHostPort", "GIDMap", "GlobalArgs", "Group", "HealthCmd", "HealthInterval", "HealthOnFailure",
        "HealthRetries", "HealthStartPeriod", "HealthStartupCmd", "HealthStartupInterval", "HealthStartupRetries",
        "HealthStartupSuccess", "HealthStartupTimeout", "HealthTimeout", "HostName", "IP", "IP6", "Image", "Label",
        "LogDriver", "Mask", "Mount", "Network", "NoNewPrivileges", "Notify", "PidsLimit", "PodmanArgs",
        "PublishPort", "Pull", "ReadOnly", "ReadOnlyTmpfs", "Rootfs", "RunInit", "SeccompProfile", "Secret",
        "SecurityLabelDisable", "SecurityLabelFileType", "SecurityLabelLevel", "SecurityLabelNested",
        "SecurityLabelType", "ShmSize", "SubGIDMap", "SubUIDMap", "Sysctl", "Timezone", "Tmpfs", "UIDMap", "Ulimit",
        "Unmask", "User", "UserNS", "Volume", "WorkingDir"},
    "Volume": {"ContainersConfModule", "Copy", "Device", "Driver", "GlobalArgs", "Group", "Label", "Options",
               "PodmanArgs", "Type", "User"},
}
# systemd's own sections pass through Quadlet untouched: the keys these units use, from systemd.unit(5),
# systemd.service(5) and systemd.exec(5)
SYSTEMD_KEYS = {"Unit": {"Description", "Wants", "After"},
                "Service": {"Restart", "RestartSec", "TimeoutStartSec", "EnvironmentFile", "ExecStartPre"},
                "Install": {"WantedBy"}}


def parse(text: str) -> list[tuple[str, str, str]]:
    """A unit file as (section, key, value) in order; comments left out."""
    out, section = [], ""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key, value))
    return out


def values(entries: list[tuple[str, str, str]], key: str) -> list[str]:
    return [v for _, k, v in entries if k == key]


def _node(name: str, last: int, target: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "mac": f"52:54:00:00:02:{last:02x}", "target": target, "memory": "1GiB",
            "address": f"10.0.0.{last}", **extra}


@pytest.fixture
def cpu_file(tmp_path: Path) -> Path:
    """A replicated GGUF on a and b, a split (head c, worker d), a cpu vLLM pipeline, a Ray pipeline on two
    NVIDIA nodes, and a server on a strix-halo node (devices, groups, seccomp)."""
    gguf = tmp_path / "chat.gguf"
    gguf.write_bytes(b"GGUF" + bytes(500))
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    folder = tmp_path / "tiny-hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}\n")
    lines = f"{hashlib.sha256(b'{}' + bytes([10])).hexdigest()}  config.json\n"
    hashed = hashlib.sha256(lines.encode()).hexdigest()
    data = {"control": {"address": "10.0.0.1"},
            "nodes": [_node("a", 11, "cpu", env={"OMP_NUM_THREADS": "4"}), _node("b", 12, "cpu"),
                      _node("c", 13, "cpu"), _node("d", 14, "cpu"), _node("g1", 21, "nvidia"),
                      _node("g2", 22, "nvidia"), _node("amd", 31, "strix-halo", variant="rocm")],
            "services": [
                {"name": "chat", "model": "chat.gguf", "sha256": sha, "nodes": ["a", "b"]},
                {"name": "big", "model": "chat.gguf", "sha256": sha, "topology": "split", "head": "c",
                 "workers": ["d"], "context": 4096},
                {"name": "pipe", "engine": "vllm", "model": "tiny-hf", "sha256": hashed, "topology": "pipeline",
                 "nodes": ["b", "c", "d"]},
                {"name": "ray", "engine": "vllm", "model": "tiny-hf", "sha256": hashed, "topology": "pipeline",
                 "nodes": ["g1", "g2"]},
                {"name": "rocm", "model": "chat.gguf", "sha256": sha, "nodes": ["amd"]}]}
    path = tmp_path / "cpu.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _export(path: Path, out: Path, *extra: str) -> tuple[dict[str, Any], dict[str, list[tuple[str, str, str]]]]:
    proc = run_cli_inproc("cluster", "export", str(path), "--format", "quadlet", "--out", str(out), "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    on_disk = sorted(f"{p.parent.name}/{p.name}" for p in out.glob("*/*"))
    assert set(answer["files"]) <= set(on_disk)
    return answer, {name: parse((out / name).read_text()) for name in answer["files"]}


def _check_keys(units: dict[str, list[tuple[str, str, str]]]) -> None:
    allowed = {**PODMAN_4_9_KEYS, **SYSTEMD_KEYS}
    for name, entries in units.items():
        for section, key, _ in entries:
            assert section in allowed and key in allowed[section], f"{name}: [{section}] {key}"


def test_the_rtx_example_uses_podman_4_9_keys_and_cdi(tmp_path: Path) -> None:
    answer, units = _export(RTX, tmp_path / "out")
    _check_keys(units)
    assert sorted(units) == ["rtx1/builder-llama-3.1-8b.container", "rtx1/builder-qwen2.5-7b.container",
                             "rtx2/builder-llama-2-13b.container", "rtx3/builder-codellama-34b.container",
                             "rtx4/builder-codellama-34b-rpc-cache.volume", "rtx4/builder-codellama-34b-rpc.container"]
    containers = {name: entries for name, entries in units.items() if name.endswith(".container")}
    for entries in containers.values():
        assert values(entries, "Image") == ["localhost/builder/nvidia:cuda"]
        assert values(entries, "AddDevice") == ["nvidia.com/gpu=all"]  # CDI, from NVIDIA's container toolkit
        assert values(entries, "Network") == ["host"] and values(entries, "Restart") == ["always"]
        assert len(values(entries, "HealthCmd")) == 1 and values(entries, "WantedBy") == ["multi-user.target"]
    head = containers["rtx3/builder-codellama-34b.container"]
    exec_words = shlex.split(values(head, "Exec")[0])
    assert exec_words[:4] == ["server", "-m", f"/models/{'0' * 64}.gguf", "--host"]
    assert exec_words[4] == "10.0.0.43" and "10.0.0.44:50052" in exec_words
    assert values(head, "Volume") == [f"/srv/models/{'0' * 64}.gguf:/models/{'0' * 64}.gguf:ro"]
    assert any("sha256sum" in v for v in values(head, "ExecStartPre"))
    worker = containers["rtx4/builder-codellama-34b-rpc.container"]
    assert values(worker, "Volume") == ["builder-codellama-34b-rpc-cache.volume:/var/cache/llama.cpp/rpc"]
    assert values(worker, "ExecStartPre") == []  # a worker serves no model file
    assert any("nvidia-ctk cdi generate" in step for step in answer["steps"])
    assert any("local tags" in w for w in answer["warnings"])


def test_a_board_with_several_accelerators_runs_the_device_its_service_picks(tmp_path: Path) -> None:
    """intel-mini-pc-x3: each board lists an iGPU and an NPU under devices:, every service picks the iGPU; each
    unit runs the iGPU's image with the iGPU's device, and nothing of the NPU's (the export used to stop with a
    traceback on such a board)."""
    answer, units = _export(ROOT / "docs" / "examples" / "intel-mini-pc-x3.yaml", tmp_path / "out")
    _check_keys(units)
    assert answer["images"] == {f"mini{i}/llama.cpp/igpu": "localhost/builder/intel-arc:vulkan" for i in (1, 2, 3)}
    assert len(units) == 6
    for entries in units.values():
        assert values(entries, "Image") == ["localhost/builder/intel-arc:vulkan"]
        assert values(entries, "AddDevice") == ["/dev/dri"]


def _tail(argv: list[str]) -> list[str]:
    return argv[next(i for i, w in enumerate(argv) if w in ("server", "rpc-worker", "serve")
                     and argv[i - 1] not in ("--name", "--flavour")):]


def test_every_container_runs_what_cluster_commands_prints(cpu_file: Path, tmp_path: Path) -> None:
    proc = run_cli_inproc("cluster", "commands", str(cpu_file), "--models", "/m", "--json")
    assert proc.returncode == 0, proc.stderr
    lines = {f"{entry['node']}/{argv[argv.index('--name') + 1]}.container": argv
             for entry in json.loads(proc.stdout) for argv in entry["argv"]}
    printed = {name: _tail(argv) for name, argv in lines.items()}
    answer, units = _export(cpu_file, tmp_path / "out", "--models", "/m")
    _check_keys(units)
    containers = {name: entries for name, entries in units.items() if name.endswith(".container")}
    assert set(containers) == set(printed)  # one unit per printed line; the Ray pipeline has neither
    assert any(w.startswith("ray: a Ray pipeline is not exported") for w in answer["warnings"])
    for name, entries in containers.items():
        words = shlex.split(values(entries, "Exec")[0])
        # builder run mounts the model under /models and rewrites its path: the units do the same
        expected = [w.replace("/m/", "/models/") for w in printed[name]]
        assert words == expected, name
        assert values(entries, "ContainerName") == [name.split("/")[1].removesuffix(".container")]
    assert values(containers["a/builder-chat.container"], "Environment") == ["OMP_NUM_THREADS=4"]
    # the pipeline's ranks bind their node's address and take the interface from the box on a builder run line
    assert any("GLOO_SOCKET_IFNAME" in w for w in answer["warnings"])
    rank = lines["c/builder-pipe-pipeline.container"]
    assert values(containers["c/builder-pipe-pipeline.container"], "ShmSize") == [rank[rank.index("--shm-size") + 1]]
    assert values(containers["c/builder-pipe-pipeline.container"], "HealthCmd") == []
    assert values(containers["b/builder-pipe.container"], "Volume") == [
        f"/m/{yaml.safe_load(cpu_file.read_text())['services'][2]['sha256']}:/models/"
        f"{yaml.safe_load(cpu_file.read_text())['services'][2]['sha256']}:ro"]


def test_a_device_variant_gets_its_devices_groups_and_security_options(cpu_file: Path, tmp_path: Path) -> None:
    _, units = _export(cpu_file, tmp_path / "out")
    rocm = units["amd/builder-rocm.container"]
    assert values(rocm, "Image") == ["localhost/builder/strix-halo:rocm"]
    assert values(rocm, "AddDevice") == ["/dev/dri", "/dev/kfd"]
    assert values(rocm, "SeccompProfile") == ["unconfined"]
    # podman 4.9 has no GroupAdd=: the groups found at start go in through PodmanArgs= (systemd splits the value)
    assert values(rocm, "PodmanArgs") == [f"${GROUPS_VARIABLE}"]
    assert values(rocm, "EnvironmentFile") == ["-/run/builder/builder-rocm.env"]
    assert "/dev/dri /dev/kfd" in values(rocm, "ExecStartPre")[0]
    assert values(units["a/builder-chat.container"], "AddDevice") == []


def _unescape(exec_line: str) -> list[str]:
    """An ExecStartPre= as the command systemd runs: words unquoted, $$ and %% undoubled."""
    return [w.replace("$$", "$").replace("%%", "%") for w in shlex.split(exec_line)]


def test_the_model_check_refuses_a_model_that_differs(cpu_file: Path, tmp_path: Path) -> None:
    """The ExecStartPre each server runs first, run with /bin/sh on the files a node would hold."""
    models = tmp_path / "models"
    _, units = _export(cpu_file, tmp_path / "out", "--models", str(models))
    data = yaml.safe_load(cpu_file.read_text())
    sha, folder_hash = data["services"][0]["sha256"], data["services"][2]["sha256"]
    models.mkdir()
    (models / f"{sha}.gguf").write_bytes((cpu_file.parent / "chat.gguf").read_bytes())
    (models / folder_hash).mkdir()
    (models / folder_hash / "config.json").write_text("{}\n")

    def check(name: str) -> subprocess.CompletedProcess[str]:
        line = next(v for v in values(units[name], "ExecStartPre") if "sha256sum" in v)
        return subprocess.run(_unescape(line), capture_output=True, text=True, timeout=60)

    assert check("a/builder-chat.container").returncode == 0
    assert check("b/builder-pipe.container").returncode == 0
    (models / f"{sha}.gguf").write_bytes(b"GGUF" + bytes(499))
    (models / folder_hash / "extra.json").write_text("{}\n")
    for name in ("a/builder-chat.container", "b/builder-pipe.container"):
        proc = check(name)
        assert proc.returncode == 1 and "the cluster file says" in proc.stderr, proc.stderr


def test_the_group_script_finds_the_device_nodes_gids(tmp_path: Path) -> None:
    """What a unit's ExecStartPre writes for PodmanArgs=$BUILDER_GROUPS, on files standing in for device nodes:
    the gid of a node given by path and of each node in a folder, each once."""
    folder = tmp_path / "dri"
    (folder / "by-path").mkdir(parents=True)
    (folder / "card0").write_text("")
    single = tmp_path / "kfd"
    single.write_text("")
    env = tmp_path / "groups.env"
    script = groups_script((str(folder), str(single)), str(env)).replace("mkdir -p /run/builder; ", "")
    subprocess.run(["/bin/sh", "-c", script], check=True, timeout=60)
    assert env.read_text() == f"{GROUPS_VARIABLE}= --group-add {os.getgid()}\n"


def test_images_by_digest_from_a_registry(tmp_path: Path) -> None:
    with start_registry(tmp_path / "registry") as reg:
        published = publish_empty_image(reg, "team/builder", "nvidia-cuda")
        answer, units = _export(RTX, tmp_path / "out", "--registry", f"{reg.host}/team/builder")
        assert {v for entries in units.values() for v in values(entries, "Image")} == {published}
        assert not any("local tags" in w for w in answer["warnings"])


def test_a_second_export_replaces_its_own_units_only(cpu_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _export(cpu_file, out)
    mine = out / "a" / "my-own.container"
    mine.write_text("[Container]\nImage=x\n")
    stale = out / "a" / "builder-gone.container"
    stale.write_text((out / "a" / "builder-chat.container").read_text())
    _export(cpu_file, out)
    assert mine.exists() and not stale.exists()


@pytest.mark.parametrize(("args", "first"), [
    (["--models-claim", "models"], "error: --models-claim: a PersistentVolumeClaim is Kubernetes' (--format kube)"),
    (["--models", "srv/models"], "error: --models: 'srv/models' is not an absolute folder path of plain characters"),
])
def test_bad_options_are_one_line_and_write_nothing(cpu_file: Path, tmp_path: Path, args: list[str],
                                                    first: str) -> None:
    out = tmp_path / "out"
    proc = run_cli_inproc("cluster", "export", str(cpu_file), "--format", "quadlet", "--out", str(out), *args)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == first
    assert not out.exists()

