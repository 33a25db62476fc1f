"""A vllm-server node without booting it: the inventory's checks, and what publish writes for it (its model
folder packed into one squashfs blob by sha256, the same bytes every time; the node's boot script carrying the
model's hash and size, the served name and vLLM's arguments). The boot itself is test_netboot_vllm_qemu.py."""

import json
import subprocess
from pathlib import Path

import pytest
from test_netboot import MAC, fake_artifacts, inventory

from builder.core.errors import RecipeError
from builder.netboot.inventory import load_inventory
from builder.netboot.publish import publish
from conftest import run_cli_inproc


def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny"
    (folder / ".cache").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    (folder / ".cache" / "download.lock").write_text("hub bookkeeping")
    return folder


def vllm_node(**vllm: object) -> dict[str, object]:
    return {"name": "v1", "mac": MAC, "target": "cpu", "role": "vllm-server",
            "vllm": {"model": "tiny", "served_name": "tiny-llama", **vllm}}


def test_vllm_server_script_carries_its_model_by_hash_and_how_to_serve_it(tmp_path: Path) -> None:
    model_folder(tmp_path)
    path = inventory(tmp_path, nodes=[vllm_node(args=["--dtype", "float32", "--enforce-eager"], kv_cache_gib=2),
                                      {"name": "w1", "mac": "52:54:00:12:34:57", "target": "cpu",
                                       "role": "rpc-worker"}])
    root = tmp_path / "pxe-root"
    folder, manifest = fake_artifacts(tmp_path, "a")
    vfolder, vmanifest = fake_artifacts(tmp_path, "v")
    publish(root, load_inventory(path), path, {("cpu", "cpu"): (folder, manifest),
                                               ("cpu", "vllm-cpu"): (vfolder, vmanifest)}, keep=1)
    words = (root / "current" / "nodes" / "52-54-00-12-34-56.ipxe").read_text().split()
    assert "builder.role=vllm-server" in words and "builder.port=8000" in words
    # the vLLM node boots the vLLM image's set, the worker the llama.cpp one
    assert f"builder.sha256={vmanifest['files']['root.squashfs']['sha256']}" in words  # type: ignore[index]
    worker = (root / "current" / "nodes" / "52-54-00-12-34-57.ipxe").read_text()
    assert f"builder.sha256={manifest['files']['root.squashfs']['sha256']}" in worker  # type: ignore[index]
    assert "builder.model" not in worker and "builder.served_name" not in worker
    assert "builder.served_name=tiny-llama" in words and "builder.vllm_args=--dtype,float32,--enforce-eager" in words
    assert "builder.vllm_kv=2" in words
    digest = next(w for w in words if w.startswith("builder.model_sha256=")).split("=")[1]
    assert f"builder.model=http://10.0.2.2:8000/blobs/sha256/{digest}" in words
    blob = root / "blobs" / "sha256" / digest
    assert f"builder.model_size={blob.stat().st_size}" in words
    listing = subprocess.run(["unsquashfs", "-l", "-d", "", str(blob)], capture_output=True, text=True,
                             check=True).stdout.split()
    assert sorted(p for p in listing if p.startswith("/")) == ["/config.json", "/model.safetensors"]
    # The same files give the same blob (packed anew once the cache of packed models does not hold it).
    (tmp_path / "tiny" / "model.safetensors").touch()
    publish(root, load_inventory(path), path, {("cpu", "cpu"): (folder, manifest),
                                               ("cpu", "vllm-cpu"): (vfolder, vmanifest)}, keep=1)
    again = (root / "current" / "nodes" / "52-54-00-12-34-56.ipxe").read_text().split()
    assert f"builder.model_sha256={digest}" in again


@pytest.mark.parametrize(("node", "message"), [
    ({"name": "v1", "mac": MAC, "target": "cpu", "role": "vllm-server"},
     "nodes[0].vllm: a vllm-server node needs `vllm:` (its model)"),
    ({**vllm_node(), "role": "rpc-worker"}, "nodes[0].vllm: a vllm-server node needs `vllm:` (its model)"),
    (vllm_node(model="/etc"), "nodes[0].vllm.model: /etc is not a Hugging Face model folder"),
    (vllm_node(args=["--chat-template", "a b"]), "nodes[0].vllm.args[1]: Value error, must be one word"),
    (vllm_node(args=["--x,y"]), "nodes[0].vllm.args[0]: Value error, must be one word"),
    (vllm_node(served_name="a name"), "nodes[0].vllm.served_name: String should match pattern"),
])
def test_bad_vllm_node_is_one_line_and_exit_2(tmp_path: Path, node: dict[str, object], message: str) -> None:
    model_folder(tmp_path)
    proc = run_cli_inproc("pxe", "publish", str(inventory(tmp_path, nodes=[node])), "--root",
                   str(tmp_path / "pxe-root"))
    assert proc.returncode == 2, proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("error: ") and message in first, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "pxe-root").exists()


def test_a_link_out_of_the_model_folder_is_refused_but_a_hub_snapshots_blobs_are_followed(tmp_path: Path) -> None:
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "blobs" / "1234").write_text(json.dumps({"model_type": "llama"}))
    (snapshot / "config.json").symlink_to("../../blobs/1234")
    path = inventory(tmp_path, nodes=[vllm_node(model=str(snapshot))])
    folder, manifest = fake_artifacts(tmp_path, "v")
    publish(tmp_path / "pxe-root", load_inventory(path), path, {("cpu", "vllm-cpu"): (folder, manifest)}, keep=1)
    (tmp_path / "secret").write_text("not the model")
    (snapshot / "tokenizer.json").symlink_to(tmp_path / "secret")
    with pytest.raises(RecipeError, match="tokenizer.json: a link out of the model folder"):
        publish(tmp_path / "pxe-root", load_inventory(path), path, {("cpu", "vllm-cpu"): (folder, manifest)}, keep=1)
