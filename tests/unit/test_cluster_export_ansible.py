"""`builder cluster export --format ansible` and `builder cluster commands --registry`: the RTX-3060 example's
inventory and playbook as ansible-core itself reads them (ansible-inventory, ansible-playbook --syntax-check),
ansible-core's own modules only, each model fetched from the control node by sha256, the same units as
`--format quadlet` and the same rules as `builder cluster firewall`; netbooted nodes left out; `cluster
commands` lines and the playbook's units that run the published image by digest.
tests/engine/test_export_quadlet.py runs the playbook over ssh against a systemd box."""

import hashlib
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from registry import publish_empty_image, start_registry

from conftest import ROOT, run_cli_inproc

RTX = ROOT / "docs" / "examples" / "rtx-3060-x4.yaml"
BIN = Path(sys.executable).parent


def export(path: Path, out: Path, *extra: str) -> dict[str, Any]:
    proc = run_cli_inproc("cluster", "export", str(path), "--format", "ansible", "--out", str(out), "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    answer = dict(json.loads(proc.stdout))
    assert set(answer["files"]) <= {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    return answer


def ansible(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={"PATH": f"{BIN}:/usr/bin:/bin", "ANSIBLE_LOCAL_TEMP": str(cwd / ".tmp"),
                               "ANSIBLE_HOME": str(cwd / ".ansible"), "LC_ALL": "C.UTF-8"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_the_rtx_example_as_ansible_reads_it(tmp_path: Path) -> None:
    out = tmp_path / "play"
    answer = export(RTX, out)
    inventory = json.loads(ansible("ansible-inventory", "-i", "inventory.yml", "--list", cwd=out).stdout)
    nodes = ("rtx1", "rtx2", "rtx3", "rtx4")
    assert inventory["builder_nodes"]["hosts"] == list(nodes)
    assert {h: v["ansible_host"] for h, v in inventory["_meta"]["hostvars"].items()} == {
        "rtx1": "10.0.0.41", "rtx2": "10.0.0.42", "rtx3": "10.0.0.43", "rtx4": "10.0.0.44"}
    assert inventory["target_nvidia"]["hosts"] == list(nodes)
    assert inventory["service_codellama_34b"]["hosts"] == ["rtx3", "rtx4"]
    assert inventory["service_qwen2_5_7b"]["hosts"] == ["rtx1"]
    ansible("ansible-playbook", "-i", "inventory.yml", "--syntax-check", "site.yml", cwd=out)

    tasks = yaml.safe_load((out / "site.yml").read_text())[0]["tasks"]
    modules = [next(k for k in task if "." in k) for task in tasks]
    assert all(m.startswith("ansible.builtin.") for m in modules), modules
    fetch = next(t["ansible.builtin.get_url"] for t in tasks if "ansible.builtin.get_url" in t)
    assert fetch["checksum"] == "sha256:{{ item.sha256 }}"
    assert next(t["ansible.builtin.apt"] for t in tasks if "ansible.builtin.apt" in t)["name"] == [
        "podman", "nftables"]

    shas = {s["name"]: s["sha256"] for s in yaml.safe_load(RTX.read_text())["services"]}
    rtx1 = yaml.safe_load((out / "host_vars" / "rtx1.yml").read_text())
    assert rtx1["builder_units"] == ["builder-llama-3.1-8b.service", "builder-qwen2.5-7b.service"]
    assert [m["service"] for m in rtx1["builder_models"]] == ["qwen2.5-7b", "llama-3.1-8b"]
    for model in rtx1["builder_models"]:
        assert model["url"] == f"http://10.0.0.1:8000/blobs/sha256/{shas[model['service']]}"
        assert model["dest"] == f"/srv/models/{shas[model['service']]}.gguf"
    rtx4 = yaml.safe_load((out / "host_vars" / "rtx4.yml").read_text())
    assert rtx4 == {"builder_units": ["builder-codellama-34b-rpc.service"], "builder_models": []}

    # the units are the quadlet export's, the rules `builder cluster firewall`'s
    quadlet = tmp_path / "units"
    assert run_cli_inproc("cluster", "export", str(RTX), "--format", "quadlet", "--out", str(quadlet)).returncode == 0
    for unit in quadlet.glob("*/*"):
        assert (out / "units" / unit.parent.name / unit.name).read_bytes() == unit.read_bytes()
    rules = run_cli_inproc("cluster", "firewall", str(RTX), "--node", "rtx3")
    assert (out / "firewall" / "rtx3.nft").read_text() == rules.stdout
    assert any(line.startswith("ansible-playbook -i inventory.yml site.yml") for line in answer["steps"])
    assert any(f"-> pxe-root/blobs/sha256/{shas['llama-2-13b']}" in line for line in answer["steps"])


def test_netbooted_nodes_and_model_folders_are_left_to_netboot_and_by_hand(tmp_path: Path) -> None:
    gguf = tmp_path / "chat.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    folder = tmp_path / "tiny-hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}\n")
    lines = f"{hashlib.sha256(b'{}' + bytes([10])).hexdigest()}  config.json\n"
    data = {"control": {"address": "10.0.0.1", "http_port": 8001},
            "nodes": [{"name": "booted", "mac": "52:54:00:00:03:01", "target": "cpu", "memory": "1GiB",
                       "address": "10.0.0.11"},
                      {"name": "box", "target": "cpu", "memory": "4GiB", "address": "10.0.0.12"}],
            "services": [{"name": "chat", "model": "chat.gguf", "sha256": sha, "nodes": ["booted", "box"]},
                         {"name": "hf", "engine": "vllm", "model": "tiny-hf",
                          "sha256": hashlib.sha256(lines.encode()).hexdigest(), "nodes": ["box"]}]}
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "play"
    answer = export(path, out)
    assert not any(f.startswith(("units/booted", "host_vars/booted")) for f in answer["files"])
    assert any("booted: netbooted (mac:), left out of the playbook" in w for w in answer["warnings"])
    assert any("box: hf's model is a folder, which the playbook does not fetch" in w for w in answer["warnings"])
    box = yaml.safe_load((out / "host_vars" / "box.yml").read_text())
    assert box["builder_models"] == [{"service": "chat", "sha256": sha, "url": f"http://10.0.0.1:8001/blobs/sha256/{sha}",
                                      "dest": f"/srv/models/{sha}.gguf"}]
    assert box["builder_units"] == ["builder-chat.service", "builder-hf.service"]

    # a second export replaces its own files only
    mine = out / "units" / "box" / "my-own.container"
    mine.write_text("[Container]\nImage=x\n")
    stale = out / "host_vars" / "gone.yml"
    stale.write_text((out / "host_vars" / "box.yml").read_text())
    export(path, out)
    assert mine.exists() and not stale.exists()

    # every node netbooted: nothing for the playbook, one line, nothing written
    data["nodes"][1]["mac"] = "52:54:00:00:03:02"
    path.write_text(yaml.safe_dump(data))
    proc = run_cli_inproc("cluster", "export", str(path), "--format", "ansible", "--out", str(tmp_path / "none"))
    assert proc.returncode == 2 and not (tmp_path / "none").exists()
    assert proc.stderr.splitlines()[0].startswith(f"error: {path}: no node without a mac: runs a unit")


@pytest.mark.parametrize(("change", "first"), [
    ({"control": None}, "control: the playbook fetches the models from the control node, and none is declared"),
    ({"models": "srv"}, "--models: 'srv' is not an absolute folder path"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, change: dict[str, Any], first: str) -> None:
    data = yaml.safe_load(RTX.read_text())
    extra: list[str] = []
    if "control" in change:
        del data["control"]
    else:
        extra = ["--models", change["models"]]
    path = tmp_path / "rtx.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    proc = run_cli_inproc("cluster", "export", str(path), "--format", "ansible", "--out", str(out), *extra)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) <= 2, proc.stderr
    assert first in proc.stderr.splitlines()[0]
    assert not out.exists()


def test_commands_run_the_published_image_by_digest(tmp_path: Path) -> None:
    with start_registry(tmp_path / "registry") as reg:
        repo = f"{reg.host}/team/builder"
        never = run_cli_inproc("cluster", "commands", str(RTX), "--registry", repo)
        assert never.returncode == 2 and not never.stdout
        assert never.stderr.splitlines()[0] == (f"error: --registry {repo}: nvidia/cuda was never published there "
                                                "(no tag nvidia-cuda)")
        published = publish_empty_image(reg, "team/builder", "nvidia-cuda")
        proc = run_cli_inproc("cluster", "commands", str(RTX), "--registry", repo, "--json")
        assert proc.returncode == 0, proc.stderr
        lines = [argv for entry in json.loads(proc.stdout) for argv in entry["argv"]]
        assert len(lines) == 5
        for argv in lines:
            assert argv[argv.index("--image") + 1] == published
        text = run_cli_inproc("cluster", "commands", str(RTX), "--registry", repo).stdout
        assert f"--image {shlex.quote(published)}" in text
        # the playbook's units run the same image by digest
        answer = export(RTX, tmp_path / "play", "--registry", repo)
        assert set(answer["images"].values()) == {published}
        assert not any("local tags" in w for w in answer["warnings"])
        assert f"Image={published}\n" in (tmp_path / "play" / "units" / "rtx3" / "builder-codellama-34b.container"
                                           ).read_text()
    # without --registry: the box's own build of the target, as before
    plain = json.loads(run_cli_inproc("cluster", "commands", str(RTX), "--json").stdout)
    assert not any("--image" in argv for entry in plain for argv in entry["argv"])
