"""A node's plan (builder/netboot/plan.py): its one text form reads back as the same plan, whatever the values
(Hypothesis), what cannot travel in it is refused, and every netbooted node's boot script names its plan and
nothing else of what it runs."""

import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_netboot import MAC, fake_artifacts, inventory, publish

from builder.netboot.plan import (
    AgentLine,
    EnvLine,
    MemoryLine,
    NodePlan,
    RpcWorkerLine,
    ServerLine,
    VllmLine,
    parse,
    serialize,
)

# A field is one word of anything but tabs and newlines (args may hold spaces, quotes, '-').
WORD = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\t\n\r\x0b\x0c\x1c\x1d\x1e\x85"
                             "\u2028\u2029"), min_size=1, max_size=12)
NAME = st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=12).filter(lambda w: w != "-")
PORT = st.integers(1, 65535)
SHA = st.text("0123456789abcdef", min_size=64, max_size=64)
URL = SHA.map(lambda h: f"http://10.0.2.2:8000/blobs/sha256/{h}")
PAIR = st.tuples(st.from_regex(r"[A-Z_][A-Z0-9_]{0,10}", fullmatch=True),
                 st.text(string.ascii_letters + string.digits + "./:-", max_size=10))
LINES = st.one_of(
    st.builds(EnvLine, st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True), WORD.filter(lambda w: w != "-")
              | st.just("")),
    st.builds(AgentLine, PORT),
    st.builds(MemoryLine, NAME, st.integers(1, 1 << 44)),
    st.builds(RpcWorkerLine, NAME, PORT),
    st.builds(ServerLine, NAME, PORT, URL, SHA, st.lists(NAME.map(lambda h: f"{h}:50052"), max_size=3).map(tuple),
              st.none() | st.integers(64, 1 << 20), st.lists(WORD, max_size=5).map(tuple)),
    st.builds(VllmLine, NAME, st.none() | PORT, URL, SHA, NAME.map(lambda n: f"/models/{n}"),
              st.lists(PAIR, max_size=3).map(tuple), st.lists(WORD, min_size=1, max_size=6).map(tuple)),
)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(node=NAME, lines=st.lists(LINES, max_size=6))
def test_a_plan_reads_back_as_the_same_plan(node: str, lines: list[object]) -> None:
    plan = NodePlan(node, tuple(lines))  # type: ignore[arg-type]
    text = serialize(plan)
    assert parse(text) == plan
    assert all(len(line.split("\t")) >= 2 for line in text.splitlines() if not line.startswith("#"))


@pytest.mark.parametrize("line", [
    ServerLine("chat", 8080, "http://x/m", "0" * 64, args=("--temp", "")),
    ServerLine("chat", 8080, "http://x/m", "0" * 64, args=("a\tb",)),
    ServerLine("chat", 8080, "http://x/m", "0" * 64, args=("a\u2028b",)),
    EnvLine("X", "-"),
    VllmLine("v", 8000, "http://x/m", "0" * 64, "/models/v", (("A", "1,B=2"),), ("serve",)),
])
def test_what_would_not_read_back_is_refused(line: object) -> None:
    with pytest.raises(ValueError, match="plan: "):
        serialize(NodePlan("n", (line,)))  # type: ignore[arg-type]


def test_a_line_node_init_cannot_read_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot read the line"):
        parse("server\tchat\n")


def test_every_netbooted_node_boots_from_its_plan_and_never_a_role(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF tiny")
    nodes = [{"name": "head", "mac": MAC, "target": "cpu", "role": "head"},
             {"name": "w1", "mac": "52:54:00:12:34:57", "target": "cpu", "role": "rpc-worker",
              "address": "10.0.2.20"}]
    root, path = tmp_path / "pxe-root", inventory(tmp_path, nodes=nodes, model="m.gguf")
    folder, manifest = fake_artifacts(tmp_path, "a")
    publish(root, path, {("cpu", "cpu"): (folder, manifest)}, keep=1)
    scripts = sorted((root / "current" / "nodes").glob("*.ipxe"))
    assert len(scripts) == 2
    for script in scripts:
        words = script.read_text().split()
        plan = next(w for w in words if w.startswith("builder.plan=")).rsplit("/", 1)[1]
        assert f"builder.plan_sha256={plan}" in words
        assert (root / "blobs" / "sha256" / plan).read_bytes() == script.with_suffix(".plan").read_bytes()
        assert not any(w.startswith(("builder.role=", "builder.port=", "builder.rpc=", "builder.model=",
                                     "builder.ctx=", "builder.served_name=", "builder.vllm_")) for w in words)
