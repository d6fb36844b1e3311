"""Aggregation: never wider than its members need, never below the threshold."""

from __future__ import annotations

import ipaddress
import re

import pytest
from flowdata import START, conn, flows_of, proc, summary
from hypothesis import given
from hypothesis import strategies as st

from egress_auditor.model import Connection
from egress_auditor.plugins import select
from egress_auditor.rules.aggregate import THRESHOLD, aggregate, parse, smallest_prefix
from egress_auditor.rules.scope import ScopedRule, scoped_rules

CURL = proc(4242, "curl", 1000, "alice", ["curl"])
BOB = proc(4343, "curl", 1001, "bob", ["curl"])


@given(st.lists(st.integers(0, 255), min_size=1, max_size=20))
def test_smallest_prefix_holds_all_and_no_smaller_does(hosts: list[int]) -> None:
    members = [ipaddress.ip_address(f"192.0.2.{h}") for h in hosts]
    network, length = smallest_prefix(members)
    net = ipaddress.ip_network((network, length))
    assert all(m in net for m in members)
    if length < 32:
        halves = list(net.subnets(prefixlen_diff=1))
        assert not any(all(m in half for m in members) for half in halves)
    assert length >= 24  # all in one /24: never wider


def rules(connections: list[Connection], prefixes: tuple[int, int] | None, scope: str = "none") -> list[ScopedRule]:
    return aggregate(scoped_rules(flows_of(connections), scope, lambda p: p, "test"), prefixes)


def test_threshold_port_scope_and_block_keep_rules_apart() -> None:
    two = [conn(CURL, f"192.0.2.{h}", 443, START + h) for h in (5, 6)]
    assert [s.rule.prefix for s in rules(two, (24, 64))] == [None, None]  # below the threshold
    three = [*two, conn(CURL, "192.0.2.7", 443, START + 7)]
    (merged,) = rules(three, (24, 64))
    assert (str(merged.rule.dst), merged.rule.prefix, merged.rule.connections) == ("192.0.2.4", 30, 3)
    assert [str(m) for m in merged.rule.members] == ["192.0.2.5", "192.0.2.6", "192.0.2.7"]
    assert "aggregated: 3 addresses seen in one /24 (threshold 3)" in merged.note
    other_port = [*two, conn(CURL, "192.0.2.7", 8443, START)]
    assert all(s.rule.prefix is None for s in rules(other_port, (24, 64)))
    other_user = [*two, conn(BOB, "192.0.2.7", 443, START)]
    assert all(s.rule.prefix is None for s in rules(other_user, (24, 64), "user"))
    other_block = [*two, conn(CURL, "192.0.3.7", 443, START)]
    assert all(s.rule.prefix is None for s in rules(other_block, (24, 64)))
    assert THRESHOLD == 3


def test_ipv6_and_outputs_write_the_prefix() -> None:
    connections = [conn(CURL, f"2001:db8:0:1::{h}", 443, START + h) for h in (10, 20, 30)]
    connections += [conn(CURL, f"198.51.100.{h}", 443, START + h) for h in (1, 2, 3)]
    opts = ["iptables:aggregate:24,64"]
    out = select("output", ["iptables"], opts, default="iptables").create()[0]
    text = out.finish(flows_of(connections), summary(connections))
    assert re.search(r"^ip6tables -I OUTPUT \d+ -d 2001:db8:0:1::/122 ", text, re.M)
    assert re.search(r"^iptables -I OUTPUT \d+ -d 198.51.100.0/30 ", text, re.M)
    nft = select("output", ["nftables"], ["nftables:aggregate:24"], default="nftables").create()[0]
    ruleset = nft.finish(flows_of(connections), summary(connections))
    assert "ip daddr 198.51.100.0/30 tcp dport 443 accept" in ruleset  # one rule in its family: no set
    assert "ip6 daddr 2001:db8:0:1::/122 tcp dport 443 accept" in ruleset
    more = [*connections, conn(CURL, "203.0.113.9", 80, START)]
    ruleset = nft.finish(flows_of(more), summary(more))
    assert "198.51.100.0/30 . tcp . 443" in ruleset and ruleset.count("flags interval") == 1


@pytest.mark.parametrize("bad", ["24,", "7", "32", "24,128", "x"])
def test_bad_aggregate_values(bad: str) -> None:
    with pytest.raises(ValueError):
        parse(bad)
    assert parse("off") is None and parse("24") == (24, 64) and parse("16,48") == (16, 48)
