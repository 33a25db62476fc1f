"""`builder pxe list` names what each generation boots: every netboot set, and for llama.cpp its commit and the
ggml RPC protocol its workers and servers speak, recorded in the set's manifest by `pxe build`."""

import json
from pathlib import Path

from test_netboot import fake_artifacts, inventory, publish

from builder.netboot.artifacts import record_llama_cpp
from conftest import run_cli_inproc


def test_list_shows_each_sets_llama_cpp_commit_and_rpc_protocol(tmp_path: Path) -> None:
    root, path = tmp_path / "pxe-root", inventory(tmp_path)
    folder, manifest = fake_artifacts(tmp_path, "a")
    recorded = record_llama_cpp(folder, manifest, "0c1e57098", "7.0.0")
    assert json.loads((folder / "manifest.json").read_text())["llama_cpp_commit"] == "0c1e57098"
    assert record_llama_cpp(folder, recorded, "0c1e57098", "7.0.0") is recorded  # nothing to write again
    gen, _ = publish(root, path, {("cpu", "cpu"): (folder, recorded)}, keep=1)
    proc = run_cli_inproc("pxe", "list", "--root", str(root))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"* {gen}")
    assert lines[1].split() == ["cpu-cpu", "image", "sha256:" + "0" * 12 + ",", "llama.cpp", "0c1e57098,", "ggml",
                                "RPC", "protocol", "7.0.0"]
    doc = json.loads(run_cli_inproc("pxe", "list", "--root", str(root), "--json").stdout)
    assert doc[0]["sets"] == [{"set": "cpu-cpu", "image": "localhost/builder/cpu:cpu",
                               "image_digest": "sha256:" + "0" * 64, "llama_cpp_commit": "0c1e57098",
                               "ggml_rpc_protocol": "7.0.0"}]


def test_a_set_without_the_facts_shows_its_image_and_a_source_without_a_commit_says_so(tmp_path: Path) -> None:
    root, path = tmp_path / "pxe-root", inventory(tmp_path)
    folder, manifest = fake_artifacts(tmp_path, "a")  # as sets made before builder recorded them
    publish(root, path, {("cpu", "cpu"): (folder, manifest)}, keep=3)
    assert run_cli_inproc("pxe", "list", "--root", str(root)).stdout.splitlines()[1].split() == \
        ["cpu-cpu", "image", "sha256:" + "0" * 12]
    folder, manifest = fake_artifacts(tmp_path, "b")
    manifest = record_llama_cpp(folder, manifest, None, "7.0.0")  # an archive pin records no commit
    publish(root, path, {("cpu", "cpu"): (folder, manifest)}, keep=3)
    assert "llama.cpp not recorded by its source, ggml RPC protocol 7.0.0" in \
        run_cli_inproc("pxe", "list", "--root", str(root)).stdout.splitlines()[-2]


def test_unchecked_values_never_reach_a_manifest_or_the_listing(tmp_path: Path) -> None:
    root, path = tmp_path / "pxe-root", inventory(tmp_path)
    folder, manifest = fake_artifacts(tmp_path, "a")
    recorded = record_llama_cpp(folder, manifest, "abc; rm -rf /", "7\n0")
    assert recorded["llama_cpp_commit"] is None and recorded["ggml_rpc_protocol"] is None
    gen, _ = publish(root, path, {("cpu", "cpu"): (folder, recorded)}, keep=1)
    copy = root / "generations" / gen / "manifests" / "cpu-cpu.json"
    copy.write_text(json.dumps({**recorded, "llama_cpp_commit": "\x1b[2Jgotcha"}))  # someone wrote pxe-root
    proc = run_cli_inproc("pxe", "list", "--root", str(root))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[0].endswith("llama_cpp_commit: '\\x1b[2Jgotcha' is not a commit (hex)")
