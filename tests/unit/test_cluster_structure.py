"""No value from a cluster file reaches the gateway config's structure: addresses that something binds are IP
literals and never the wildcard in any spelling, and for every services form a Hypothesis strategy generates the
rendered haproxy.cfg has exactly the sections, ACL and rules the model implies (`haproxy -c` accepting a file
proves nothing about its structure)."""

import hashlib
import ipaddress
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cluster import cluster_file, node

from builder.cluster.gateway import write_gateway
from builder.cluster.model import SERVICE_NAME, load_cluster
from builder.core.errors import RecipeError
from builder.netboot.plan import AGENT_PORT
from conftest import require_tool

MODEL = b"GGUF" + bytes(1000)
SHA = hashlib.sha256(MODEL).hexdigest()
WILDCARDS = ["0.0.0.0", "0", "0x0", "0.0", "000.000.000.000", "0x00000000", "::", "::0", "0:0:0:0:0:0:0:0",
             "::ffff:0.0.0.0"]


@pytest.mark.parametrize("spelling", WILDCARDS)
@pytest.mark.parametrize("field", ["gateway.address", "control.address", "nodes[0].address"])
def test_every_spelling_of_the_wildcard_is_refused(tmp_path: Path, field: str, spelling: str) -> None:
    changes: dict[str, Any] = {"control": {"address": "10.0.0.1"}}
    if field == "gateway.address":
        changes["gateway"] = {"address": spelling}
    elif field == "control.address":
        changes["control"] = {"address": spelling}
    else:
        changes["nodes"] = [node("a", 1, address=spelling), node("b", 2, address="10.0.0.12")]
    with pytest.raises(RecipeError) as error:
        load_cluster(cluster_file(tmp_path, **changes))
    assert f"cluster.yaml: {field}: " in error.value.message and "is every address" in error.value.message


@pytest.mark.parametrize("value", ["gateway.lan", "localhost", "fe80::1%eth0"])
def test_a_name_or_a_zone_is_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(RecipeError, match=r"cluster\.yaml: gateway\.address: .*(is a name|has a zone)"):
        load_cluster(cluster_file(tmp_path, gateway={"address": value}))


def test_ip_literals_load(tmp_path: Path) -> None:
    load_cluster(cluster_file(tmp_path, control={"address": "10.0.0.1"}, gateway={"address": "fd00::1"},
                              nodes=[node("a", 1, address="10.0.0.11"), node("b", 2, address="fd00::12")]))


NAMES = st.from_regex(SERVICE_NAME, fullmatch=True)
ADDRESSES = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).filter(
    lambda ip: not ip.is_unspecified and not (ip.version == 6 and ip.ipv4_mapped is not None)).map(str)


@st.composite
def clusters(draw: st.DrawFn) -> dict[str, Any]:
    addresses = draw(st.lists(ADDRESSES, min_size=1, max_size=3, unique=True))
    nodes = [{"name": f"n{i}", "mac": f"52:54:00:00:09:{i:02x}", "target": "cpu", "memory": "64GiB",
              "address": address} for i, address in enumerate(addresses)]
    names = draw(st.lists(NAMES, min_size=1, max_size=4, unique=True))
    services = []
    for i, name in enumerate(names):
        placed = draw(st.lists(st.sampled_from([n["name"] for n in nodes]), min_size=1, unique=True))
        services.append({"name": name, "model": "tiny.gguf", "sha256": SHA, "nodes": placed, "port": 9000 + i})
    bind = draw(ADDRESSES)
    return {"control": {"address": "10.9.9.9"}, "gateway": {"address": bind}, "nodes": nodes, "services": services}


def sections(config: str) -> dict[str, list[str]]:
    """Every section of haproxy.cfg with its lines (comments and blank lines left out)."""
    out: dict[str, list[str]] = {}
    current = ""
    for line in config.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            current = line
            assert current not in out, f"section {current!r} twice"
            out[current] = []
        else:
            out[current].append(line.strip())
    return out


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=clusters())
def test_the_config_has_exactly_the_structure_the_model_implies(data: dict[str, Any]) -> None:
    require_tool("haproxy", "haproxy")
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        (base / "tiny.gguf").write_bytes(MODEL)
        (base / "cluster.yaml").write_text(yaml.safe_dump(data))
        loaded = load_cluster(base / "cluster.yaml")
        (base / "state").mkdir()
        addresses = {n["name"]: n["address"] for n in data["nodes"]}
        # every node is netbooted and serves llama.cpp: each answers the gateway's agent-check
        assert loaded.agent_nodes() == {n for s in data["services"] for n in s["nodes"]}
        config = write_gateway(loaded, base / "state", data["gateway"]["address"], addresses,
                               agents=frozenset(loaded.agent_nodes())).read_text()
    found = sections(config)
    names = [s["name"] for s in data["services"]]
    assert list(found) == ["global", "defaults", "frontend api", "frontend metrics",
                           *[f"backend svc_{name}" for name in names]]
    api = found["frontend api"]
    bind = ipaddress.ip_address(data["gateway"]["address"])
    assert api[0] == f"bind {f'[{bind}]' if bind.version == 6 else bind}:8080"
    assert [line for line in api if line.startswith("use_backend")] == [
        f"use_backend svc_{name} if {{ var(txn.model) -m str {name} }}" for name in names]
    assert [line for line in api if line.startswith("acl known_model")] == [
        "acl known_model var(txn.model) -m str " + " ".join(names)]
    # the frontend's rules are the template's, in its order, whatever the names
    kinds = [re.sub(r"\s.*", "", line) for line in api]
    assert kinds == ["bind", "stick-table", "tcp-request", "tcp-request", "http-request", "http-request",
                     "http-request", "acl", "acl", "http-request", "http-request", "http-request", "http-request",
                     "http-request", "acl", "http-request", "http-request", "http-request", "http-request",
                     "http-request", "http-request", "http-request", "http-request", "http-request", "acl",
                     "http-request", *["use_backend"] * len(names), "http-after-response"]
    for service in data["services"]:
        servers = [line for line in found[f"backend svc_{service['name']}"] if line.startswith("server ")]
        expected = []
        for name in service["nodes"]:
            ip = ipaddress.ip_address(addresses[name])
            host = f"[{ip}]" if ip.version == 6 else str(ip)
            expected.append(f"server {name} {host}:{service['port']} check agent-check agent-port {AGENT_PORT} "
                            f"agent-inter 2s agent-send \"{service['port']}\\n\"")
        assert servers == expected
