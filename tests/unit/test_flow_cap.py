"""The flow table's caps: destinations past the flow cap are held in their
/24 then /16 network (IPv6 /64, /48), then only counted; processes past their
caps are counted, never listed; the header says what each cap took."""

from __future__ import annotations

import ipaddress

import pytest
from flowdata import START, conn, proc

from egress_auditor.capture import flows
from egress_auditor.capture.flows import FlowTable
from egress_auditor.rules.rule import rules_from_flows

CURL = proc(100, "curl", 0, "root", ["curl", "http://example/"])


def test_below_the_cap_every_destination_is_its_own_flow() -> None:
    table = FlowTable(cap=4)
    for i in range(4):
        flow, new = table.add(conn(CURL, f"192.0.2.{i}", 443, START + i))
        assert new and flow is not None and flow.key.prefix == 0
    assert table.limits.notes(4) == []


@pytest.mark.parametrize(
    ("addresses", "first", "second"),
    [
        (["192.0.2.1", "192.0.2.2", "198.51.100.7", "198.51.7.9", "203.0.113.5"], "198.51.100.0/24", "198.51.0.0/16"),
        (["2001:db8::1", "2001:db8::2", "2001:db8:0:5::1", "2001:db8:7::1", "2001:db9::1"],
         "2001:db8:0:5::/64", "2001:db8:7::/48"),
    ],
)  # fmt: skip
def test_past_the_cap_networks_then_only_counts(addresses: list[str], first: str, second: str) -> None:
    table = FlowTable(cap=2)
    held = [table.add(conn(CURL, a, 443, START + i)) for i, a in enumerate(addresses)]
    assert [new for _, new in held] == [True, True, True, True, False]
    assert held[4][0] is None and table.connections == 5 and len(table) == 4
    rules = rules_from_flows(table)
    assert sorted(r.destination for r in rules if r.prefix) == sorted([first, second])
    # A later member of a held network adds to its count; an exact flow keeps its own.
    inside = str(ipaddress.ip_network(first)[9])
    flow, new = table.add(conn(CURL, inside, 443, START + 9))
    assert not new and flow is not None and flow.connections == 2 and str(flow.key.dst) + f"/{flow.key.prefix}" == first
    flow, new = table.add(conn(CURL, addresses[0], 443, START + 10))
    assert not new and flow is not None and flow.key.prefix == 0 and flow.connections == 2
    notes = table.limits.notes(2)
    assert "past the flow cap (2), new destinations are held in 2 network flows" in notes[0]
    assert "1 connections past twice the flow cap (4)" in notes[1]


def test_kernel_counts_of_a_member_reach_its_network() -> None:
    table = FlowTable(cap=2)
    table.add(conn(CURL, "192.0.2.1", 443, START))
    table.add(conn(CURL, "192.0.2.2", 443, START))
    flow, _ = table.add(conn(CURL, "198.51.100.7", 443, START + 1))
    assert flow is not None and flow.key.prefix == 24
    member = table.holder(flows.flow_key(conn(CURL, "198.51.100.7", 443, START)))
    assert member == flow.key
    table.set_kernel_count(flows.flow_key(conn(CURL, "198.51.100.7", 443, START)), 5, START + 2)
    assert flow.connections == 5 and flow.last_seen == START + 2


def test_processes_past_their_caps_are_counted_not_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flows, "PROCESSES_PER_FLOW", 3)
    monkeypatch.setattr(flows, "PROCESS_CAP", 5)
    table = FlowTable()
    for pid in range(10):
        table.add(conn(proc(1000 + pid, "curl", 0, "root"), "192.0.2.1", 443, START + pid))
    flow = table.get(flows.flow_key(conn(CURL, "192.0.2.1", 443, START)))
    assert flow is not None and len(flow.processes) == 3 and flow.connections == 10
    # Past the table's cap a flow with no process still gets its first one.
    for port in range(20):
        table.add(conn(proc(2000 + port, "wget", 0, "root"), "192.0.2.2", 8000 + port, START))
    listed = {p.pid for f in table for p in f.processes.values()}
    assert {2000 + port for port in range(20)} <= listed
    assert table.limits.unlisted_processes == 7
    assert "7 processes are not listed" in table.limits.notes(table.cap)[0]
