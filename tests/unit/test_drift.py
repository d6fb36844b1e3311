"""DriftWatch: what a baseline covers (address, DNS name, uid or cgroup by
scope), and drift records as json and loki write them, valid by the schema."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

from flowdata import START, conn, flows_of, proc, summary

from egress_auditor.capture.baseline import Baseline
from egress_auditor.capture.drift import DriftWatch, strictest
from egress_auditor.capture.records import schema
from egress_auditor.model import Process
from egress_auditor.outputs.json_lines import JsonLinesOutput
from unit.test_loki import FakeLoki, make

ALICE = proc(4242, "curl", 1000, "alice", ["curl"])
BOB = proc(4343, "curl", 1001, "bob", ["curl"])


def in_cgroup(process: Process, cgroup: str) -> Process:
    return dataclasses.replace(process, cgroup=cgroup)


def test_address_and_name_cover_a_flow() -> None:
    base = [dataclasses.replace(conn(ALICE, "198.51.100.6", 443, START), hostname="cdn.example.com"),
            conn(ALICE, "192.0.2.10", 80, START)]  # fmt: skip
    watch = DriftWatch(Baseline.of(flows_of(base)))
    now = [
        conn(ALICE, "192.0.2.10", 80, START + 9),  # same address
        dataclasses.replace(conn(ALICE, "198.51.100.7", 443, START + 9), hostname="CDN.Example.com"),  # rotated
        dataclasses.replace(conn(ALICE, "198.51.100.8", 8443, START + 9), hostname="cdn.example.com"),  # other port
        conn(ALICE, "192.0.2.10", 443, START + 9),  # other port, no name
        conn(ALICE, "192.0.2.11", 80, START + 9),  # other address
    ]
    drifted = watch.drifted(flows_of(now))
    assert sorted((str(f.key.dst), f.key.dport) for f in drifted) == [
        ("192.0.2.10", 443), ("192.0.2.11", 80), ("198.51.100.8", 8443)
    ]  # fmt: skip


def test_scope_matches_uid_or_cgroup() -> None:
    web = "/system.slice/web.service"
    base = flows_of([conn(in_cgroup(ALICE, web), "192.0.2.10", 443, START)])
    bob_there = flows_of([conn(BOB, "192.0.2.10", 443, START + 1)])
    alice_elsewhere = flows_of([conn(in_cgroup(ALICE, "/system.slice/other.service"), "192.0.2.10", 443, START + 1)])
    alice_unknown_cgroup = flows_of([conn(ALICE, "192.0.2.10", 443, START + 1)])
    assert DriftWatch(Baseline.of(base), "none").drifted(bob_there) == []
    assert len(DriftWatch(Baseline.of(base), "user").drifted(bob_there)) == 1
    assert DriftWatch(Baseline.of(base), "user").drifted(alice_elsewhere) == []
    assert len(DriftWatch(Baseline.of(base), "cgroup").drifted(alice_elsewhere)) == 1
    assert DriftWatch(Baseline.of(base), "cgroup").drifted(alice_unknown_cgroup) == []  # falls back to the uid
    assert strictest(["none", "cgroup", "user"]) == "cgroup" and strictest([]) == "none"


def test_drift_records_are_valid(tmp_path: Path) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    c = conn(ALICE, "192.0.2.10", 443, START)
    flow = flows_of([c])[0]
    path = tmp_path / "out.jsonl"
    output = JsonLinesOutput({"file": str(path)})
    output.connection(c, flow, True)
    output.drift(c, flow)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["type"] for r in records] == ["flow", "drift"]
    for record in records:
        validator.validate(record)
    loki = FakeLoki()
    try:
        pushed = make(loki.url, stderr=io.StringIO())
        pushed.drift(c, flow)
        pushed.finish([flow], dataclasses.replace(summary([c]), connections=1))
        drift = [r for r in loki.lines() if r["type"] == "drift"]
        assert len(drift) == 1 and drift[0]["dport"] == 443
        validator.validate(drift[0])
        assert any(labels["kind"] == "drift" for labels, _, _ in loki.entries)
    finally:
        loki.stop()
