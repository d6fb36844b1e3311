"""Policies against real netfilter, inside namespaces made for the test: an
audit ruleset (nft and iptables-restore) lets what it would drop pass, counts
it and logs it to the NFLOG group that `-i nflog` reads, which names the
process; a drop ruleset keeps the namespace's own loopback services reachable
unless the user puts loopback under the rules."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from flowdata import START, conn, flows_of, proc, summary
from netfilter_run import HOLDING_CLIENT, NOBODY, Auditor, flow_line, start_auditor
from netns import Link, Namespace, http_server

from egress_auditor.model import Connection
from egress_auditor.plugins import select

SEEN, UNSEEN, LOCAL = 18190, 18191, 18192
GROUP = 4711
CLIENT = proc(4242, "curl", 0, "root", ["curl", "-sS", "http://server/"])


def curl(ns: Namespace, host: str, port: int) -> int:
    target = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
    argv = ["curl", "-sS", "-o", "/dev/null", "--connect-timeout", "1", "--max-time", "3", target]
    return ns.run(argv, check=False).returncode


def seen(net: Link) -> list[Connection]:
    return [conn(CLIENT, host, SEEN, START + i) for i, host in enumerate((net.b4, net.b6))]


def write_rules(tmp_path: Path, connections: list[Connection], fmt: str, *options: str) -> list[tuple[str, Path]]:
    """The ruleset in `fmt` as files, each with the command that loads it."""
    if fmt == "nftables":
        output = select("output", ["nftables"], options, default="nftables").create()[0]
        path = tmp_path / "rules.nft"
        path.write_text(output.finish(flows_of(connections), summary(connections)))
        return [("nft", path)]
    output = select("output", ["iptables"], [*options, f"iptables:dir:{tmp_path}"], default="iptables").create()[0]
    output.finish(flows_of(connections), summary(connections))
    return [("iptables-restore", tmp_path / "rules.v4"), ("ip6tables-restore", tmp_path / "rules.v6")]


def load(ns: Namespace, files: list[tuple[str, Path]]) -> None:
    for tool, path in files:
        check = ["nft", "-c", "-f", str(path)] if tool == "nft" else [tool, "--test", str(path)]
        checked = ns.run(check, check=False)
        assert checked.returncode == 0, checked.stderr
        loaded = ns.run(["nft", "-f", str(path)] if tool == "nft" else [tool, str(path)], check=False)
        assert loaded.returncode == 0, loaded.stderr


def audit_packets(ns: Namespace, fmt: str) -> int:
    """Packets counted by the audit rule(s): nft's counter, or the NFLOG rules' packet counts."""
    if fmt == "nftables":
        listed = json.loads(ns.run(["nft", "-j", "list", "table", "inet", "egress_auditor"]).stdout)["nftables"]
        counted = [
            expr["counter"]["packets"]
            for item in listed
            if "rule" in item
            for expr in item["rule"]["expr"]
            if "counter" in expr and any("log" in e for e in item["rule"]["expr"])
        ]
        assert len(counted) == 1, listed
        return int(counted[0])
    total = 0
    for binary in ("iptables", "ip6tables"):
        rows = ns.run([binary, "-L", "OUTPUT", "-v", "-n", "-x"]).stdout.splitlines()
        nflog = [row for row in rows if " NFLOG " in f" {row} "]
        assert len(nflog) == 1, rows
        total += int(nflog[0].split()[0])
    return total


@pytest.fixture
def servers(net: Link) -> Iterator[Link]:
    with http_server(net.b, SEEN), http_server(net.b, UNSEEN):
        yield net


@pytest.mark.parametrize("fmt", ["nftables", "iptables"])
def test_audit_lets_unseen_pass_counts_it_and_nflog_names_the_process(
    servers: Link, tmp_path: Path, auditors: list[Auditor], fmt: str
) -> None:
    net = servers
    files = write_rules(tmp_path, seen(net), fmt, f"{fmt}:policy:audit", f"{fmt}:log_group:{GROUP}")
    text = "".join(path.read_text() for _, path in files)
    assert f"group {GROUP}" in text or f"--nflog-group {GROUP}" in text
    load(net.a, files)
    assert audit_packets(net.a, fmt) == 0
    auditor = start_auditor(auditors, net.a, "nflog", "-I", f"nflog:group:{GROUP}")
    for host in (net.b4, net.b6):
        assert curl(net.a, host, SEEN) == 0
    assert audit_packets(net.a, fmt) == 0, "a seen destination reached the audit rule"
    for host in (net.b4, net.b6):
        assert curl(net.a, host, UNSEEN) == 0, f"audit dropped {host}:{UNSEEN}"
        auditor.wait_line(flow_line(host, UNSEEN))
    assert audit_packets(net.a, fmt) >= 2
    # A client that holds its socket is found through it: the would-be drop comes with its process.
    client = net.a.popen([*NOBODY, sys.executable, "-c", HOLDING_CLIENT, net.b4, str(UNSEEN), "1.5"])
    assert client.wait(timeout=20) == 0
    assert audit_packets(net.a, fmt) >= 3
    named = rf"by python3 \(pid {client.pid}, user nobody\)$"
    auditor.wait_line(flow_line(net.b4, UNSEEN) + r".*" + named)
    assert auditor.stop() == 0
    assert not any(re.search(flow_line(h, SEEN), line) for h in (net.b4, net.b6) for line in auditor.stderr)
    assert f"--dport {UNSEEN} " in auditor.stdout  # the would-be drops, as rules to review


@pytest.mark.parametrize("fmt", ["nftables", "iptables"])
def test_drop_keeps_loopback_services_unless_asked(client_ns: Namespace, tmp_path: Path, fmt: str) -> None:
    remote = proc(4243, "curl", 0, "root", ["curl"])
    connections = [conn(remote, "192.0.2.10", 443, START)]  # a capture that never used loopback
    with http_server(client_ns, LOCAL):
        load(client_ns, write_rules(tmp_path, connections, fmt, f"{fmt}:policy:drop"))
        for host in ("127.0.0.1", "::1"):
            assert curl(client_ns, host, LOCAL) == 0, f"drop policy cut off loopback {host}"
        strict = tmp_path / "strict"
        strict.mkdir()
        load(client_ns, write_rules(strict, connections, fmt, f"{fmt}:policy:drop", f"{fmt}:loopback:rules"))
        if fmt == "iptables":  # iptables-restore replaced the chain; nothing of the first load is left
            assert "-o lo" not in client_ns.run(["iptables", "-S", "OUTPUT"]).stdout
        for host in ("127.0.0.1", "::1"):
            assert curl(client_ns, host, LOCAL) != 0, f"loopback:rules still let {host} through"


@pytest.mark.parametrize("fmt", ["nftables", "iptables"])
def test_aggregated_rule_allows_its_prefix_and_nothing_wider(net: Link, tmp_path: Path, fmt: str) -> None:
    """Three addresses seen in one /24 become their /30: an unseen address inside it passes,
    one outside it (still in the /24) is blocked."""
    base = net.b4.rsplit(".", 1)[0]
    members, inside, outside = [f"{base}.{h}" for h in (5, 6, 7)], f"{base}.4", f"{base}.40"
    device = net.b.run(["ip", "-o", "-4", "addr", "show", "to", net.b4]).stdout.split()[1]
    for address in (*members, inside, outside):
        net.b.run(["ip", "addr", "add", f"{address}/32", "dev", device])
    connections = [conn(CLIENT, address, SEEN, START + i) for i, address in enumerate(members)]
    files = write_rules(tmp_path, connections, fmt, f"{fmt}:policy:drop", f"{fmt}:aggregate:24")
    text = "".join(path.read_text() for _, path in files)
    assert f"{base}.4/30" in text and "aggregated: 3 addresses seen in one /24" in text
    with http_server(net.b, SEEN):
        load(net.a, files)
        for address in (*members, inside):
            assert curl(net.a, address, SEEN) == 0, f"{address} is in the /30 and was blocked"
        for address in (outside, net.b4):
            assert curl(net.a, address, SEEN) != 0, f"{address} is outside the /30 and was allowed"
