"""`builder cluster export --format kube`: every manifest of the RTX-3060 example and of a cpu file with a
replicate, a split and vLLM pipelines passes `kubernetes-validate --strict` (the built-in kinds; the
LeaderWorkerSet's pod templates as PodTemplateSpecs, its own fields against the CRD's schema), every container
runs what `builder cluster commands` prints for the same process, the images come by digest from a registry,
the API key is in no file, and bad input is one line with nothing written."""

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from registry import publish_empty_image, start_registry

from conftest import ROOT, run_cli_inproc

RTX = ROOT / "docs" / "examples" / "rtx-3060-x4.yaml"
LWS_SCHEMA = ROOT / "tests" / "data" / "kube" / "leaderworkerset-v1.schema.json"
KUBE_VERSION = "1.33"  # kubernetes-validate's bundled schemas: a release LeaderWorkerSet 0.10 supports
# kubernetes-validate, installed beside the interpreter running the tests (pyproject's test extra)
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
KEY = "s3cret-key-for-the-export-test"


def _node(name: str, last: int, target: str) -> dict[str, Any]:
    return {"name": name, "mac": f"52:54:00:00:01:{last:02x}", "target": target, "memory": "1GiB",
            "address": f"10.0.0.{last}"}


def _folder(path: Path) -> str:
    path.mkdir()
    (path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}\n')
    (path / "model.safetensors").write_bytes(bytes(range(256)) * 8)
    lines = "".join(f"{hashlib.sha256((path / n).read_bytes()).hexdigest()}  {n}\n"
                    for n in ("config.json", "model.safetensors"))
    return hashlib.sha256(lines.encode()).hexdigest()


@pytest.fixture
def cpu_file(tmp_path: Path) -> Path:
    """cpu nodes with a replicated GGUF, a split, a cpu vLLM pipeline over three nodes, and a Ray pipeline on
    two NVIDIA nodes; the gateway's key in a file."""
    gguf = tmp_path / "chat.gguf"
    gguf.write_bytes(b"GGUF" + bytes(500))
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    hashed = _folder(tmp_path / "tiny-hf")
    key = tmp_path / "api-key"
    key.write_text(KEY + "\n")
    key.chmod(0o600)
    data = {"control": {"address": "10.0.0.1"}, "gateway": {"key_file": "api-key"},
            "nodes": [_node("a", 11, "cpu"), _node("b", 12, "cpu"), _node("c", 13, "cpu"), _node("d", 14, "cpu"),
                      _node("g1", 21, "nvidia"), _node("g2", 22, "nvidia")],
            "services": [
                {"name": "chat", "model": "chat.gguf", "sha256": sha, "nodes": ["a", "b"]},
                {"name": "big", "model": "chat.gguf", "sha256": sha, "topology": "split", "head": "c",
                 "workers": ["d"], "context": 4096},
                {"name": "pipe", "engine": "vllm", "model": "tiny-hf", "sha256": hashed, "topology": "pipeline",
                 "nodes": ["b", "c", "d"], "args": ["--seed", "7"]},
                {"name": "ray", "engine": "vllm", "model": "tiny-hf", "sha256": hashed, "topology": "pipeline",
                 "nodes": ["g1", "g2"]}]}
    path = tmp_path / "cpu.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _export(path: Path, out: Path, *extra: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    proc = run_cli_inproc("cluster", "export", str(path), "--format", "kube", "--out", str(out), "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert sorted(p.name for p in out.iterdir()) == answer["files"]
    return answer, [yaml.safe_load((out / name).read_text()) for name in answer["files"]]


def _strict(schema: Any) -> Any:
    """The CRD's schema, closed: an object with properties takes no others (what the API server prunes)."""
    schema = copy.deepcopy(schema)
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        return {k: _strict(v) for k, v in schema.items()}
    return [_strict(v) for v in schema] if isinstance(schema, list) else schema


def _validate_all(out: Path, manifests: list[dict[str, Any]]) -> None:
    built_in = sorted(str(p) for p in out.iterdir() if not p.name.startswith("leaderworkerset-"))
    proc = subprocess.run([str(VALIDATE), "--strict", "-k", KUBE_VERSION, *built_in], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("passed") == len(built_in), proc.stdout
    schema = _strict(json.loads(LWS_SCHEMA.read_text()))
    for lws in (m for m in manifests if m["kind"] == "LeaderWorkerSet"):
        jsonschema.validate(lws, schema)
        template = lws["spec"]["leaderWorkerTemplate"]
        for which in ("leaderTemplate", "workerTemplate"):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": lws["metadata"]["name"]},
                       "template": template[which]}
            kubernetes_validate.validate(wrapped, KUBE_VERSION, strict=True)


def test_every_manifest_of_the_rtx_example_validates(tmp_path: Path) -> None:
    answer, manifests = _export(RTX, tmp_path / "out")
    kinds = sorted(m["kind"] for m in manifests)
    # four servers (one per service and node) and one RPC worker; a Service per service; the gateway's three
    assert kinds == ["ConfigMap"] + ["Deployment"] * 6 + ["Service"] * 5
    _validate_all(tmp_path / "out", manifests)
    pods = [m["spec"]["template"]["spec"] for m in manifests if m["kind"] == "Deployment" and m["metadata"]["labels"][
        "builder/role"] != "gateway"]
    assert all(p["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": 1}} for p in pods)
    assert sorted(p["nodeSelector"]["kubernetes.io/hostname"] for p in pods) == ["rtx1", "rtx1", "rtx2", "rtx3",
                                                                                  "rtx4"]
    assert all(p["hostNetwork"] for p in pods)
    assert answer["images"] == {f"rtx{i}/llama.cpp": "localhost/builder/nvidia:cuda" for i in range(1, 5)}
    assert any("local tags" in w for w in answer["warnings"])


def test_every_manifest_of_a_cpu_file_validates_and_pipelines_are_leader_worker_sets(cpu_file: Path,
                                                                                     tmp_path: Path) -> None:
    answer, manifests = _export(cpu_file, tmp_path / "out")
    _validate_all(tmp_path / "out", manifests)
    sets = {m["metadata"]["name"]: m["spec"] for m in manifests if m["kind"] == "LeaderWorkerSet"}
    assert sorted(sets) == ["cpu-pipe", "cpu-ray"]
    pipe = sets["cpu-pipe"]["leaderWorkerTemplate"]
    assert pipe["size"] == 3
    assert pipe["leaderTemplate"]["spec"]["nodeSelector"] == {"kubernetes.io/hostname": "b"}
    terms = pipe["workerTemplate"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == ["c", "d"]
    ray = sets["cpu-ray"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]
    assert {"name": "ray-token", "secret": {"secretName": "cpu-ray-ray-token", "defaultMode": 0o400,
                                            "items": [{"key": "ray-token", "path": "ray-token"}]}} in ray["volumes"]
    assert any("cpu-ray-ray-token" in step for step in answer["steps"])
    # the RPC worker keeps its tensor cache on its node, across restarts
    worker = next(m for m in manifests if m["metadata"]["name"] == "cpu-big-rpc-d")["spec"]["template"]["spec"]
    assert worker["volumes"] == [{"name": "rpc-cache", "hostPath": {"path": "/var/cache/builder/rpc/big",
                                                                     "type": "DirectoryOrCreate"}}]


def _tail(argv: list[str]) -> list[str]:
    """A `builder run` line's image arguments: from the role on."""
    roles = ("server", "rpc-worker", "serve", "shell", "ray-worker")
    return argv[next(i for i, w in enumerate(argv) if w in roles and argv[i - 1] not in ("--name", "--flavour")):]


def test_containers_run_what_cluster_commands_prints(cpu_file: Path, tmp_path: Path) -> None:
    proc = run_cli_inproc("cluster", "commands", str(cpu_file), "--models", "/m", "--json")
    assert proc.returncode == 0, proc.stderr
    printed = {(entry["node"], argv[argv.index("--name") + 1]): _tail(argv)
               for entry in json.loads(proc.stdout) for argv in entry["argv"]}
    _, manifests = _export(cpu_file, tmp_path / "out", "--models", "/m")
    seen = set()
    for m in manifests:
        if m["kind"] == "Deployment" and m["metadata"]["labels"]["builder/role"] != "gateway":
            node = m["metadata"]["labels"]["builder/node"]
            container = m["spec"]["template"]["spec"]["containers"][0]
            suffix = "-rpc" if container["name"] == "rpc-worker" else ""
            key = (node, f"builder-{m['metadata']['labels']['builder/service']}{suffix}")
            assert container["args"] == printed[key], key
            seen.add(key)
    lws = next(m for m in manifests if m["metadata"]["name"] == "cpu-pipe")["spec"]["leaderWorkerTemplate"]
    assert lws["leaderTemplate"]["spec"]["containers"][0]["args"] == printed[("b", "builder-pipe")]
    worker = lws["workerTemplate"]["spec"]["containers"][0]
    assert {"name": "VLLM_HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}} in worker["env"]
    for rank, node in ((1, "c"), (2, "d")):  # what LWS_WORKER_INDEX and the node's address make of the template
        args = [str(rank) if w == "$(LWS_WORKER_INDEX)" else w for w in worker["args"]]
        assert args == printed[(node, "builder-pipe-pipeline")]
        seen.add((node, "builder-pipe-pipeline"))
    assert seen | {("b", "builder-pipe")} == set(printed)  # every printed line, and no other


def test_images_by_digest_from_a_registry(tmp_path: Path) -> None:
    with start_registry(tmp_path / "registry") as reg:
        published = publish_empty_image(reg, "team/builder", "nvidia-cuda")
        answer, manifests = _export(RTX, tmp_path / "out", "--registry", f"{reg.host}/team/builder")
        assert set(answer["images"].values()) == {published}
        assert not any("local tags" in w for w in answer["warnings"])
        images = {c["image"] for m in manifests if m["kind"] == "Deployment"
                  for c in m["spec"]["template"]["spec"].get("initContainers", []) +
                  m["spec"]["template"]["spec"]["containers"] if c["name"] != "haproxy"}
        assert images == {published}
        # a cpu image that was never published there: one line, nothing written
        cpu = tmp_path / "cpu-only.yaml"
        data = yaml.safe_load(RTX.read_text())
        data["nodes"][0]["target"] = "cpu"
        cpu.write_text(yaml.safe_dump(data))
        proc = run_cli_inproc("cluster", "export", str(cpu), "--format", "kube", "--out", str(tmp_path / "new"),
                              "--registry", f"{reg.host}/team/builder")
        assert proc.returncode == 2
        assert proc.stderr.splitlines()[0] == (f"error: --registry {reg.host}/team/builder: cpu/cpu was never "
                                               "published there (no tag cpu-cpu)")
        assert not (tmp_path / "new").exists()


def test_the_key_is_in_no_file_and_the_gateway_config_passes_haproxy(cpu_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_cli_inproc("cluster", "export", str(cpu_file), "--format", "kube", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert KEY not in proc.stdout + proc.stderr
    assert not any(KEY in p.read_text() for p in out.iterdir())
    step = next(line for line in proc.stdout.splitlines() if "kubectl create secret generic cpu-gateway-key" in line)
    assert f"$(cat {cpu_file.parent / 'api-key'})" in step and "--from-file=api-key.map=/dev/stdin" in step
    # the ConfigMap's haproxy.cfg, with the Secret's map file beside it, is what HAProxy accepts in the pod
    configmap = yaml.safe_load((out / "configmap-cpu-gateway.yaml").read_text())
    folder = tmp_path / "etc"
    folder.mkdir()
    config = configmap["data"]["haproxy.cfg"].replace("/usr/local/etc/haproxy", str(folder))
    (folder / "haproxy.cfg").write_text(config)
    (folder / "models.json").write_text(configmap["data"]["models.json"])
    (folder / "api-key.map").write_text(f"key {KEY}\n")
    check = subprocess.run(["haproxy", "-c", "-f", str(folder / "haproxy.cfg")], capture_output=True, text=True,
                           timeout=30, env={**os.environ, "POD_IP": "127.0.0.1"})
    assert check.returncode == 0, check.stdout + check.stderr
    assert 'bind "${POD_IP}:8080"' in config
    assert "10.0.0.11:" in config and "10.0.0.21:" in config  # backends at the nodes' addresses


def test_a_second_export_replaces_its_own_files_only(cpu_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _export(cpu_file, out)
    mine = out / "notes.yaml"
    mine.write_text("kept: true\n")
    stale = out / "deployment-cpu-gone-a.yaml"
    stale.write_text((out / "deployment-cpu-chat-a.yaml").read_text())
    proc = run_cli_inproc("cluster", "export", str(cpu_file), "--format", "kube", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert mine.exists() and not stale.exists()


@pytest.mark.parametrize(("args", "first"), [
    (["--format", "ansible", "--models-claim", "models"],
     "error: --models-claim: a PersistentVolumeClaim is Kubernetes' (--format kube)"),
    (["--format", "kubb"], "error: --format: unknown format 'kubb' (did you mean 'kube'?)"),
    (["--format", "kube", "--models", "srv/models"],
     "error: --models: 'srv/models' is not an absolute folder path of plain characters"),
    (["--format", "kube", "--models-claim", "Models_Claim"],
     "error: --models-claim: 'Models_Claim' is not a PersistentVolumeClaim name"),
    (["--format", "kube", "--registry", "nohost"],
     "error: --registry 'nohost': expected HOST/REPOSITORY, e.g. ghcr.io/OWNER/builder"),
])
def test_bad_options_are_one_line_and_write_nothing(cpu_file: Path, tmp_path: Path, args: list[str],
                                                    first: str) -> None:
    out = tmp_path / "out"
    proc = run_cli_inproc("cluster", "export", str(cpu_file), "--out", str(out), *args)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == first
    assert not out.exists()


def test_an_output_folder_that_is_a_file_and_a_bad_cluster_file(cpu_file: Path, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("x\n")
    proc = run_cli_inproc("cluster", "export", str(cpu_file), "--format", "kube", "--out", str(taken))
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == f"error: --out {taken}: is a file, not a folder"
    bad = tmp_path / "bad.yaml"
    data = yaml.safe_load(cpu_file.read_text())
    data["services"][0]["nodes"] = ["nowhere"]
    bad.write_text(yaml.safe_dump(data))
    proc = run_cli_inproc("cluster", "export", str(bad), "--format", "kube", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0].startswith("error: ") and "services[0].nodes[0]" in proc.stderr
    assert len(proc.stderr.splitlines()) == 2 and not (tmp_path / "out").exists()


def test_the_init_container_refuses_a_model_that_differs(cpu_file: Path, tmp_path: Path) -> None:
    """The check-model script each server's pod runs first (the image's `shell` role is bash -c), run here with
    bash on the files a node would hold."""
    models = tmp_path / "models"
    _, manifests = _export(cpu_file, tmp_path / "out", "--models", str(models))
    data = yaml.safe_load(cpu_file.read_text())
    gguf_sha, folder_hash = data["services"][0]["sha256"], data["services"][2]["sha256"]
    models.mkdir()
    (models / f"{gguf_sha}.gguf").write_bytes((cpu_file.parent / "chat.gguf").read_bytes())
    (models / folder_hash).mkdir()
    for name in ("config.json", "model.safetensors"):
        (models / folder_hash / name).write_bytes((cpu_file.parent / "tiny-hf" / name).read_bytes())

    def check(name: str, where: str) -> subprocess.CompletedProcess[str]:
        manifest = next(m for m in manifests if m["metadata"]["name"] == name)
        spec = manifest["spec"]["template"]["spec"] if manifest["kind"] == "Deployment" else \
            manifest["spec"]["leaderWorkerTemplate"][where]["spec"]
        role, flag, script = spec["initContainers"][0]["args"]
        assert (role, flag) == ("shell", "-c")
        return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)

    assert check("cpu-chat-a", "").returncode == 0
    assert check("cpu-pipe", "workerTemplate").returncode == 0
    (models / f"{gguf_sha}.gguf").write_bytes(b"GGUF" + bytes(499))
    (models / folder_hash / "extra.json").write_text("{}\n")
    for name, where in (("cpu-chat-a", ""), ("cpu-pipe", "leaderTemplate")):
        proc = check(name, where)
        assert proc.returncode == 1 and "the cluster file says" in proc.stderr


def test_every_device_variant_has_a_device_plugin_resource() -> None:
    from builder.recipe.targets import DEVICE_PLUGINS, TARGETS

    text = (ROOT / "docs" / "clusters.md").read_text()
    for target in TARGETS.values():
        for variant in target.variants.values():
            plugin = DEVICE_PLUGINS.get((target.name, variant.name))
            assert (plugin is None) == (not variant.host.devices and not variant.host.cdi), variant.name
            assert plugin is None or f"`{plugin.resource}`" in text
