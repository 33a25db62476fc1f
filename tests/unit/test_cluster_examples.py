"""The worked examples in docs/examples/ (docs/clusters.md): one cluster file per seed cluster. Each must load as
the docs describe it, give a gateway config HAProxy accepts, and firewall rules nft accepts. Nothing is
started: their addresses are a private network's, not this machine's."""

import json
import shlex
import subprocess
from pathlib import Path

import pytest

from builder.cluster.gateway import write_gateway
from builder.cluster.model import load_cluster
from conftest import ROOT, require_tool, run_cli_inproc

EXAMPLES = ROOT / "docs" / "examples"

# What each example's comments promise: (service, node, role) for every process.
EXPECTED = {
    "strix-halo-x4.yaml": [
        ("llama-3.3-70b", "halo1", "server"), ("llama-3.3-70b", "halo2", "server"),
        ("qwen2.5-7b", "halo1", "server"), ("qwen2.5-7b", "halo2", "server"),
        ("qwen3-235b", "halo3", "server"), ("qwen3-235b", "halo4", "rpc-worker")],
    "intel-mini-pc-x3.yaml": [
        *[("llama-3.1-8b", f"mini{i}", "server") for i in (1, 2, 3)],
        *[("qwen2.5-coder-7b", f"mini{i}", "server") for i in (1, 2, 3)]],
    "arc-a770-x2.yaml": [("qwen2.5-32b", "arc1", "server"), ("qwen2.5-32b", "arc2", "rpc-worker")],
    "hf-mini-pc-x2.yaml": [
        *[("llama-3.1-8b", f"mini{i}", "server") for i in (1, 2)],
        *[("qwen2.5-coder-7b", f"mini{i}", "server") for i in (1, 2)]],
    "rtx-3060-x4.yaml": [
        ("qwen2.5-7b", "rtx1", "server"), ("llama-3.1-8b", "rtx1", "server"), ("llama-2-13b", "rtx2", "server"),
        ("codellama-34b", "rtx3", "server"), ("codellama-34b", "rtx4", "rpc-worker")],
}


def test_every_example_is_covered_and_documented() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(EXPECTED)
    doc = (ROOT / "docs" / "clusters.md").read_text()
    for name in EXPECTED:
        assert f"docs/examples/{name}" in doc, name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_places_its_services_as_its_comments_say(name: str) -> None:
    loaded = load_cluster(EXAMPLES / name)
    assert [(p.service, p.node, p.role) for p in loaded.processes] == EXPECTED[name]
    assert not loaded.warnings


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_gateway_and_firewall_pass_their_checkers(name: str, tmp_path: Path) -> None:
    require_tool("haproxy", "haproxy")
    require_tool("nft", "nftables")
    loaded = load_cluster(EXAMPLES / name)
    addresses = {node.name: str(node.address) for node in loaded.cluster.nodes}
    state = tmp_path / "state"
    state.mkdir()
    config = write_gateway(loaded, state, "10.0.0.1", addresses)  # runs `haproxy -c` (no socket is bound)
    routed = config.read_text()
    assert all(f"-m str {service.name} }}" in routed for service in loaded.cluster.services), routed
    out = tmp_path / "nft"
    proc = run_cli_inproc("cluster", "firewall", str(EXAMPLES / name), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    for node in loaded.cluster.nodes:
        rules = out / f"{node.name}.nft"
        check = subprocess.run(["nft", "-c", "-f", str(rules)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        assert "10.0.0.1" in rules.read_text()  # the control node is admitted


def test_too_little_memory_is_refused_in_one_line(tmp_path: Path) -> None:
    """The rtx example is sized to its 11 GiB cards: half a GiB more on box 1 does not fit."""
    text = (EXAMPLES / "rtx-3060-x4.yaml").read_text().replace("memory: 5.5GiB", "memory: 6GiB", 1)
    path = tmp_path / "rtx.yaml"
    path.write_text(text)
    proc = run_cli_inproc("cluster", "status", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "nodes[0].memory: rtx1 has 11.0 GiB but its services need 11.5 GiB" in proc.stderr, proc.stderr


def test_commands_for_boxes_builder_does_not_boot_are_what_builder_run_accepts() -> None:
    """The RTX 3060 boxes are not netbooted: `builder cluster commands` prints what each box runs. Every line
    is a `builder run` that builder itself accepts (`--print`: the engine command, nothing started)."""
    path = EXAMPLES / "rtx-3060-x4.yaml"
    proc = run_cli_inproc("cluster", "commands", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    found = {entry["node"]: entry["argv"] for entry in json.loads(proc.stdout)}
    assert sorted(found) == ["rtx1", "rtx2", "rtx3", "rtx4"]
    assert [argv[argv.index("--alias") + 1] for argv in found["rtx1"]] == ["qwen2.5-7b", "llama-3.1-8b"]
    head = found["rtx3"][0]
    assert head[head.index("--rpc") + 1] == "10.0.0.44:50052" and head[head.index("--host") + 1] == "10.0.0.43"
    # the box keeps the GGUF under its sha256, and builder run checks it before the container starts
    sha = load_cluster(path).service("codellama-34b").sha256
    assert head[head.index("-m") + 1] == f"/srv/models/{sha}.gguf" and head[head.index("--model-sha256") + 1] == sha
    assert found["rtx4"] == [["builder", "run", "--target", "nvidia", "--detach", "--name",
                              "builder-codellama-34b-rpc", "rpc-worker", "--host", "10.0.0.44", "--port", "50052"]]
    for argv in [a for commands in found.values() for a in commands]:
        assert argv[:2] == ["builder", "run"]
        # An image reference the test names: `--print` needs no built image, so no nvidia image is ever built here
        printed = run_cli_inproc("run", "--print", "--image", "localhost/builder-example:nvidia", *argv[2:])
        assert printed.returncode == 0, printed.stderr
        engine_argv = shlex.split(printed.stdout.strip().splitlines()[-1])
        role = argv.index("server") if "server" in argv else argv.index("rpc-worker")
        assert engine_argv[-len(argv[role:]):] == argv[role:]  # the role and its arguments reach the image as they are
    text = run_cli_inproc("cluster", "commands", str(path), "--node", "rtx4").stdout
    assert text.splitlines() == ["# rtx4 (10.0.0.44)", "builder run --target nvidia --detach --name "
                                 "builder-codellama-34b-rpc rpc-worker --host 10.0.0.44 --port 50052"]
    bad = run_cli_inproc("cluster", "commands", str(path), "--models", "models")
    assert bad.returncode == 2 and "--models: 'models' is not an absolute folder path" in bad.stderr
