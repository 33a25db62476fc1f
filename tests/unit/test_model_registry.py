"""`builder model push|pull`: models as CNCF ModelPack artifacts in a real registry (docker-registry on
127.0.0.1, no engine), read back by another OCI tool (the oras SDK) and pushed by it; hostile replies from a
crafted server on 127.0.0.1 refused in one line with nothing placed."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import oras.client
import pytest
import requests
from registry import Registry, start_registry

from builder.cluster.hfmodel import folder_hash
from builder.cluster.modelpack import (
    CONFIG_TYPE,
    DOC,
    FILEPATH,
    MANIFEST_TYPE,
    MODEL_SHA256,
    WEIGHT,
    WEIGHT_CONFIG,
)
from builder.core.digests import sha256_digest
from builder.registry.client import OCI_MANIFEST
from conftest import ROOT, run_cli_inproc
from servers import Crafted, Reply

ACCEPT = {"Accept": OCI_MANIFEST}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with start_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


def gguf(path: Path, seed: int, size: int = 40_000) -> Path:
    """A few KB that start like a GGUF (magic, version 3): all `model push` looks at."""
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + random.Random(seed).randbytes(size))
    return path


def hf_folder(folder: Path, seed: int) -> Path:
    """A Hugging Face folder's shape: config, tokenizer, weights, a README and a nested file."""
    rng = random.Random(seed)
    (folder / "onnx").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "seed": seed}))
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 1}}}))
    (folder / "model.safetensors").write_bytes(rng.randbytes(30_000))
    (folder / "README.md").write_text("# tiny\n")
    (folder / "onnx" / "model.onnx").write_bytes(rng.randbytes(5_000))
    return folder


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(registry: Registry, repo: str, ref: str) -> dict[str, Any]:
    resp = requests.get(registry.url(f"{repo}/manifests/{ref}"), headers=ACCEPT, timeout=10)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(proc: Any, code: int, message: str) -> None:
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and message in lines[0] and len(lines) <= 2, proc.stderr


def test_gguf_round_trip_by_tag_digest_and_content_tag(registry: Registry, tmp_path: Path) -> None:
    model = gguf(tmp_path / "tiny.gguf", seed=1)
    proc = run_cli_inproc("model", "push", str(model), "--registry", f"{registry.host}/models/tiny:q4",
                          "--sha256", sha(model), "--json")
    assert proc.returncode == 0, proc.stderr
    pushed = json.loads(proc.stdout)
    assert pushed["sha256"] == sha(model) and pushed["folder"] is False
    assert pushed["tags"] == ["q4", f"sha256-{sha(model)}"]
    for tag in pushed["tags"]:
        assert registry.digest("models/tiny", tag) == pushed["digest"]

    # The ModelPack layout, read without builder: artifact type, config, one raw weight layer with its path.
    doc = manifest(registry, "models/tiny", "q4")
    assert doc["artifactType"] == MANIFEST_TYPE and doc["config"]["mediaType"] == CONFIG_TYPE
    [layer] = doc["layers"]
    assert layer["mediaType"] == WEIGHT and layer["digest"] == f"sha256:{sha(model)}"
    assert layer["annotations"][FILEPATH] == "tiny.gguf"
    assert doc["annotations"][MODEL_SHA256] == sha(model)
    config = requests.get(registry.url(f"models/tiny/blobs/{doc['config']['digest']}"), timeout=10).json()
    assert config["modelfs"] == {"type": "layers", "diffIds": [layer["digest"]]}
    assert config["config"]["format"] == "gguf"

    dest = tmp_path / "models"
    (dest / ".pull-left-by-a-killed-pull").mkdir(parents=True)
    proc = run_cli_inproc("model", "pull", f"{registry.host}/models/tiny:q4", "--dest", str(dest), "--json")
    assert proc.returncode == 0, proc.stderr
    pulled = json.loads(proc.stdout)
    assert pulled["fetched"] is True and pulled["path"] == str(dest / f"{sha(model)}.gguf")
    assert [p.name for p in dest.iterdir()] == [f"{sha(model)}.gguf"]
    assert (dest / f"{sha(model)}.gguf").read_bytes() == model.read_bytes()

    # By digest: already there under its sha256, nothing fetched. By the content tag, with --sha256.
    again = run_cli_inproc("model", "pull", f"{registry.host}/models/tiny@{pushed['digest']}", "--dest", str(dest),
                           "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["fetched"] is False, again.stderr
    other = tmp_path / "box"
    by_sha = run_cli_inproc("model", "pull", f"{registry.host}/models/tiny:sha256-{sha(model)}",
                            "--dest", str(other), "--sha256", sha(model))
    assert by_sha.returncode == 0, by_sha.stderr
    assert (other / f"{sha(model)}.gguf").read_bytes() == model.read_bytes()


def test_a_model_that_does_not_match_its_sha256_is_refused_before_anything_moves(registry: Registry,
                                                                                 tmp_path: Path) -> None:
    model = gguf(tmp_path / "m.gguf", seed=2)
    proc = run_cli_inproc("model", "push", str(model), "--registry", f"{registry.host}/models/refused:v1",
                          "--sha256", "ab" * 32)
    one_line_error(proc, 2, f"its sha256 is {sha(model)}, not the {'ab' * 32}")
    assert registry.tags("models/refused") == []

    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("hello")
    one_line_error(run_cli_inproc("model", "push", str(not_gguf), "--registry", f"{registry.host}/models/refused"),
                   2, "not a GGUF file")

    # Pulled with the wrong --sha256: refused before a blob is fetched, nothing placed.
    assert run_cli_inproc("model", "push", str(model), "--registry",
                          f"{registry.host}/models/other:v1").returncode == 0
    dest = tmp_path / "dest"
    proc = run_cli_inproc("model", "pull", f"{registry.host}/models/other:v1", "--dest", str(dest),
                          "--sha256", "cd" * 32)
    one_line_error(proc, 1, f"the model's sha256 is {sha(model)}, not the {'cd' * 32}")
    assert list(dest.iterdir()) == []


def test_folder_round_trip_one_layer_per_file(registry: Registry, tmp_path: Path) -> None:
    folder = hf_folder(tmp_path / "tiny-hf", seed=3)
    expected = folder_hash(folder, "test")
    proc = run_cli_inproc("model", "push", str(folder), "--registry", f"{registry.host}/models/hf:main", "--json")
    assert proc.returncode == 0, proc.stderr
    pushed = json.loads(proc.stdout)
    assert pushed["sha256"] == expected and pushed["folder"] is True

    doc = manifest(registry, "models/hf", "main")
    kinds = {layer["annotations"][FILEPATH]: layer["mediaType"] for layer in doc["layers"]}
    assert kinds == {"README.md": DOC, "config.json": WEIGHT_CONFIG, "model.safetensors": WEIGHT,
                     "onnx/model.onnx": WEIGHT, "tokenizer.json": WEIGHT_CONFIG}

    dest = tmp_path / "models"
    proc = run_cli_inproc("model", "pull", f"{registry.host}/models/hf:main", "--dest", str(dest))
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in dest.iterdir()] == [expected]
    assert tree(dest / expected) == tree(folder)
    assert folder_hash(dest / expected, "test") == expected


def test_oras_pulls_what_builder_pushed(registry: Registry, tmp_path: Path) -> None:
    folder = hf_folder(tmp_path / "hf", seed=4)
    assert run_cli_inproc("model", "push", str(folder), "--registry",
                          f"{registry.host}/models/for-oras:v1").returncode == 0
    out = tmp_path / "oras-out"
    client = oras.client.OrasClient(hostname=registry.host, insecure=True)
    client.pull(target=f"{registry.host}/models/for-oras:v1", outdir=str(out))
    assert tree(out) == tree(folder)


def test_builder_pulls_what_oras_pushed(registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    model = gguf(work / "tiny.gguf", seed=5)
    folder = hf_folder(work / "hf", seed=6)
    files = sorted(p.relative_to(work).as_posix() for p in folder.rglob("*") if p.is_file())

    def config(name: str, fmt: str, layers: list[str]) -> str:
        ids = [f"sha256:{sha(work / path)}" for path in layers]
        (tmp_path / name).write_text(json.dumps({"descriptor": {"name": "tiny"}, "config": {"format": fmt},
                                                 "modelfs": {"type": "layers", "diffIds": ids}}))
        return f"{tmp_path / name}:{CONFIG_TYPE}"

    monkeypatch.chdir(work)  # oras pushes paths relative to the working directory
    client = oras.client.OrasClient(hostname=registry.host, insecure=True)
    client.push(target=f"{registry.host}/models/from-oras:gguf", files=[f"tiny.gguf:{WEIGHT}"],
                manifest_config=config("gguf.json", "gguf", ["tiny.gguf"]), quiet=True)
    # A folder: oras names each layer by its base name, so the ModelPack path annotation carries the path.
    annotations = {path: {FILEPATH: path.removeprefix("hf/")} for path in files}
    (tmp_path / "annotations.json").write_text(json.dumps(annotations))
    kinds = {"hf/model.safetensors": WEIGHT, "hf/onnx/model.onnx": WEIGHT, "hf/README.md": DOC}
    client.push(target=f"{registry.host}/models/from-oras:hf", quiet=True,
                manifest_config=config("hf.json", "safetensors", files),
                files=[f"{path}:{kinds.get(path, WEIGHT_CONFIG)}" for path in files],
                annotation_file=str(tmp_path / "annotations.json"))

    dest = tmp_path / "models"
    proc = run_cli_inproc("model", "pull", f"{registry.host}/models/from-oras:gguf", "--dest", str(dest),
                          "--sha256", sha(model))
    assert proc.returncode == 0, proc.stderr
    assert (dest / f"{sha(model)}.gguf").read_bytes() == model.read_bytes()
    proc = run_cli_inproc("model", "pull", f"{registry.host}/models/from-oras:hf", "--dest", str(dest), "--json")
    assert proc.returncode == 0, proc.stderr
    expected = folder_hash(folder, "test")
    assert json.loads(proc.stdout)["sha256"] == expected
    assert tree(dest / expected) == tree(folder)


# --- hostile replies -----------------------------------------------------------------------------------

class CraftedModel:
    """A GGUF model served by a crafted registry as `m:v1`; each test spoils one part."""

    def __init__(self, server: Crafted, model: bytes) -> None:
        self.server = server
        self.model = model
        self.config = json.dumps({"descriptor": {}, "config": {"format": "gguf"},
                                  "modelfs": {"type": "layers", "diffIds": [sha256_digest(model)]}}).encode()
        self.manifest: dict[str, Any] = {
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": sha256_digest(self.config), "size": len(self.config)},
            "layers": [{"mediaType": WEIGHT, "digest": sha256_digest(model), "size": len(model),
                        "annotations": {FILEPATH: "m.gguf"}}],
            "annotations": {MODEL_SHA256: sha256_digest(model).split(":")[1]},
        }
        for data in (self.config, model):
            self.blob(data)

    def blob(self, data: bytes, digest: str | None = None) -> None:
        self.server.routes[("GET", f"/v2/m/blobs/{digest or sha256_digest(data)}")] = Reply(
            200, {"Content-Type": "application/octet-stream"}, data)

    def other_config(self) -> None:
        config = json.dumps({"modelfs": {"type": "layers", "diffIds": [sha256_digest(b"other")]}}).encode()
        self.blob(config)
        self.manifest["config"].update(digest=sha256_digest(config), size=len(config))

    def not_gguf(self) -> None:
        page = b"<html>sign in</html>"
        self.blob(page)
        self.manifest["layers"][0].update(digest=sha256_digest(page), size=len(page))
        self.manifest["annotations"][MODEL_SHA256] = sha256_digest(page).split(":")[1]
        config = json.dumps({"modelfs": {"type": "layers", "diffIds": [sha256_digest(page)]}}).encode()
        self.blob(config)
        self.manifest["config"].update(digest=sha256_digest(config), size=len(config))

    def serve(self) -> None:
        body = json.dumps(self.manifest).encode()
        self.server.routes[("GET", "/v2/m/manifests/v1")] = Reply(
            200, {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": sha256_digest(body)}, body)


@pytest.fixture(scope="module")
def crafted_server() -> Iterator[Crafted]:
    server = Crafted()
    yield server
    server.close()


@pytest.fixture
def crafted(crafted_server: Crafted) -> CraftedModel:
    crafted_server.routes.clear()
    return CraftedModel(crafted_server, b"GGUF\x03\x00\x00\x00" + random.Random(7).randbytes(20_000))


def spoil_layer(**fields: Any) -> Any:
    return lambda c: c.manifest["layers"][0].update(fields)


HOSTILE = {
    "a layer of another media type": (spoil_layer(mediaType="application/vnd.oci.image.layer.v1.tar"),
                                      "is not a raw ModelPack file"),
    "a path that climbs out": (spoil_layer(annotations={FILEPATH: "../../etc/m.gguf"}), "not a plain relative path"),
    "an absolute path": (spoil_layer(annotations={FILEPATH: "/etc/m.gguf"}), "not a plain relative path"),
    "no path at all": (spoil_layer(annotations={}), "needs a org.cncf.model.filepath annotation"),
    "an image, not a model": (lambda c: c.manifest.update(artifactType="application/vnd.oci.image.config.v1+json"),
                              "not a ModelPack model"),
    "an oversize manifest": (lambda c: c.manifest["annotations"].update(padding="x" * (5 << 20)),
                             "more than the 4 MiB allowed"),
    "a sha256 annotation that disagrees": (lambda c: c.manifest["annotations"].update({MODEL_SHA256: "0" * 64}),
                                           "annotation says"),
    "a weight whose bytes were altered": (lambda c: c.blob(c.model[:-1] + b"!", sha256_digest(c.model)),
                                          "arrived with another digest"),
    "a .gguf that is not a GGUF": (lambda c: c.not_gguf(), "is not a GGUF file"),
    "a config that lists other layers": (lambda c: c.other_config(), "modelfs.diffIds disagree"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_replies_are_refused_in_one_line_and_nothing_is_placed(crafted: CraftedModel, tmp_path: Path,
                                                                       case: str) -> None:
    spoil, message = HOSTILE[case]
    spoil(crafted)
    crafted.serve()
    dest = tmp_path / "dest"
    proc = run_cli_inproc("model", "pull", f"{crafted.server.host}/m:v1", "--dest", str(dest))
    one_line_error(proc, 1, message)
    assert list(dest.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]


def test_the_crafted_model_is_a_valid_one(crafted: CraftedModel, tmp_path: Path) -> None:
    crafted.serve()
    proc = run_cli_inproc("model", "pull", f"{crafted.server.host}/m:v1", "--dest", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / f"{sha256_digest(crafted.model).split(':')[1]}.gguf").read_bytes() == crafted.model


# --- interrupted pulls ---------------------------------------------------------------------------------

@contextmanager
def slow_registry(model: CraftedModel, delay: float) -> Iterator[tuple[str, threading.Event]]:
    """Serves the crafted model's manifest and config at once and its weight 1 KiB per `delay` seconds;
    the event is set once weight bytes have gone out."""
    started = threading.Event()
    body = json.dumps(model.manifest).encode()
    blobs = {f"/v2/m/blobs/{sha256_digest(model.config)}": (model.config, 0.0),
             f"/v2/m/blobs/{sha256_digest(model.model)}": (model.model, delay),
             "/v2/m/manifests/v1": (body, 0.0)}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802
            data, pause = blobs.get(self.path, (b"", 0.0))
            self.send_response(200 if data else 404)
            self.send_header("Content-Type", OCI_MANIFEST if "manifests" in self.path else "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                for start in range(0, len(data), 1024):
                    self.wfile.write(data[start:start + 1024])
                    self.wfile.flush()
                    if pause:
                        started.set()
                        time.sleep(pause)
            except OSError:
                pass  # the client went away: that is the point

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}/m:v1", started
    finally:
        server.shutdown()
        server.server_close()


def start_pull(reference: str, dest: Path, cache: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "builder", "model", "pull", reference, "--dest", str(dest)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "BUILDER_CACHE": str(cache)})


def test_a_terminated_pull_places_nothing(crafted: CraftedModel, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    with slow_registry(crafted, delay=0.1) as (reference, started):
        proc = start_pull(reference, dest, tmp_path / "cache")
        assert started.wait(60), "the weight's download never started"
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "terminated" and "Traceback" not in err
    assert list(dest.iterdir()) == []


def test_a_killed_pull_leaves_nothing_usable_and_the_next_pull_cleans_up(crafted: CraftedModel,
                                                                         tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    with slow_registry(crafted, delay=0.1) as (reference, started):
        proc = start_pull(reference, dest, tmp_path / "cache")
        assert started.wait(60), "the weight's download never started"
        time.sleep(0.3)
        proc.kill()
        proc.communicate(timeout=30)
    # Only a temporary folder, never a file under the model's name.
    assert [p.name.startswith(".pull-") for p in dest.iterdir()] == [True]
    crafted.serve()
    proc = run_cli_inproc("model", "pull", f"{crafted.server.host}/m:v1", "--dest", str(dest))
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in dest.iterdir()] == [f"{sha256_digest(crafted.model).split(':')[1]}.gguf"]
