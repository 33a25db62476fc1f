"""Models by name (`hf://`), locked in cluster.lock: `builder lock CLUSTER` against a stand-in hub on 127.0.0.1
(tests/support/hubserver.py) through huggingface_hub itself, and every later run checked against the lock.

The commands run as separate processes, as a user runs them: huggingface_hub reads HF_ENDPOINT and HF_HOME when
it is imported, so each process gets the stand-in's address and a cache of the test's own."""

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hubserver import LocalHub, placeholder_hub

from conftest import ROOT, _check_hub_endpoint, check_hub_session, loopback_url, run_cli, run_cli_inproc

GGUF = b"GGUF" + bytes(range(256)) * 8
SAFETENSORS = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(64)
FOLDER = {"config.json": b'{"architectures": ["LlamaForCausalLM"]}\n', "model.safetensors": SAFETENSORS,
          "tokenizer.json": b'{"model": {}}\n'}
COMMIT_GGUF = "1" * 40
COMMIT_HF = "2" * 40
TOKEN = "hf_builderTestTokenNotASecret0123"
GGUF_NAME = "hf://tiny-org/tiny-gguf@main/tiny.gguf"
HF_NAME = "hf://tiny-org/tiny-hf@v1.0"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cluster(folder: Path, services: list[dict[str, object]] | None = None) -> Path:
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump({
        "control": {"address": "10.0.0.1"},
        "nodes": [{"name": "box1", "mac": "aa:bb:cc:00:00:01", "target": "cpu", "memory": "8GiB",
                   "address": "10.0.0.21"}],
        "services": services or [
            {"name": "tiny", "model": GGUF_NAME, "nodes": ["box1"]},
            {"name": "tiny-hf", "engine": "vllm", "model": HF_NAME, "memory": "1GiB", "nodes": ["box1"]}]}))
    return path


@pytest.fixture
def hub() -> Iterator[LocalHub]:
    with LocalHub() as server:
        server.add("tiny-org/tiny-gguf", {"tiny.gguf": GGUF, "README.md": b"# tiny\n"}, {"tiny.gguf"}, COMMIT_GGUF)
        server.add("tiny-org/tiny-hf", FOLDER, {"model.safetensors"}, COMMIT_HF, refs=("main", "v1.0"))
        yield server


def env(hub: LocalHub, tmp_path: Path, **more: str) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "BUILDER_CACHE": str(tmp_path / "cache"),
            **more}


def local_model(path: Path, index: int, environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """What `cluster up` and `pxe publish` do for a model (Loaded.local_model), in a process of its own."""
    code = ("import sys; from pathlib import Path; from builder.cli.conventions import report; "
            "from builder.core.errors import BuilderError; from builder.cluster.model import load_cluster\n"
            "try:\n print(load_cluster(Path(sys.argv[1])).local_model(int(sys.argv[2]), "
            "lambda line: print(line, file=sys.stderr)))\n"
            "except BuilderError as exc:\n report(exc); sys.exit(exc.exit_code)")
    return subprocess.run([sys.executable, "-c", code, str(path), str(index)], capture_output=True, text=True,
                          env={**os.environ, **environment}, cwd=ROOT, timeout=120)


def folder_hash(files: dict[str, bytes]) -> str:
    lines = "".join(f"{sha(files[name])}  {name}\n" for name in sorted(files))
    return sha(lines.encode())


def test_lock_records_commit_sizes_and_sha256s(hub: LocalHub, tmp_path: Path) -> None:
    path = cluster(tmp_path)
    proc = run_cli("lock", str(path), "--json", env=env(hub, tmp_path, HF_TOKEN=TOKEN))
    assert proc.returncode == 0, proc.stderr
    lock = json.loads((tmp_path / "cluster.lock").read_text())
    assert lock == {"version": 1, "models": {
        GGUF_NAME: {"repo": "tiny-org/tiny-gguf", "revision": "main", "commit": COMMIT_GGUF, "sha256": sha(GGUF),
                    "files": [{"path": "tiny.gguf", "size": len(GGUF), "sha256": sha(GGUF)}]},
        HF_NAME: {"repo": "tiny-org/tiny-hf", "revision": "v1.0", "commit": COMMIT_HF, "sha256": folder_hash(FOLDER),
                  "files": [{"path": name, "size": len(FOLDER[name]), "sha256": sha(FOLDER[name])}
                            for name in sorted(FOLDER)]}}}
    assert json.loads(proc.stdout)["models"] == lock["models"]
    # huggingface_hub sent the user's token (its own handling); builder wrote it nowhere
    assert {r.authorization for r in hub.requests} == {f"Bearer {TOKEN}"}
    assert TOKEN not in proc.stdout + proc.stderr + (tmp_path / "cluster.lock").read_text()
    # the later runs read it: the service's sha256 is the lock's, and memory follows the lock's sizes
    commands = run_cli("cluster", "commands", str(path), "--json", env=env(hub, tmp_path))
    assert commands.returncode == 0, commands.stderr
    argv = json.loads(commands.stdout)[0]["argv"][0]
    assert argv[argv.index("--model-sha256") + 1] == sha(GGUF)
    text = run_cli_inproc("cluster", "commands", str(path)).stdout
    assert (f"# tiny: {GGUF_NAME} -> /srv/models/{sha(GGUF)}.gguf (fetch it with: hf download tiny-org/tiny-gguf "
            f"tiny.gguf --revision {COMMIT_GGUF})") in text, text
    check = run_cli("lock", str(path), "--check", env=env(hub, tmp_path))
    assert check.returncode == 0 and "matches the hub for 2 model(s)" in check.stdout, check.stderr


def test_download_is_checked_against_the_lock(hub: LocalHub, tmp_path: Path) -> None:
    path = cluster(tmp_path)
    assert run_cli("lock", str(path), env=env(hub, tmp_path)).returncode == 0
    got = local_model(path, 0, env(hub, tmp_path))
    assert got.returncode == 0, got.stderr
    assert Path(got.stdout.strip()).read_bytes() == GGUF
    assert str(tmp_path / "hf-home") in got.stdout  # huggingface_hub's cache, under HF_HOME
    asked = len(hub.requests)
    again = local_model(path, 0, env(hub, tmp_path, HF_HUB_OFFLINE="1"))  # from the cache, checked, no request
    assert again.returncode == 0 and again.stdout == got.stdout and len(hub.requests) == asked, again.stderr
    folder = local_model(path, 1, env(hub, tmp_path))
    assert folder.returncode == 0, folder.stderr
    made = Path(folder.stdout.strip())
    assert made.name == folder_hash(FOLDER) and not any(p.is_symlink() for p in made.rglob("*"))
    assert {p.name: p.read_bytes() for p in made.iterdir()} == FOLDER


def test_a_file_changed_on_the_hub_after_locking_is_refused_before_downloading(hub: LocalHub,
                                                                                tmp_path: Path) -> None:
    path = cluster(tmp_path)
    assert run_cli("lock", str(path), env=env(hub, tmp_path)).returncode == 0
    changed = GGUF[:-1] + b"!"
    hub.repos["tiny-org/tiny-gguf"].files["tiny.gguf"] = changed  # same commit, other bytes and metadata
    got = local_model(path, 0, env(hub, tmp_path))
    assert got.returncode == 2 and "Traceback" not in got.stderr
    assert f"the hub now serves tiny.gguf with size {len(GGUF)} and etag {sha(changed)}" in got.stderr, got.stderr
    assert not list((tmp_path / "hf-home").rglob("*.gguf")), "nothing may land in the cache"
    assert not [r for r in hub.requests if r.method == "GET" and r.path.endswith("tiny.gguf")]
    check = run_cli("lock", str(path), "--check", env=env(hub, tmp_path))
    assert check.returncode == 1 and f"{GGUF_NAME} is not locked as the hub resolves it now" in check.stdout


def test_a_download_whose_bytes_disagree_is_refused_and_removed(hub: LocalHub, tmp_path: Path) -> None:
    """A hub whose metadata still matches the lock but whose bytes do not: refused after the download, and the
    file huggingface_hub wrote is removed, so no later run finds it."""
    path = cluster(tmp_path)
    assert run_cli("lock", str(path), env=env(hub, tmp_path)).returncode == 0
    repo = hub.repos["tiny-org/tiny-gguf"]
    repo.claimed["tiny.gguf"], repo.files["tiny.gguf"] = GGUF, GGUF[:-1] + b"!"
    got = local_model(path, 0, env(hub, tmp_path))
    assert got.returncode == 2 and "Traceback" not in got.stderr
    assert f"tiny.gguf has size {len(GGUF)}, sha256 {sha(repo.files['tiny.gguf'])}; cluster.lock says" in got.stderr
    assert "the download was removed" in got.stderr
    assert not [p for p in (tmp_path / "hf-home").rglob("*") if p.is_file() and p.read_bytes() == repo.files[
        "tiny.gguf"]]


def test_a_model_without_a_lock_entry_is_one_line(tmp_path: Path) -> None:
    path = cluster(tmp_path)
    proc = run_cli_inproc("cluster", "commands", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: {path}: services[0].model: {GGUF_NAME} is not in {tmp_path / 'cluster.lock'}",
        f"hint: run `builder lock {path}` (it records the model's commit, sizes and sha256s)"]


def test_own_sha256_must_agree_with_the_lock(hub: LocalHub, tmp_path: Path) -> None:
    path = cluster(tmp_path, [{"name": "tiny", "model": GGUF_NAME, "sha256": "0" * 64, "nodes": ["box1"]}])
    assert run_cli("lock", str(path), env=env(hub, tmp_path)).returncode == 0
    proc = run_cli_inproc("cluster", "commands", str(path))
    assert proc.returncode == 2
    assert f"services[0].sha256: {'0' * 64} but cluster.lock locked {GGUF_NAME} as {sha(GGUF)}" in proc.stderr


@pytest.mark.parametrize(("model", "engine", "expected"), [
    ("hf://tiny-org/tiny-gguf/tiny.gguf", "llama.cpp", "is not a Hugging Face model name"),
    ("hf://tiny-org/../x@main/tiny.gguf", "llama.cpp", "is not a Hugging Face model name"),
    ("hf://tiny-org/tiny-gguf@main/../../etc/passwd.gguf", "llama.cpp", "is not a .gguf file's path"),
    ("hf://tiny-org/tiny-gguf@main/tiny.bin", "llama.cpp", "is not a .gguf file's path"),
    ("hf://tiny-org/tiny-gguf@main", "llama.cpp", "name the GGUF file in the repository"),
    ("hf://tiny-org/tiny-gguf@ma;in/tiny.gguf", "llama.cpp", "is not a branch, tag or commit"),
    ("hf://tiny-org/tiny-hf@main/config.json", "vllm", "a vLLM service serves the whole repository"),
])
def test_bad_names_are_one_line(tmp_path: Path, model: str, engine: str, expected: str) -> None:
    path = cluster(tmp_path, [{"name": "m", "engine": engine, "model": model, "memory": "1GiB", "nodes": ["box1"]}])
    for args in (("lock", str(path)), ("cluster", "commands", str(path))):
        proc = run_cli_inproc(*args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert expected in proc.stderr.splitlines()[0], proc.stderr


def test_unknown_repository_is_one_line(hub: LocalHub, tmp_path: Path) -> None:
    path = cluster(tmp_path, [{"name": "m", "model": "hf://tiny-org/nothing@main/x.gguf", "nodes": ["box1"]}])
    proc = run_cli("lock", str(path), env=env(hub, tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "hf://tiny-org/nothing@main/x.gguf: the hub did not answer: RepositoryNotFoundError" in proc.stderr
    assert not (tmp_path / "cluster.lock").exists()


def test_the_session_refuses_a_hub_off_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard every test runs under (conftest.py): telemetry off, and HF_ENDPOINT on loopback only."""
    assert os.environ["HF_HUB_DISABLE_TELEMETRY"] == "1" and loopback_url(os.environ["HF_ENDPOINT"])
    assert loopback_url("http://127.0.0.1:8080") and loopback_url("http://[::1]:1") and loopback_url("http://localhost")
    for bad in ("https://huggingface.co", "http://10.0.0.1", "http://127.0.0.1.example.com", ""):
        assert not loopback_url(bad)
        with pytest.raises(pytest.fail.Exception):
            _check_hub_endpoint({"HF_ENDPOINT": bad}, "test")
    with pytest.raises(pytest.fail.Exception):
        run_cli("lock", "x.yaml", env={"HF_ENDPOINT": "https://huggingface.co"})
    for name, value in (("HF_ENDPOINT", "https://huggingface.co"), ("HF_HUB_DISABLE_TELEMETRY", "0")):
        with monkeypatch.context() as patched:
            patched.setenv(name, value)
            with pytest.raises(pytest.fail.Exception):
                check_hub_session("test")  # what the autouse fixture runs before and after every test
    check_hub_session("test")


def test_example_lock_is_what_builder_lock_makes(tmp_path: Path) -> None:
    """docs/examples/hf-mini-pc-x2.yaml's cluster.lock was made by `builder lock` against the stand-in hub
    serving placeholder files under the real names (the comments say so); making it again gives the same."""
    example = ROOT / "docs" / "examples" / "hf-mini-pc-x2.yaml"
    copy = tmp_path / example.name
    copy.write_text(example.read_text())
    with LocalHub() as server:
        placeholder_hub(server, [s["model"] for s in yaml.safe_load(example.read_text())["services"]])
        proc = run_cli("lock", str(copy), env=env(server, tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cluster.lock").read_text() == (ROOT / "docs" / "examples" / "cluster.lock").read_text()
