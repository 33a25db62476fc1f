"""A node's nftables file has exactly the structure its Firewall implies, for any addresses, ports and names
Hypothesis draws (the template of images/firewall/node.nft.j2 is the only way values reach it), and values that
are not what they claim (a name with a newline, a network instead of an address) are one line, never rules."""

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builder.core.errors import RecipeError
from builder.netboot.firewall import TABLE, Firewall, ruleset

names = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
addresses = st.lists(st.ip_addresses(), min_size=1, max_size=6, unique=True).map(lambda a: [str(x) for x in a])
ports = st.lists(st.integers(1, 65535), max_size=4, unique=True)


def rules_of(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@settings(max_examples=60, deadline=None)
@given(node=names, allowed=addresses, served=ports)
def test_the_rules_are_exactly_those_the_firewall_implies(node: str, allowed: list[str], served: list[int]) -> None:
    text = ruleset(Firewall(node, allowed[0], tuple(allowed), tuple(served)), "cluster.yaml")
    v4 = [a for a in allowed if ipaddress.ip_address(a).version == 4]
    v6 = [a for a in allowed if ipaddress.ip_address(a).version == 6]
    rules = rules_of(text)
    expected = [f"table inet {TABLE}", f"delete table inet {TABLE}", f"table inet {TABLE} {{"]
    for name, family, members in (("cluster4", "ipv4_addr", v4), ("cluster6", "ipv6_addr", v6)):
        if members:
            expected += [f"set {name} {{", f"type {family}", f"elements = {{ {', '.join(members)} }}", "}"]
    expected += ["chain input {", "type filter hook input priority filter; policy accept;",
                 "ct state established,related accept", "ct state invalid drop", "ip saddr 127.0.0.0/8 accept",
                 "ip6 saddr ::1 accept"]
    expected += ["ip saddr @cluster4 accept"] * bool(v4) + ["ip6 saddr @cluster6 accept"] * bool(v6)
    expected += ["meta l4proto { icmp, ipv6-icmp } accept", "udp sport 67 udp dport 68 accept",
                 "meta nfproto ipv6 udp sport 547 udp dport 546 accept", "meta l4proto tcp reject with tcp reset",
                 "reject with icmpx type port-unreachable", "}", "}"]
    assert rules == expected
    assert text.splitlines()[0] == f"# Written by builder from cluster.yaml for node {node} ({allowed[0]}): " \
                                   "regenerate it, do not edit."


@pytest.mark.parametrize(("firewall", "source", "message"), [
    (Firewall("a\naccept", "10.0.0.1", ("10.0.0.1",), ()), "cluster.yaml", "not a plain host name"),
    (Firewall("a", "10.0.0.1", ("10.0.0.1",), ()), "x.yaml\n}", "not a plain host name and file name"),
    (Firewall("a", "10.0.0.1", ("10.0.0.0/8",), ()), "cluster.yaml", "addresses in the rules are IP literals"),
    (Firewall("a", "10.0.0.1; flush ruleset", ("10.0.0.1",), ()), "cluster.yaml", "IP literals"),
    (Firewall("a", "10.0.0.1", ("10.0.0.1",), (0,)), "cluster.yaml", "are not port numbers"),
])
def test_a_value_that_is_not_what_it_claims_is_one_line(firewall: Firewall, source: str, message: str) -> None:
    with pytest.raises(RecipeError) as caught:
        ruleset(firewall, source)
    text = str(caught.value)
    assert message in text or message in (caught.value.hint or "")
    assert "\n" not in text.split(": ", 1)[0]
