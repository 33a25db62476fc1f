"""A cluster on this machine with real llama-servers behind the real HAProxy gateway (`builder cluster --local`).

Three services: `tiny` replicated on nodes a and b, `other` (a second tiny model with other weights) on node c,
and `tiny-split` (the first model again) with its head on node c and an RPC worker on node d.
Everything listens on 127.0.0.0/8; every request loop is bounded in count and time.
"""

import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from builder.core.digests import sha256_file
from builder.engines import ENGINES
from conftest import free_port, local_cluster, require_engine, require_tool, run_cli
from tinymodel import make_tiny_model

pytestmark = pytest.mark.engine

ENGINE = "podman"
PROMPT = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "seed": 42}
UP_TIMEOUT = 900  # the cpu image is built first (llama_cpu_image), with a build's limit


@dataclass(frozen=True)
class Cluster:
    path: Path
    gateway: str
    metrics_port: int
    key: str
    ports: dict[str, int]  # service → llama-server port
    up_output: str

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    def backend(self, node: str, service: str) -> str:
        return f"http://127.0.0.{11 + 'abcd'.index(node)}:{self.ports[service]}"

    def complete(self, model: str, timeout: float = 60, **extra: Any) -> requests.Response:
        return requests.post(f"{self.gateway}/completions", json={**PROMPT, "model": model, **extra},
                             headers=self.headers(), timeout=timeout)

    def status(self) -> dict[str, Any]:
        proc = run_cli("cluster", "status", "--local", str(self.path), "--json", timeout=120)
        document = dict(json.loads(proc.stdout))
        # exit 0 exactly when everything serves: a script acting on `status` sees what a person sees
        assert proc.returncode == (0 if document["ok"] else 1) and document["ok"] == (not document["problems"])
        return document

    def health(self, service: str, node: str) -> str:
        for entry in self.status()["services"]:
            if entry["name"] == service:
                return str(next(p["health"] for p in entry["processes"] if p["node"] == node))
        raise AssertionError(service)


def container_name(cluster: Cluster, node: str, service: str) -> str:
    state = Path(cluster.status()["gateway"]["key_file"]).parent
    return f"{state.name}-{node}-{service}-server"


def predicted(url: str) -> float:
    """Tokens the server has generated so far (llama-server --metrics): each request here generates the same."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    match = re.search(r"^llamacpp:tokens_predicted_total (\S+)$", text, re.M)
    assert match, text[:500]
    return float(match.group(1))


def wait_for(check: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    pytest.fail(f"{what} not within {seconds} s")


@pytest.fixture(scope="module")
def cluster(cpu_prepared: Any, tmp_path_factory: pytest.TempPathFactory,
            llama_cpu_image: str) -> Iterator[Cluster]:
    require_engine(ENGINE)
    require_tool("haproxy", "haproxy")
    folder = tmp_path_factory.mktemp("cluster")
    vocab = cpu_prepared.tree.path / "models" / "ggml-vocab-llama-spm.gguf"
    tiny = make_tiny_model(vocab, folder / "tiny.gguf")
    other = make_tiny_model(vocab, folder / "other.gguf", seed=99)
    ports = {"tiny": free_port(), "other": free_port(), "tiny-split": free_port(), "rpc": free_port()}
    gateway_port, metrics_port = free_port(), free_port()
    nodes = [{"name": n, "mac": f"52:54:00:00:00:1{i}", "target": "cpu", "memory": "1GiB"}
             for i, n in enumerate("abcd")]
    data = {
        "gateway": {"port": gateway_port, "metrics_port": metrics_port},
        "nodes": nodes,
        "services": [
            {"name": "tiny", "model": "tiny.gguf", "sha256": sha256_file(tiny), "nodes": ["a", "b"],
             "port": ports["tiny"], "context": 256, "args": ["-t", "1"]},
            {"name": "other", "model": "other.gguf", "sha256": sha256_file(other), "nodes": ["c"],
             "port": ports["other"], "context": 256, "args": ["-t", "1"]},
            {"name": "tiny-split", "model": "tiny.gguf", "sha256": sha256_file(tiny), "topology": "split",
             "head": "c", "workers": ["d"], "port": ports["tiny-split"], "rpc_port": ports["rpc"], "context": 256,
             "args": ["-t", "1", "-lv", "4"]},
        ],
    }
    with local_cluster(folder, data, ENGINE, UP_TIMEOUT) as (path, printed, key):
        yield Cluster(path, f"http://127.0.0.1:{gateway_port}/v1", metrics_port, key, ports, printed)


def test_up_prints_the_endpoint_and_where_the_key_is(cluster: Cluster) -> None:
    assert f"endpoint  {cluster.gateway}" in cluster.up_output
    assert cluster.key not in cluster.up_output and len(cluster.key) >= 40
    document = cluster.status()
    assert document["gateway"]["running"] is True
    healths = {(s["name"], p["node"]): p["health"] for s in document["services"] for p in s["processes"]}
    assert healths == {("tiny", "a"): "UP", ("tiny", "b"): "UP", ("other", "c"): "UP",
                       ("tiny-split", "c"): "UP", ("tiny-split", "d"): "UP"}
    assert document["ok"] is True and document["problems"] == []


def test_models_are_the_services_and_backends_answer_their_alias(cluster: Cluster) -> None:
    resp = requests.get(f"{cluster.gateway}/models", headers=cluster.headers(), timeout=10)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/json")
    assert [m["id"] for m in resp.json()["data"]] == ["tiny", "other", "tiny-split"]
    direct = requests.get(f"{cluster.backend('a', 'tiny')}/v1/models", timeout=10).json()
    assert direct["data"][0]["id"] == "tiny"


@pytest.mark.parametrize(("headers", "body", "status", "code"), [
    ({}, {"model": "tiny"}, 401, "invalid_api_key"),
    ({"Authorization": "Bearer wrong"}, {"model": "tiny"}, 401, "invalid_api_key"),
    ({"Authorization": "Basic x"}, {"model": "tiny"}, 401, "invalid_api_key"),
    (None, {"model": "gpt-4"}, 404, "model_not_found"),
    (None, {"prompt": "x"}, 400, "missing_model"),
])
def test_errors_are_openai_style_json(cluster: Cluster, headers: dict[str, str] | None, body: dict[str, str],
                                      status: int, code: str) -> None:
    resp = requests.post(f"{cluster.gateway}/completions", json={**PROMPT, **body},
                         headers=cluster.headers() if headers is None else headers, timeout=10)
    assert resp.status_code == status and resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert error["code"] == code and error["message"]
    if code == "model_not_found":
        assert "gpt-4" in error["message"]
    assert cluster.key not in resp.text


def test_a_body_larger_than_the_gateway_buffer_is_413_json(cluster: Cluster) -> None:
    prompt = "x " * (600 * 1024)  # 1.2 MB: over the default 1 MiB buffer
    resp = requests.post(f"{cluster.gateway}/completions", json={**PROMPT, "model": "tiny", "prompt": prompt},
                         headers=cluster.headers(), timeout=60)
    assert resp.status_code == 413 and resp.headers["content-type"].startswith("application/json")
    assert resp.json()["error"]["code"] == "request_too_large"


def test_each_model_gets_its_own_models_text(cluster: Cluster) -> None:
    texts = {}
    for service, node in (("tiny", "a"), ("other", "c")):
        direct = requests.post(f"{cluster.backend(node, service)}/v1/completions", json=PROMPT, timeout=60)
        resp = cluster.complete(service)
        assert resp.status_code == 200, resp.text
        texts[service] = resp.json()["choices"][0]["text"]
        assert texts[service] == direct.json()["choices"][0]["text"]
    assert texts["tiny"] != texts["other"] and len(set(texts["tiny"].split())) > 2


def test_split_through_the_gateway_gives_the_single_node_text(cluster: Cluster) -> None:
    single = requests.post(f"{cluster.backend('a', 'tiny')}/v1/completions", json=PROMPT, timeout=60)
    resp = cluster.complete("tiny-split")
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"] == single.json()["choices"][0]["text"]
    log = run_cli("cluster", "logs", "--local", str(cluster.path), "c-tiny-split", "-n", "2000", timeout=60).stdout
    # evidence that the layers run on the worker, not silently on the head
    assert f"RPC0[127.0.0.14:{cluster.ports['rpc']}] model buffer size" in log, log[-3000:]


def test_streaming_passes_through_as_events(cluster: Cluster) -> None:
    whole = cluster.complete("tiny").json()["choices"][0]["text"]
    resp = requests.post(f"{cluster.gateway}/completions", json={**PROMPT, "model": "tiny", "stream": True},
                         headers=cluster.headers(), timeout=60, stream=True)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    # text/event-stream without a charset: requests would guess ISO-8859-1; SSE is UTF-8
    lines = [raw.decode() for raw in resp.iter_lines()]
    events = [line[6:] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 3
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == whole


def test_requests_land_on_both_replicas(cluster: Cluster) -> None:
    before = {node: predicted(cluster.backend(node, "tiny")) for node in "ab"}
    per_request = 0.0
    results: list[int] = []

    def send(count: int) -> None:
        for _ in range(count):
            results.append(cluster.complete("tiny").status_code)

    threads = [threading.Thread(target=send, args=(10,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results == [200] * 40
    after = {node: predicted(cluster.backend(node, "tiny")) for node in "ab"}
    per_request = (sum(after.values()) - sum(before.values())) / 40
    assert per_request > 0
    share = {node: (after[node] - before[node]) / per_request / 40 for node in "ab"}
    assert min(share.values()) >= 0.25, share


def test_a_killed_replica_loses_no_request_and_comes_back(cluster: Cluster) -> None:
    engine = ENGINES[ENGINE]().command()
    name = container_name(cluster, "b", "tiny")
    codes: list[int] = []
    failures: list[str] = []

    def send() -> None:
        for _ in range(30):
            try:
                codes.append(cluster.complete("tiny").status_code)
            except requests.RequestException as exc:
                failures.append(type(exc).__name__)

    threads = [threading.Thread(target=send) for _ in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: len(codes) >= 6, 60, "first requests")
    subprocess.run([*engine, "kill", name], check=True, capture_output=True)
    for t in threads:
        t.join(timeout=300)
    assert failures == [] and codes == [200] * 60, (failures, [c for c in codes if c != 200])
    wait_for(lambda: cluster.health("tiny", "b") == "DOWN", 20, "status showing b down")
    assert "tiny server on b is DOWN" in cluster.status()["problems"]  # and `status` exits 1

    proc = run_cli("cluster", "up", "--local", str(cluster.path), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "starting server tiny on b" in proc.stderr and "on a" not in proc.stderr  # only what was down
    assert cluster.health("tiny", "b") == "UP"
    before = predicted(cluster.backend("b", "tiny"))
    for _ in range(8):
        assert cluster.complete("tiny").status_code == 200
    assert predicted(cluster.backend("b", "tiny")) > before


def test_logs_show_each_server(cluster: Cluster) -> None:
    proc = run_cli("cluster", "logs", "--local", str(cluster.path), "c-other", "-n", "100000", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "-c-other-server <==" in proc.stdout and "/models/other.gguf" in proc.stdout
    assert "-tiny-" not in proc.stdout  # only the container asked for


def test_up_that_fails_removes_what_it_started(tmp_path: Path, cpu_prepared: Any) -> None:
    require_engine(ENGINE)
    require_tool("haproxy", "haproxy")
    vocab = cpu_prepared.tree.path / "models" / "ggml-vocab-llama-spm.gguf"
    model = make_tiny_model(vocab, tmp_path / "tiny.gguf")
    metrics = free_port()
    data = {
        "gateway": {"port": free_port(), "metrics_port": metrics},
        "nodes": [{"name": "a", "mac": "52:54:00:00:00:21", "target": "cpu", "memory": "1GiB"}],
        "services": [{"name": "broken", "model": "tiny.gguf", "sha256": sha256_file(model), "nodes": ["a"],
                      "port": free_port(), "args": ["--no-such-flag"], "unsafe_args": True}],
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = run_cli("cluster", "up", "--local", str(path), "--engine", ENGINE, "--timeout", "60", timeout=UP_TIMEOUT)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: broken on a: the server exited" in proc.stderr and "no-such-flag" in proc.stderr
    status = json.loads(run_cli("cluster", "status", "--local", str(path), "--json").stdout)
    assert status["gateway"]["running"] is False
    assert status["services"][0]["processes"][0]["container"] == "absent"


def test_the_openai_sdk_drives_the_gateway(cluster: Cluster) -> None:
    """A real client: list models, a completion, a chat, and a streamed chat."""
    import openai

    client = openai.OpenAI(base_url=cluster.gateway, api_key=cluster.key, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == ["tiny", "other", "tiny-split"]
    completion = client.completions.create(model="other", prompt=PROMPT["prompt"], max_tokens=8, temperature=0)
    direct = requests.post(f"{cluster.backend('c', 'other')}/v1/completions", json=PROMPT, timeout=60).json()
    assert completion.choices[0].text == direct["choices"][0]["text"]
    messages = [{"role": "user", "content": "Hello"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8,  # type: ignore[arg-type]
                                          temperature=0)
    assert chat.choices[0].message.content and chat.model
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8,  # type: ignore[arg-type]
                                            temperature=0, stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len(pieces) > 2 and "".join(pieces) == chat.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=cluster.gateway, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="The model `nope` does not exist") as caught:
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    assert caught.value.code == "model_not_found"
